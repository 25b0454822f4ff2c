"""`moelora adapter inspect` / `convert`: the layouts each adapter was written in are named, the fit is
checked against the model, and a converted adapter holds, by PEFT's own per-expert rules (read here with
PEFT's pattern matcher, not moelora's reader), exactly the deltas the writer put in the original."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

from moelora.cli import main
from moelora.loader.model_loader import read_model_config
from moelora.lora.inspect import convert_adapter, format_report, inspect_adapter
from moelora.models.registry import FAMILIES as REGISTRY
from tests.hf_models import FAMILIES, build_hf_model, family_configs, hf_logprobs, logprob_tol
from tests.lora_files import ATTENTION, FORMS, MLA_ATTENTION, ExpectedLora, merged_hf_model, write_adapter

ARCHITECTURE = {f.name: f.architectures[0] for f in REGISTRY}
LAYOUT = {"per_expert": "peft-per-expert", "fused": "peft-fused", "converted": "peft-fused-2r"}
EXPERT_NAMES = {"mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"})}
DEFAULT_NAMES = ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path, Any, Any]]:
    """family -> (HF config, config folder, moelora ModelConfig, Family)."""
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for fam, hf in family_configs().items():
        hf.architectures = [ARCHITECTURE[fam]]
        hf.save_pretrained(root / fam)
        out[fam] = (hf, root / fam, *read_model_config(root / fam))
    return out


def peft_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """module -> s * B @ A (float64) by PEFT's rules for linear layers: s = alpha / r from the config, the
    module's rank_pattern / alpha_pattern entry (PEFT's own matcher) where one applies."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        pattern = get_pattern_key(list(cfg["rank_pattern"]), module)
        r = cfg["rank_pattern"].get(pattern, cfg["r"])
        pattern = get_pattern_key(list(cfg["alpha_pattern"]), module)
        alpha = cfg["alpha_pattern"].get(pattern, cfg["lora_alpha"])
        assert A.shape[0] == r, module
        out[module] = alpha / r * B.double() @ A.double()
    return out


def expected_deltas(fam: str, expected: ExpectedLora) -> dict[str, torch.Tensor]:
    prefix, names = EXPERT_NAMES.get(fam, DEFAULT_NAMES)
    out = {}
    for (layer, target), (A, B, s) in expected.dense.items():
        block = "self_attn" if target in ATTENTION + MLA_ATTENTION else "mlp"
        out[f"model.layers.{layer}.{block}.{target}"] = s * B.double() @ A.double()
    for (layer, proj, e), (A, B, s) in expected.experts.items():
        out[f"model.layers.{layer}.{prefix}.experts.{e}.{names[proj]}"] = s * B.double() @ A.double()
    return out


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("form", FORMS)
def test_convert_keeps_every_delta(models, tmp_path: Path, fam: str, form: str):
    hf, _, cfg, family = models[fam]
    kw: dict[str, Any] = {"rank": 4, "alpha": 8.0, "seed": 3}
    if form == "per_expert":  # some experts only, and another alpha for o_proj
        kw |= {"experts": [0, 2, 3], "alpha_pattern": {"o_proj": 2.0}}
    expected = write_adapter(tmp_path / "src", fam, hf, form=form, **kw)
    report = inspect_adapter(tmp_path / "src", (fam, cfg, family))
    assert report.fits, report.error
    assert report.formats.get(LAYOUT[form], 0) > 0, report.formats
    assert set(report.experts) == {"gate", "up", "down"}
    convert_adapter(tmp_path / "src", tmp_path / "out", (fam, cfg, family))
    got, want = peft_deltas(tmp_path / "out"), expected_deltas(fam, expected)
    assert set(got) == set(want)
    for module, delta in want.items():
        torch.testing.assert_close(got[module], delta, rtol=1e-6, atol=1e-7, msg=module)
    again = inspect_adapter(tmp_path / "out", (fam, cfg, family))
    assert again.fits and set(again.formats) <= {"peft-linear", "peft-per-expert"}, again.formats


