"""Block-FP8 checkpoints in the published layout (quantization_config fp8, weight_block_size, float8_e4m3fn
weights with weight_scale_inv per block, partial last blocks, bf16 and fp32 scales, sharded with an
index) load as the same model with its weights dequantised: against transformers on that dequantised
model, and slice by slice (a rank's rows cutting through a block); malformed ones are refused by name.
Their routed experts are served in FP8 by default, with the checkpoint's own values and scales."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelora import LLM
from moelora.loader.checkpoint import Checkpoint, CheckpointError
from moelora.loader.fp8 import Fp8Checkpoint
from tests.hf_models import build_hf_model, hf_logprobs, logprob_tol, save_per_expert

BLOCK = (16, 16)  # the tiny models' sizes (16, 24, 32, 48, 64) give whole and partial blocks
NOT_CONVERTED = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "shared_expert_gate")


def quantize(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale_inv per block, the dequantised weight in fp32) of a 2-D weight."""
    bo, bi = BLOCK
    rows, cols = w.shape
    grid = (math.ceil(rows / bo), math.ceil(cols / bi))
    scale = torch.zeros(grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            block = w[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi]
            scale[i, j] = block.abs().max().clamp(min=1e-8) / 448.0
    scale = scale.to(scale_dtype)
    full = scale.float().repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:rows, :cols]
    w8 = (w / full).to(torch.float8_e4m3fn)
    return w8, scale, w8.float() * full


