"""read_adapter: every on-disk layout of every family normalises to the writer's ExpectedLora; the writers
produce PEFT's real layout (PEFT's own logits); every unservable adapter fails with a message naming it."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelora.loader.model_loader import read_model_config
from moelora.lora.adapter import DENSE_TARGETS, AdapterError, LoraAdapter, LoraWeights, read_adapter
from moelora.models.registry import FAMILIES as REGISTRY
from tests.hf_models import FAMILIES, build_hf_model, family_configs, logprob_tol
from tests.lora_files import FORMS, OLD_PEFT_FORM, OTHER_FORMS, ExpectedLora, merged_hf_model, write_adapter

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
ARCHITECTURE = {f.name: f.architectures[0] for f in REGISTRY}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Any, Any]]:
    """family -> (HF config, moelora ModelConfig, Family), read from a saved config.json."""
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for fam, hf in family_configs().items():
        hf.architectures = [ARCHITECTURE[fam]]
        hf.save_pretrained(root / fam)
        out[fam] = (hf, *read_model_config(root / fam))
    return out


@pytest.fixture
def write(models, tmp_path: Path) -> Callable[..., tuple[Path, ExpectedLora]]:
    def write(fam: str = "qwen3_moe", form: str = "per_expert", **kw: Any) -> tuple[Path, ExpectedLora]:
        kw = {"rank": 4, "alpha": 8.0, "seed": 0, **kw}
        folder = tmp_path / f"{fam}-{form}-{len(list(tmp_path.iterdir()))}"
        return folder, write_adapter(folder, fam, models[fam][0], form=form, **kw)

    return write


@pytest.fixture
def read(models) -> Callable[..., LoraAdapter]:
    def read(folder: Path, fam: str = "qwen3_moe", max_rank: int | None = None) -> LoraAdapter:
        _, cfg, family = models[fam]
        return read_adapter("demo", folder, cfg, family, max_rank=max_rank)

    return read


def last_moe_layer(models, fam: str) -> int:
    return max(i for i, moe in enumerate(models[fam][1].moe_layers) if moe)


def assert_reads_as(adapter: LoraAdapter, expected: ExpectedLora) -> None:
    def same(w: LoraWeights, A: torch.Tensor, B: torch.Tensor, s: float, where: object) -> None:
        assert w.A.dtype == w.B.dtype == torch.float32, where
        assert torch.equal(w.A, A), where
        assert torch.equal(w.B, s * B), where

    assert set(adapter.dense) == set(expected.dense)
    for key, (A, B, s) in expected.dense.items():
        same(adapter.dense[key], A, B, s, key)
    got = {(layer, proj, e): w for (layer, proj), per in adapter.experts.items() for e, w in per.items()}
    assert set(got) == set(expected.experts)
    for key, (A, B, s) in expected.experts.items():
        same(got[key], A, B, s, key)


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS))


def edit_config(folder: Path, **fields: Any) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(fields)
    (folder / CONFIG).write_text(json.dumps(config))


# ---- every layout of every family reads exactly


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("fam", FAMILIES)
def test_every_form_reads_exactly(write, read, fam: str, form: str):
    folder, expected = write(fam, form, dense_targets=DENSE_TARGETS)
    adapter = read(folder, fam)
    assert_reads_as(adapter, expected)
    assert adapter.rank == 4  # the converted form's rank-8 gate_up splits back to rank 4 per projection
    assert adapter.num_bytes == sum(
        4 * (A.numel() + B.numel()) for A, B, _ in expected.experts.values()
    ) + sum(4 * (A.numel() + B.numel()) for A, B, _ in expected.dense.values())


@pytest.mark.parametrize("fam", FAMILIES)
def test_partial_experts_layers_projections(write, read, models, fam: str):
    layer = last_moe_layer(models, fam)
    folder, expected = write(
        fam, experts=[0, 2], layers=[layer], expert_projs=("up", "down"), dense_targets=["v_proj"]
    )
    assert_reads_as(read(folder, fam), expected)
    assert {key[:3] for key in expected.experts} == {(layer, p, e) for p in ("up", "down") for e in (0, 2)}
    assert set(expected.dense) == {(layer, "kv_b_proj" if fam.startswith("deepseek") else "v_proj")}


@pytest.mark.parametrize("form", ["fused", "converted"])
@pytest.mark.parametrize("projs", [("down",), ("gate", "up")])
@pytest.mark.parametrize("fam", FAMILIES)
def test_fused_single_parameter_is_told_apart_by_target_parameters(write, read, models, fam, projs, form):
    folder, expected = write(fam, form, layers=[last_moe_layer(models, fam)], expert_projs=projs)
    keys = load_file(str(folder / WEIGHTS))
    assert not any("base_layer" in k for k in keys)  # `experts.lora_*` alone: ambiguous without the config
    assert_reads_as(read(folder, fam), expected)


PATTERNS = {
    "per_expert": (
        {r"layers\.0\.self_attn\.q_proj": 2, "k_proj": 6, r"model\.layers\.\d+\.mlp\.experts\.1\.up_proj": 3},
        {"v_proj": 3.0, r".*experts\.2\..*": 11.0, "down_proj": 1.5},
    ),
    "fused": ({"layers.0.mlp.experts.down_proj": 2, "gate_up_proj": 6}, {r".*\.gate_up_proj": 5.0}),
    "converted": ({"o_proj": 5, "layers.2.mlp.experts.down_proj": 3}, {"down_proj": 7.0}),
}


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_rank_and_alpha_patterns(write, read, form: str, rslora: bool):
    ranks, alphas = PATTERNS[form]
    folder, expected = write("qwen3_moe", form, rank_pattern=ranks, alpha_pattern=alphas, use_rslora=rslora)
    adapter = read(folder)
    assert_reads_as(adapter, expected)
    assert len({w.rank for w in [*adapter.dense.values(), *adapter.experts[(0, "down")].values()]}) > 1


def test_mixtral_patterns_match_per_expert_names(write, read):
    folder, expected = write("mixtral", rank_pattern={r".*experts\.3\.w1": 2}, alpha_pattern={"w2": 1.0})
    adapter = read(folder, "mixtral")
    assert_reads_as(adapter, expected)
    assert adapter.experts[(0, "gate")][3].rank == 2 and adapter.experts[(0, "up")][3].rank == 4


def test_rslora_scales_each_projection_by_its_own_rank(write, read):
    folder, expected = write("olmoe", rank=4, alpha=6.0, use_rslora=True, rank_pattern={"up_proj": 9})
    adapter = read(folder, "olmoe")
    _, B, s = expected.experts[(1, "up", 5)]
    assert s == 6.0 / 3.0 and adapter.experts[(1, "up")][5].rank == 9
    assert torch.equal(adapter.experts[(1, "up")][5].B, 2.0 * B)
    assert torch.equal(adapter.experts[(1, "gate")][5].B, 3.0 * expected.experts[(1, "gate", 5)][1])


def test_converted_rslora_uses_its_own_config(write, read):
    folder, expected = write("qwen3_moe", "converted", rank=4, alpha=8.0, use_rslora=True)
    adapter = read(folder)
    assert expected.experts[(0, "gate", 0)][2] == pytest.approx(16.0 / math.sqrt(8))
    assert adapter.experts[(0, "gate")][0].rank == 4
    assert_reads_as(adapter, expected)


def test_converted_with_trained_off_diagonal_keeps_shared_rank(write, read, models):
    folder, _ = write("qwen3_moe", "converted", rank=4, alpha=8.0)
    key = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"
    raw = load_file(str(folder / WEIGHTS))
    B = raw[key].clone()
    B[0, -1] = 0.5  # gate row 0, column j * E + e of up's rank j = 7, expert 7: off the block diagonal
    edit_tensors(folder, lambda t: t.update({key: B}))
    adapter = read(folder)
    A_all = raw[key.replace("lora_B", "lora_A")]
    n_exp, inter = models["qwen3_moe"][1].num_experts, models["qwen3_moe"][1].moe_intermediate_size
    for e in (0, 7):
        A_e, B_e = A_all.view(n_exp, 8, -1)[e], B.view(2 * inter, 8, n_exp)[:, :, e]
        gate, up = adapter.experts[(0, "gate")][e], adapter.experts[(0, "up")][e]
        assert gate.rank == up.rank == 8 and torch.equal(gate.A, up.A)
        torch.testing.assert_close(gate.B @ gate.A, 2.0 * B_e[:inter] @ A_e)
        torch.testing.assert_close(up.B @ up.A, 2.0 * B_e[inter:] @ A_e)


def test_adapter_name_inside_keys(write, read):
    folder, expected = write("qwen2_moe", "fused", dense_targets=DENSE_TARGETS)
    edit_tensors(
        folder, lambda t: t.update({k.replace(".weight", ".default.weight"): t.pop(k) for k in list(t)})
    )
    assert_reads_as(read(folder, "qwen2_moe"), expected)


def test_mixtral_per_expert_keys_under_mlp(write, read):
    folder, expected = write("mixtral")
    edit_tensors(
        folder, lambda t: t.update({k.replace("block_sparse_moe", "mlp"): t.pop(k) for k in list(t)})
    )
    assert_reads_as(read(folder, "mixtral"), expected)


def test_harmless_options_are_accepted(write, read):
    folder, expected = write()
    edit_config(
        folder,
        task_type="CAUSAL_LM",
        layers_to_transform=[0, 1, 2],
        init_lora_weights="gaussian",
        velora_config={"num_groups": 4},
        lora_dropout=0.1,
    )
    edit_tensors(folder, lambda t: t.update({f"{Q0}.lora_velora_embed": torch.ones(8)}))
    assert_reads_as(read(folder), expected)


# ---- the writers produce PEFT's real layout


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[3, 17, 42, 99, 5, 150, 7, 8, 64]])).logits[0]


@pytest.mark.parametrize(
    ("form", "rslora"), [("fused", False), ("fused", True), ("converted", True), ("per_expert", False)]
)
def test_peft_loads_the_written_adapter_like_the_manual_merge(write, form: str, rslora: bool):
    from peft import PeftModel

    folder, expected = write("qwen3_moe", form, alpha=4.0, use_rslora=rslora, rank_pattern={"k_proj": 2})
    base = build_hf_model("qwen3_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(build_hf_model("qwen3_moe"), str(folder)).eval()
    merged = logits(merged_hf_model(base, expected)).float()  # the merge is exact (float64)
    assert (merged - logits(base)).abs().max() > 1.0  # the LoRA visibly changes the logits
    # PEFT runs in fp32: within fp32's tolerance of the exact merge (tests/hf_models.py).
    torch.testing.assert_close(logits(peft_model), merged, atol=logprob_tol(torch.float32), rtol=0)


def test_converted_writer_equals_peft_conversion(write, tmp_path: Path):
    """PEFT converts a per-expert adapter on load; saved again, it is exactly the converted writer's file."""
    from peft import PeftModel

    per_expert, _ = write("qwen3_moe", "per_expert", seed=5)
    converted, _ = write("qwen3_moe", "converted", seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(build_hf_model("qwen3_moe"), str(per_expert)).save_pretrained(
            tmp_path / "re"
        )
    ours, peft = load_file(str(converted / WEIGHTS)), load_file(str(tmp_path / "re" / WEIGHTS))
    assert set(ours) == set(peft) and all(torch.equal(ours[k], peft[k]) for k in ours)
    ours_cfg, peft_cfg = (json.loads((f / CONFIG).read_text()) for f in (converted, tmp_path / "re"))
    for field in ("rank_pattern", "alpha_pattern", "r", "lora_alpha"):
        assert ours_cfg[field] == peft_cfg[field], field
    assert sorted(ours_cfg["target_parameters"]) == sorted(peft_cfg["target_parameters"])


# ---- every unservable adapter fails, naming the adapter, the tensor or field, and the fix


def test_rank_above_max_rank(write, read):
    folder, _ = write(rank=8, rank_pattern={"k_proj": 32})
    with pytest.raises(
        AdapterError,
        match=r"adapter 'demo': rank 32 in '.*k_proj\.lora_A\.weight' is above "
        r"max_lora_rank 16: raise max_lora_rank to at least 32",
    ):
        read(folder, max_rank=16)
    assert read(folder, max_rank=32).rank == 32


def test_converted_rank_limit_is_per_projection(write, read):
    folder, _ = write(form="converted", rank=4)
    assert read(folder, max_rank=4).rank == 4


UNSERVED = [
    ("base_model.model.lm_head", "lm_head"),
    ("base_model.model.model.embed_tokens", "model.embed_tokens"),
    ("base_model.model.model.layers.0.mlp.gate", "mlp.gate"),
    ("base_model.model.model.layers.0.self_attn.q_norm", "self_attn.q_norm"),
]


@pytest.mark.parametrize(("module", "named"), UNSERVED)
def test_unserved_targets(write, read, module: str, named: str):
    folder, _ = write()
    extra = {f"{module}.lora_A.weight": torch.ones(4, 32), f"{module}.lora_B.weight": torch.ones(8, 4)}
    edit_tensors(folder, lambda t: t.update(extra))
    with pytest.raises(
        AdapterError, match=rf"'{named}' is not a target moelora serves.*serves LoRA on q/k/v/o"
    ):
        read(folder)


@pytest.mark.parametrize(
    ("fam", "module"),
    [("mixtral", "block_sparse_moe.gate"), ("qwen2_moe", "mlp.shared_expert_gate")],
)
def test_unserved_router_and_shared_gate(write, read, fam: str, module: str):
    folder, _ = write(fam)
    key = f"base_model.model.model.layers.1.{module}"
    edit_tensors(
        folder,
        lambda t: t.update(
            {f"{key}.lora_A.weight": torch.ones(4, 32), f"{key}.lora_B.weight": torch.ones(1, 4)}
        ),
    )
    with pytest.raises(AdapterError, match=rf"'{module}' is not a target moelora serves"):
        read(folder, fam)


def test_embedding_lora_keys(write, read):
    folder, _ = write()
    key = "base_model.model.model.embed_tokens.lora_embedding_A"
    edit_tensors(folder, lambda t: t.update({key: torch.ones(4, 160)}))
    with pytest.raises(
        AdapterError, match=rf"'{key}' cannot be served: it is not a LoRA A/B weight.*retrain"
    ):
        read(folder)


REFUSED_OPTIONS = [
    ({"use_dora": True}, r"use_dora = True: DoRA"),
    ({"bias": "all"}, r"bias = 'all': trained base-model biases .* retrain with bias='none'"),
    ({"lora_bias": True}, r"lora_bias = True"),
    ({"fan_in_fan_out": True}, r"fan_in_fan_out = True"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save = \['lm_head'\]"),
    ({"trainable_token_indices": [5, 6]}, r"trainable_token_indices = \[5, 6\]"),
    ({"alora_invocation_tokens": [1, 2]}, r"activated LoRA"),
    ({"layer_replication": [[0, 2], [1, 3]]}, r"layer_replication"),
    ({"use_qalora": True}, r"QA-LoRA"),
    ({"peft_type": "IA3"}, r"peft_type 'IA3': moelora serves LoRA adapters \(peft_type LORA\) only"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights = 'pissa', which rewrites the base weights"),
    ({"use_magic": True}, r"sets use_magic, unknown to moelora"),
    ({"r": "4"}, r"field 'r' must be a positive integer, found '4'"),
    ({"rank_pattern": {"q_proj(": 2}}, r"'rank_pattern' has key 'q_proj\(', not a valid regular expression"),
    ({"alpha_pattern": {"q_proj": "x"}}, r"'alpha_pattern' must map module patterns to numbers"),
]


@pytest.mark.parametrize(("fields", "message"), REFUSED_OPTIONS)
def test_refused_options(write, read, fields: dict, message: str):
    folder, _ = write()
    edit_config(folder, **fields)
    with pytest.raises(AdapterError, match=rf"adapter 'demo': adapter_config\.json .*{message}"):
        read(folder)


def test_shape_of_another_model(write, read):
    folder, _ = write()
    edit_tensors(folder, lambda t: t.update({f"{Q0}.lora_A.weight": torch.ones(4, 30)}))
    with pytest.raises(
        AdapterError,
        match=r"'.*q_proj\.lora_A\.weight' has shape \[4, 30\] and '.*lora_B\.weight' "
        r"\[64, 4\], but q_proj of layer 0 .* needs lora_A \[r, 32\] and lora_B \[64, r\]: an adapter "
        r"for another model\?",
    ):
        read(folder)


def test_fused_shape_of_another_model(write, read):
    folder, _ = write("mixtral", "fused")
    key = "base_model.model.model.layers.0.mlp.experts.lora_B.weight"
    edit_tensors(folder, lambda t: t.update({key: torch.ones(32, 12)}))
    with pytest.raises(AdapterError, match=r"\[32, 12\], but the experts' down .* lora_B \[32, r\*4\]"):
        read(folder, "mixtral")


@pytest.mark.parametrize(
    ("fam", "key", "message"),
    [
        ("qwen3_moe", "model.layers.7.self_attn.q_proj", r"is for layer 7, but the base model has 3 layers"),
        (
            "qwen3_moe",
            "model.layers.0.mlp.experts.8.gate_proj",
            r"is for expert 8, but the base model has 8 experts",
        ),
        (
            "mixtral",
            "model.layers.0.block_sparse_moe.experts.4.w1",
            r"is for expert 4, but the base model has 4",
        ),
        ("qwen3_moe", "model.layers.0.mlp.gate_proj", r"targets a dense MLP, but layer 0 is a MoE layer"),
        (
            "qwen3_moe",
            "model.layers.1.mlp.experts.0.gate_proj",
            r"targets routed experts, but layer 1 is a dense",
        ),
        ("qwen3_moe", "model.layers.1.mlp.experts", r"targets routed experts, but layer 1 is a dense"),
        (
            "qwen3_moe",
            "model.layers.0.mlp.shared_expert.up_proj",
            r"targets a shared expert, which the base model does not",
        ),
        (
            "qwen2_moe",
            "model.layers.0.mlp.shared_expert.up_proj",
            r"targets a shared expert, but layer 0 is a dense-MLP",
        ),
    ],
)
def test_index_and_layer_kind_errors(write, read, fam: str, key: str, message: str):
    folder, _ = write(fam)
    prefix = f"base_model.model.{key}"
    edit_tensors(
        folder,
        lambda t: t.update(
            {f"{prefix}.lora_A.weight": torch.ones(4, 32), f"{prefix}.lora_B.weight": torch.ones(16, 4)}
        ),
    )
    with pytest.raises(AdapterError, match=rf"adapter 'demo': '{prefix}\.lora_A\.weight' {message}"):
        read(folder, fam)


@pytest.mark.parametrize(("drop", "missing"), [("lora_B", "lora_B"), ("lora_A", "lora_A")])
def test_half_a_pair(write, read, drop: str, missing: str):
    folder, _ = write()
    edit_tensors(folder, lambda t: t.pop(f"{Q0}.{drop}.weight"))
    with pytest.raises(
        AdapterError, match=rf"has no {missing} for '.*layers\.0\.self_attn\.q_proj': the file is incomplete"
    ):
        read(folder)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_values(write, read, bad: float):
    folder, _ = write()
    B = load_file(str(folder / WEIGHTS))[f"{Q0}.lora_B.weight"].clone()
    B[3, 1] = bad
    edit_tensors(folder, lambda t: t.update({f"{Q0}.lora_B.weight": B}))
    with pytest.raises(AdapterError, match=r"'.*q_proj\.lora_B\.weight' contains NaN or Inf values"):
        read(folder)


def test_integer_tensor(write, read):
    folder, _ = write()
    edit_tensors(folder, lambda t: t.update({f"{Q0}.lora_A.weight": torch.ones(4, 32, dtype=torch.int32)}))
    with pytest.raises(AdapterError, match=r"q_proj\.lora_A\.weight' has dtype torch\.int32"):
        read(folder)


def test_tensor_rank_differs_from_config(write, read):
    folder, _ = write(rank=4)
    edit_config(folder, r=8)
    with pytest.raises(
        AdapterError, match=r"has rank 4, but adapter_config\.json gives 'model\.layers\.0\..*' r = 8"
    ):
        read(folder)


def test_fused_pair_without_target_parameters(write, read):
    folder, _ = write(form="fused", expert_projs=("down",))
    edit_config(folder, target_parameters=None)
    with pytest.raises(
        AdapterError, match=r"is a fused expert LoRA, but target_parameters \[\] .* does not tell"
    ):
        read(folder)


def test_two_adapters_in_one_file(write, read):
    folder, _ = write()
    edit_tensors(folder, lambda t: t.update({f"{Q0}.lora_A.other.weight": t[f"{Q0}.lora_A.weight"].clone()}))
    with pytest.raises(AdapterError, match=r"are both lora_A of .*two adapters in one file\?\): keep one"):
        read(folder)


def test_same_expert_twice(write, read):
    folder, _ = write("mixtral", layers=[0])
    edit_tensors(
        folder,
        lambda t: t.update(
            {k.replace("block_sparse_moe", "mlp"): t[k].clone() for k in list(t) if "experts.2.w3" in k}
        ),
    )
    with pytest.raises(AdapterError, match=r"both adapt expert 2's up in layer 0: keep one"):
        read(folder, "mixtral")


def test_empty_adapter(write, read):
    folder, _ = write(layers=[])
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors holds no LoRA tensors"):
        read(folder)


def test_missing_files(write, read):
    folder, _ = write()
    (folder / WEIGHTS).rename(folder / "adapter_model.bin")
    with pytest.raises(
        AdapterError, match=r"no adapter_model\.safetensors in .*there is an adapter_model\.bin.*is not read"
    ):
        read(folder)
    (folder / CONFIG).unlink()
    with pytest.raises(AdapterError, match=r"no adapter_config\.json in .*: is it a PEFT adapter folder\?"):
        read(folder)


@pytest.mark.parametrize(
    ("text", "message"), [("{r: 4", "is not valid JSON"), ("[4]", "must hold a JSON object")]
)
def test_malformed_config(write, read, text: str, message: str):
    folder, _ = write()
    (folder / CONFIG).write_text(text)
    with pytest.raises(AdapterError, match=rf"adapter_config\.json {message}"):
        read(folder)


def test_truncated_and_garbage_weights(write, read):
    folder, _ = write()
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[:-100])
    with pytest.raises(AdapterError, match=r"file '.*adapter_model\.safetensors' is truncated"):
        read(folder)
    (folder / WEIGHTS).write_bytes(b"not a safetensors file at all")
    with pytest.raises(
        AdapterError, match=r"adapter_model\.safetensors' is truncated or not a safetensors file"
    ):
        read(folder)


def test_path_that_is_not_a_directory(write, read, tmp_path: Path):
    folder, _ = write()
    with pytest.raises(AdapterError, match=r"adapter 'demo': '.*adapter_config\.json' is not a directory"):
        read(folder / CONFIG)
    with pytest.raises(AdapterError, match=r"'.*nowhere' does not exist"):
        read(tmp_path / "nowhere")


def test_reading_changes_nothing_on_error(write, read):
    folder, _ = write()
    edit_config(folder, use_dora=True)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(AdapterError):
        read(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ---- other trainers' expert layouts (tests/lora_files.py OTHER_FORMS cites each trainer's code)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("form", OTHER_FORMS)
def test_other_trainers_layouts_read_as_written(write, read, fam, form):
    folder, expected = write(fam, form, rank=4, alpha=8.0, seed=11)
    adapter = read(folder, fam)
    assert_reads_as(adapter, expected)
    layout = {
        "megatron_3d": "megatron-3d",
        "shared_outer": "megatron-shared-outer",
        "automodel": "nemo-automodel",
        "tinker": "tinker",
    }
    assert adapter.formats.get(layout[form], 0) > 0, adapter.formats


def test_shared_outer_on_an_expert_parallel_rank(write, models):
    """A rank that reads only its experts pairs the shared halves with those experts alone."""
    folder, expected = write("qwen3_moe", "shared_outer", seed=12)
    _, cfg, family = models["qwen3_moe"]
    adapter = read_adapter("a", folder, cfg, family, owns_expert=lambda e: e < 4)
    got = {(layer, proj, e) for (layer, proj), per in adapter.experts.items() for e in per}
    assert got == {k for k in expected.experts if k[2] < 4}


def test_stacked_layout_of_another_model_is_refused(write, read):
    """Megatron stacks of 6 experts against the model's 8: refused naming both shapes."""
    folder, _ = write("qwen3_moe", "megatron_3d", dense_targets=())
    edit_tensors(folder, lambda t: t.update({k: v[:6].contiguous() for k, v in t.items()}))
    with pytest.raises(AdapterError, match=r"down_proj.lora_A.*\[6, 4, 16\].*E = 8"):
        read(folder)


def test_automodel_layout_with_transposed_stacks_is_refused(write, read):
    """NeMo Automodel names with Megatron's axis order ([E, r, in]): never read as a no-op or transposed."""
    folder, _ = write("qwen3_moe", "automodel")

    def swap(t: dict[str, torch.Tensor]) -> None:
        for k in [k for k in t if "lora_down" in k]:
            t[k] = t[k].transpose(1, 2).contiguous()

    edit_tensors(folder, swap)
    with pytest.raises(AdapterError, match=r"lora_down_A.*NeMo Automodel"):
        read(folder)


def test_shared_outer_half_must_have_a_leading_one(write, read):
    folder, _ = write("qwen3_moe", "shared_outer")

    def widen(t: dict[str, torch.Tensor]) -> None:
        key = next(k for k in t if k.endswith("experts.gate_proj.lora_A.weight"))
        t[key] = torch.cat([t[key], t[key]])

    edit_tensors(folder, widen)
    with pytest.raises(AdapterError, match=r"leading dimension of 1"):
        read(folder)


@pytest.mark.parametrize("fam", FAMILIES)
def test_fused_experts_saved_by_peft_before_0191(write, read, fam):
    """PEFT 0.17-0.19.0's orientation (lora_A [r*E, out]): read by the shapes where they differ (down),
    by the recorded peft_version where in == out (the tiny Qwen3's gate_up: 32 x 32)."""
    folder, expected = write(fam, OLD_PEFT_FORM, seed=13)
    adapter = read(folder, fam)
    assert_reads_as(adapter, expected)
    assert adapter.formats.get("peft-fused-pre-0.19.1", 0) > 0, adapter.formats


def test_square_fused_experts_without_a_peft_version_are_refused(write, read):
    folder, _ = write("qwen3_moe", OLD_PEFT_FORM, seed=14)
    edit_config(folder, peft_version=None)
    with pytest.raises(AdapterError, match=r"both orientations.*peft_version"):
        read(folder)


@pytest.mark.parametrize("form", ["fused", "megatron_3d"])
def test_gate_up_with_only_one_half_is_refused(write, read, form):
    """gate_up's B holding only the gate rows (I instead of 2I): never read as a gate-only or shifted LoRA."""
    folder, _ = write("qwen3_moe", form, dense_targets=())

    def halve(t: dict[str, torch.Tensor]) -> None:
        for k in [k for k in t if "lora_B" in k and ("base_layer" in k or "gate_up_proj" in k)]:
            t[k] = (t[k][:16] if form == "fused" else t[k][:, :16]).contiguous()

    edit_tensors(folder, halve)
    with pytest.raises(AdapterError, match=r"lora_B.*\[(16, 32|8, 16, 4)\].*another"):
        read(folder)