def test_converted_adapter_runs_in_peft_as_the_merge(models, tmp_path: Path):
    """PEFT itself loads the converted file (Qwen3-MoE: it reads per-expert keys correctly) and its
    logits are the manual merge of the original fused adapter's deltas."""
    from peft import PeftModel

    hf, _, cfg, family = models["qwen3_moe"]
    expected = write_adapter(tmp_path / "src", "qwen3_moe", hf, form="fused", rank=4, alpha=4.0, seed=7)
    convert_adapter(tmp_path / "src", tmp_path / "out", ("qwen3_moe", cfg, family))
    ids = torch.tensor([[3, 17, 42, 8, 99, 5]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(build_hf_model("qwen3_moe"), str(tmp_path / "out")).eval()
    merged = merged_hf_model(build_hf_model("qwen3_moe"), expected)
    with torch.no_grad():
        want = merged(ids).logits.float()
        assert (want - build_hf_model("qwen3_moe")(ids).logits).abs().max() > 1.0  # the LoRA shows
        torch.testing.assert_close(peft_model(ids).logits, want, atol=logprob_tol(torch.float32), rtol=0)


def test_inspect_without_a_model_guesses_from_names(models, tmp_path: Path):
    write_adapter(tmp_path / "a", "qwen3_moe", models["qwen3_moe"][0], form="fused", rank=4, alpha=8, seed=1)
    report = inspect_adapter(tmp_path / "a")
    assert report.fits is None and report.formats.get("peft-fused") == 2 * 2  # gate_up, down x 2 layers
    assert "not checked" in format_report(report)


def test_inspect_names_why_an_adapter_does_not_fit(models, tmp_path: Path, capsys):
    """A Qwen2-MoE adapter (6 experts) against the Qwen3-MoE model (8): refused with the reason, exit 1."""
    write_adapter(tmp_path / "a", "qwen2_moe", models["qwen2_moe"][0], form="fused", rank=4, alpha=8, seed=1)
    code = main(["adapter", "inspect", str(tmp_path / "a"), "--model", str(models["qwen3_moe"][1])])
    out = capsys.readouterr().out
    assert code == 1 and "fits" in out and "NO" in out and "lora_A" in out, out


def test_cli_convert_then_inspect(models, tmp_path: Path, capsys):
    hf, folder = models["mixtral"][:2]
    write_adapter(tmp_path / "a", "mixtral", hf, form="converted", rank=4, alpha=8, seed=2)
    assert main(["adapter", "convert", str(tmp_path / "a"), str(tmp_path / "b"), "--model", str(folder)]) == 0
    assert main(["adapter", "inspect", str(tmp_path / "b"), "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "yes" in out and "peft-per-expert" in out, out
    # An existing adapter is never overwritten.
    code = main(["adapter", "convert", str(tmp_path / "a"), str(tmp_path / "b"), "--model", str(folder)])
    assert code == 2 and "already holds an adapter" in capsys.readouterr().err


@pytest.mark.parametrize("fam", ["qwen3_moe", "mixtral"])
def test_other_trainers_layouts_served_in_one_mixed_batch(fam, hf_models, checkpoints, tmp_path: Path):
    """Megatron-Bridge stacks, its shared-outer export, NeMo Automodel's grouped experts and Tinker's raw
    expert tensors (attention under `attn`), with a PEFT
    per-expert adapter and base requests, in one fp32 batch: each request against transformers with its
    adapter merged by hand (float64 reference)."""
    import copy

    from moelora import LLM
    from tests.test_lora_hf import check_against, prompts, run_mixed

    hf = hf_models[fam]
    specs = {
        "per-expert": dict(form="per_expert", rank=4, alpha=2.0, seed=21),
        "megatron-3d": dict(form="megatron_3d", rank=4, alpha=2.0, seed=22),
        "shared-outer": dict(form="shared_outer", rank=8, alpha=4.0, seed=23),
        "automodel": dict(form="automodel", rank=4, alpha=2.0, seed=24),
        "tinker": dict(form="tinker", rank=4, alpha=4.0, seed=25),
    }
    adapters = {n: write_adapter(tmp_path / n, fam, hf.config, **kw) for n, kw in specs.items()}
    llm = LLM(
        str(checkpoints[fam]),
        device="cpu",
        progress=False,
        num_kv_blocks=96,
        lora_modules={n: str(tmp_path / n) for n in specs},
        max_loras_per_batch=5,
        dtype="float32",
    )
    try:
        lora, batch, outs = run_mixed(llm, list(specs))
        assert any(len(set(step)) >= 4 for step in llm.engine.loras.history)
    finally:
        llm.shutdown()
    refs = {None: copy.deepcopy(hf).to(torch.float64)} | {
        n: merged_hf_model(hf, exp).to(torch.float64) for n, exp in adapters.items()
    }
    for name, prompt, out in zip(lora, batch, outs, strict=True):
        check_against(refs[name], prompt, out, f"{fam}/{name or 'base'}", logprob_tol(torch.float32))
    (plain,) = hf_logprobs(refs[None], [prompts()[1]])
    for name in specs:  # each adapter moves the log-probs far beyond the tolerance: a no-op cannot pass
        (merged,) = hf_logprobs(refs[name], [prompts()[1]])
        assert (merged - plain).abs().max() > 100 * logprob_tol(torch.float32), name