def write_fp8(src: Path, fp8: Path, ref: Path) -> None:
    """From a saved fp32 checkpoint: the FP8 one (two shards and an index; bf16 scales in the first
    shard, fp32 in the second) and the reference holding exactly its dequantised weights."""
    state = load_file(str(src / "model.safetensors"))
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for n, (key, w) in enumerate(sorted(state.items())):
        if w.dim() != 2 or any(s in key for s in NOT_CONVERTED):
            quantized[key] = dequantized[key] = w
            continue
        w8, scale, deq = quantize(w, torch.bfloat16 if n % 2 else torch.float32)
        quantized[key], quantized[key.removesuffix(".weight") + ".weight_scale_inv"] = w8, scale
        dequantized[key] = deq
    config = json.loads((src / "config.json").read_text())
    for folder in (fp8, ref):
        folder.mkdir()
        for extra in src.iterdir():
            if extra.name not in ("model.safetensors", "config.json"):
                (folder / extra.name).write_bytes(extra.read_bytes())
    save_file(dequantized, str(ref / "model.safetensors"))
    (ref / "config.json").write_text(json.dumps(config))
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
        "modules_to_not_convert": ["lm_head"],
    }
    (fp8 / "config.json").write_text(json.dumps(config))
    keys = sorted(quantized)
    half = len(keys) // 2
    index: dict[str, Any] = {"metadata": {}, "weight_map": {}}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: quantized[k].contiguous() for k in part}, str(fp8 / name), metadata={"format": "pt"})
        index["weight_map"] |= dict.fromkeys(part, name)
    (fp8 / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe"])
def checkpoints(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(f"fp8-{request.param}")
    src = save_per_expert(build_hf_model(request.param), root / "src")
    write_fp8(src, root / "fp8", root / "ref")
    return request.param, root / "fp8", root / "ref"


def test_fp8_checkpoint_is_its_dequantised_model(checkpoints):
    """moelora on the FP8 checkpoint against transformers on the dequantised weights (fp32)."""
    from transformers import AutoModelForCausalLM

    family, fp8, ref = checkpoints
    hf = AutoModelForCausalLM.from_pretrained(
        str(ref), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    prompts = [[3, 17, 42, 8, 99, 5, 61], [11, 12, 13]]
    with LLM(str(fp8), device="cpu", dtype="float32", progress=False, num_kv_blocks=32) as llm:
        got = llm.logits(prompts)
    for prompt, logits in zip(prompts, got, strict=True):
        (want,) = hf_logprobs(hf, [prompt])
        assert (logits.float().log_softmax(-1) - want).abs().max() < logprob_tol(torch.float32), family


def test_a_slice_through_blocks_reads_the_dequantised_slice(checkpoints):
    """Rows and columns cut mid-block (as a TP rank's share of 24 or 48 rows over 2, 3 or 4 ranks): the
    slice of the dequantised tensor, exactly."""
    _, fp8, ref = checkpoints
    want = {}
    for f in ref.glob("*.safetensors"):
        want |= load_file(str(f))
    with Checkpoint(fp8) as ckpt:
        source = Fp8Checkpoint(ckpt, BLOCK)
        names = source.keys()
        assert not any(k.endswith("weight_scale_inv") for k in names)
        quantized = [k for k in names if want[k].dim() == 2]
        assert any(source.read(k).dtype == torch.float32 and ckpt.read(k).dtype == torch.float8_e4m3fn
                   for k in quantized)  # fmt: skip
        for key in quantized:
            rows, cols = ckpt.shape(key)
            for r0, r1, c0, c1 in (
                (0, rows, 0, cols),
                (5, rows - 3, 0, cols),
                (rows // 2, rows, 7, cols - 1),
            ):
                got = source.read(key, (slice(r0, r1), slice(c0, c1)))
                assert torch.equal(got, want[key][r0:r1, c0:c1].float()), (key, r0, r1, c0, c1)


def edited(fp8: Path, tmp_path: Path, edit) -> Path:
    """A copy of the FP8 checkpoint with `edit(tensors)` applied to its shards."""
    out = tmp_path / "edited"
    out.mkdir()
    for f in fp8.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
            edit(tensors)
            save_file(tensors, str(out / f.name))
        else:
            (out / f.name).write_bytes(f.read_bytes())
    return out


def first_scale(tensors: dict[str, torch.Tensor]) -> str | None:
    return next((k for k in sorted(tensors) if k.endswith("weight_scale_inv")), None)


def test_a_missing_scale_is_refused(checkpoints, tmp_path: Path):
    _, fp8, _ = checkpoints
    dropped: list[str] = []

    def drop(t: dict[str, torch.Tensor]) -> None:
        if not dropped and (key := first_scale(t)):
            dropped.append(key)
            del t[key]

    folder = edited(fp8, tmp_path, drop)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped[0]]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    weight = dropped[0].removesuffix("_scale_inv")
    with pytest.raises(CheckpointError, match=rf"'{weight}' .* float8_e4m3fn but has no '{dropped[0]}'"):
        LLM(str(folder), device="cpu", dtype="float32", progress=False, num_kv_blocks=8)


def test_a_scale_of_the_wrong_shape_is_refused(checkpoints, tmp_path: Path):
    _, fp8, _ = checkpoints

    def widen(t: dict[str, torch.Tensor]) -> None:
        if key := first_scale(t):
            t[key] = torch.cat([t[key], t[key]], dim=1)

    folder = edited(fp8, tmp_path, widen)
    with pytest.raises(CheckpointError, match=r"weight_scale_inv' has shape .* needs"):
        LLM(str(folder), device="cpu", dtype="float32", progress=False, num_kv_blocks=8)


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not read"),
        ({"quant_method": "fp8"}, "weight_block_size None must be two positive integers"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}, "dynamic"),
    ],
)
def test_other_quantisations_are_refused(checkpoints, tmp_path: Path, quant: dict, message: str):
    _, fp8, _ = checkpoints
    folder = edited(fp8, tmp_path, lambda t: None)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        LLM(str(folder), device="cpu", dtype="float32", progress=False, num_kv_blocks=8)


def test_fp8_under_tp2_ep2(checkpoints):
    """Two gloo ranks: each reads its shards' slices (Qwen2-MoE's shared expert, 24 rows, splits 12/12
    through a 16-row block), against transformers on the dequantised weights."""
    from transformers import AutoModelForCausalLM

    family, fp8, ref = checkpoints
    hf = AutoModelForCausalLM.from_pretrained(
        str(ref), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    prompts = [[3, 17, 42, 8, 99, 5, 61]]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with LLM(
            str(fp8), device="cpu", dtype="float32", progress=False, num_kv_blocks=32, tp_size=2, ep_size=2
        ) as llm:
            (logits,) = llm.logits(prompts)
    finally:
        torch.set_num_threads(before)
    (want,) = hf_logprobs(hf, prompts)
    assert (logits.float().log_softmax(-1) - want).abs().max() < logprob_tol(torch.float32), family


def test_fp8_weights_keep_the_checkpoint_values(checkpoints):
    """By default (quantization "auto") the FP8 weights of a block-FP8 checkpoint are served in FP8, the
    routed experts' and the linear layers': their FP8 values are the checkpoint's bit for bit and their
    scales its block scales, per row; what the checkpoint leaves unquantised (routers, gates) stays in
    --dtype. With "none" everything is dequantised into --dtype."""
    from moelora.layers.linear import ColumnLinear, RowLinear
    from moelora.layers.moe import FusedMoE

    _, fp8, _ = checkpoints
    tensors: dict[str, torch.Tensor] = {}
    for f in fp8.glob("*.safetensors"):
        tensors |= load_file(str(f))
    opts: dict[str, Any] = dict(device="cpu", dtype="float32", progress=False, num_kv_blocks=8)
    with LLM(str(fp8), **opts) as llm:
        experts = [m for m in llm.model.modules() if isinstance(m, FusedMoE)]
        assert experts and all(m.scales is not None and m.scales.group == BLOCK[1] for m in experts)
        linears = [m for m in llm.model.modules() if isinstance(m, (ColumnLinear, RowLinear))]
        routers = [m for m in linears if isinstance(m, ColumnLinear) and not m.lora_target]
        assert routers and all(m.scales is None and m.weight.dtype == torch.float32 for m in routers)
        served = [m for m in linears if m not in routers]
        assert served and all(m.scales is not None and m.scales.group == BLOCK[1] for m in served)
        checked = 0
        for spec in llm.model.weight_specs():
            if spec.fp8 is None:
                continue
            table = spec.fp8[0]
            (form,) = [f for f in spec.forms if f.name in ("per-expert", "")]
            for piece in form.pieces:  # whole rows and columns on one rank
                stored = tensors[piece.key]
                assert torch.equal(spec.param[piece.dst].view(torch.uint8), stored.view(torch.uint8))
                blocks = tensors[piece.key.removesuffix(".weight") + ".weight_scale_inv"].float()
                rows = blocks.repeat_interleave(BLOCK[0], 0)[: stored.shape[0]]
                assert torch.equal(table[piece.dst], rows), piece.key
                checked += 1
        assert checked == len(experts) * 3 * experts[0].w_down.shape[0] + sum(
            len(m.parts) if isinstance(m, ColumnLinear) else 1 for m in served
        )
    with LLM(str(fp8), quantization="none", **opts) as llm:
        assert all(m.scales is None and m.weight.dtype == torch.float32
                   for m in llm.model.modules() if isinstance(m, (ColumnLinear, RowLinear)))  # fmt: skip
        assert all(m.scales is None and m.w_down.dtype == torch.float32
                   for m in llm.model.modules() if isinstance(m, FusedMoE))  # fmt: skip


def test_fp8_experts_split_through_a_scale_group(checkpoints, capfd):
    """tp=2 without EP splits each expert's 16 intermediate columns 8 / 8, inside one 16-column scale
    block: the kernels' FP8 groups would be 8 columns. "auto" serves those experts in --dtype (a warning
    says so), still equal to transformers; "fp8" is refused with the reason."""
    from transformers import AutoModelForCausalLM

    family, fp8, ref = checkpoints
    hf = AutoModelForCausalLM.from_pretrained(
        str(ref), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    prompts = [[3, 17, 42, 8, 99, 5, 61]]
    opts: dict[str, Any] = dict(device="cpu", dtype="float32", progress=False, num_kv_blocks=32, tp_size=2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with LLM(str(fp8), **opts) as llm:
            (logits,) = llm.logits(prompts)
        err = capfd.readouterr().err
        assert "served in float32, not FP8" in err and "groups of 8" in err
        with pytest.raises(Exception, match="groups of 8"):  # from rank 0, or rank 1 (WorkerError)
            LLM(str(fp8), quantization="fp8", **opts)
    finally:
        torch.set_num_threads(before)
    (want,) = hf_logprobs(hf, prompts)
    assert (logits.float().log_softmax(-1) - want).abs().max() < logprob_tol(torch.float32), family


def test_fp8_checkpoint_with_an_adapter_in_a_mixed_batch(checkpoints, tmp_path: Path):
    """A per-expert adapter on the FP8 experts (and attention) next to base requests, one batch: against
    transformers on the dequantised weights with the adapter merged (float64)."""
    from transformers import AutoModelForCausalLM

    from tests.hf_models import assert_mixed_batch
    from tests.lora_files import ATTENTION, merged_hf_model, write_adapter

    family, fp8, ref = checkpoints
    hf = AutoModelForCausalLM.from_pretrained(
        str(ref), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    expected = write_adapter(
        tmp_path / "r8", family, hf.config, rank=8, alpha=4.0, form="per_expert", seed=7,
        dense_targets=ATTENTION,
    )  # fmt: skip
    references = {None: hf, "r8": merged_hf_model(hf, expected)}
    assert_mixed_batch(fp8, tmp_path / "r8", references, [[3, 17, 42, 8, 99, 5, 61], [11, 12, 13]], family)


def fuse_experts(fp8: Path, out: Path) -> dict[str, torch.Tensor]:
    """`fp8` with each layer's per-expert FP8 weights and block scales stacked into transformers 5's fused
    keys (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I], each `<key>_scale_inv` per
    expert and block): the same FP8 values (the intermediate is whole blocks, so gate and up rows never
    share a block). One shard; returns its tensors."""
    tensors: dict[str, torch.Tensor] = {}
    for f in fp8.glob("*.safetensors"):
        tensors |= load_file(str(f))
    fused: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        head, sep, tail = key.partition(".experts.")
        if not sep:
            fused[key] = t
            continue
        index, name = tail.split(".", 1)
        experts.setdefault(head + ".experts", {}).setdefault(int(index), {})[name] = t
    for prefix, by_expert in experts.items():
        ordered = [by_expert[e] for e in sorted(by_expert)]
        assert ordered[0]["gate_proj.weight"].shape[0] % BLOCK[0] == 0
        for name, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            for suffix, out_suffix in ((".weight", ""), (".weight_scale_inv", "_scale_inv")):
                stacked = torch.stack(
                    [torch.cat([p[part + suffix].float() for part in parts]) for p in ordered]
                )
                # the scales in fp32 (the experts' are bf16 or fp32: exact either way)
                weight = suffix == ".weight"
                fused[f"{prefix}.{name}{out_suffix}"] = stacked.to(torch.float8_e4m3fn) if weight else stacked
    out.mkdir()
    for extra in fp8.iterdir():
        if extra.suffix != ".safetensors" and extra.name != "model.safetensors.index.json":
            (out / extra.name).write_bytes(extra.read_bytes())
    save_file(fused, str(out / "model.safetensors"), metadata={"format": "pt"})
    return fused


def test_fused_fp8_experts(tmp_path: Path):
    """Fused 3-D FP8 expert keys with their per-expert block scales: served in FP8 with the checkpoint's
    values bit for bit (auto), dequantised (none), and on two ranks (tp=2 with ep=2: a rank reads its
    experts' slice of the fused tensors and scales; tp=2 without EP cuts the 16 intermediate columns into
    groups of 8, so those experts are read dequantised, as 3-D slices), each against transformers on the
    dequantised model."""
    from transformers import AutoModelForCausalLM

    from moelora.layers.moe import FusedMoE

    src = save_per_expert(build_hf_model("qwen3_moe"), tmp_path / "src")
    write_fp8(src, tmp_path / "fp8", tmp_path / "ref")
    tensors = fuse_experts(tmp_path / "fp8", tmp_path / "fused")
    ref = str(tmp_path / "ref")
    hf = AutoModelForCausalLM.from_pretrained(
        ref, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    prompts = [[3, 17, 42, 8, 99, 5, 61]]
    (want,) = hf_logprobs(hf, prompts)
    tol = logprob_tol(torch.float32)
    opts: dict[str, Any] = dict(device="cpu", dtype="float32", progress=False, num_kv_blocks=32)
    with LLM(str(tmp_path / "fused"), **opts) as llm:
        (logits,) = llm.logits(prompts)
        experts = [(n, m) for n, m in llm.model.named_modules() if isinstance(m, FusedMoE)]
        assert experts
        for name, m in experts:
            assert m.scales is not None and m.w_down.dtype == torch.float8_e4m3fn
            key = f"model.{name}.gate_up_proj"
            assert torch.equal(m.w_gate_up.view(torch.uint8), tensors[key].view(torch.uint8))
            blocks = tensors[key + "_scale_inv"].float().repeat_interleave(BLOCK[0], 1)
            assert torch.equal(m.scales.gate_up, blocks), key
    assert (logits.float().log_softmax(-1) - want).abs().max() < tol
    with LLM(str(tmp_path / "fused"), quantization="none", **opts) as llm:
        (logits,) = llm.logits(prompts)
        assert all(m.scales is None for m in llm.model.modules() if isinstance(m, FusedMoE))
    assert (logits.float().log_softmax(-1) - want).abs().max() < tol
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for ep in (2, 1):
            with LLM(str(tmp_path / "fused"), tp_size=2, ep_size=ep, **opts) as llm:
                (logits,) = llm.logits(prompts)
            assert (logits.float().log_softmax(-1) - want).abs().max() < tol, ep
    finally:
        torch.set_num_threads(before)
