"""`quantization="fp8"`: the routed experts and the linear layers adapters may target (attention, the
shared expert) held in FP8 with a scale per row and 128 input columns; routers and gates stay. Against
transformers (fp32, eager) on the same model with those weights replaced by their dequantised FP8 values,
without and with an adapter (per-expert and attention) in one batch (the reference merges the adapter
into the dequantised weights), on one rank and under tp=2/ep=2; on the twins and through the Triton
kernels (the interpreter on CPU)."""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from moelora import LLM, ops
from moelora.layers.linear import ColumnLinear, RowLinear
from moelora.layers.moe import FusedMoE
from moelora.ops.torch.fp8 import dequantize_rows, quantize_rows
from tests.hf_models import assert_mixed_batch, build_hf_model, hf_logprobs, logprob_tol, save_per_expert
from tests.lora_files import ATTENTION, merged_hf_model, write_adapter

PROMPTS = [[3, 17, 42, 8, 99, 5, 61, 7, 23], [11, 12, 13]]
# Linear layers moelora keeps in --dtype under "fp8" (routers, gates, linear attention's b/a, latent
# attention's kv_b, which decode absorbs), and those whose input TP splits (row-parallel).
_KEPT = {"gate", "shared_expert_gate", "in_proj_ba", "in_proj_b", "in_proj_a", "kv_b_proj"}
_ROW_PARALLEL = {"o_proj", "down_proj", "w2", "out_proj"}


def _fake_quantize(w: torch.Tensor, shares: int) -> None:
    """w [..., N, K] in place: its FP8 values dequantised, per row and 128 columns within each of
    `shares` equal column shares (each rank's, where TP splits the input)."""
    for part in w.data.chunk(shares, dim=-1):
        w8, scales = quantize_rows(part, 128)
        part.copy_(dequantize_rows(w8, scales, 128, torch.float32))


def fp8_reference(hf: Any, expert_shares: int = 1, tp: int = 1) -> Any:
    """A copy of the transformers model whose routed experts and linear layers (but those in `_KEPT`) hold
    their FP8 values, dequantised as moelora quantises them: the experts' down projection in
    `expert_shares` column shares (each rank's share of the intermediate), the row-parallel layers in `tp`
    column shares. Experts as transformers 5 fuses them: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for layer in ref.model.layers:
            for name, module in layer.named_modules():
                leaf = name.rsplit(".", 1)[-1]
                if isinstance(module, torch.nn.Linear) and leaf not in _KEPT:
                    _fake_quantize(module.weight, tp if leaf in _ROW_PARALLEL else 1)
                gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
                if isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter):
                    _fake_quantize(gate_up, 1)
                    _fake_quantize(down, expert_shares)
    return ref


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe"])
def model(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    hf = build_hf_model(request.param)
    return request.param, hf, save_per_expert(hf, tmp_path_factory.mktemp(f"fp8q-{request.param}"))


@pytest.fixture(params=["torch", "triton"])
def backend(request) -> str:
    """The twins, or every op on its Triton kernel (the interpreter on CPU)."""
    if request.param == "triton":
        pytest.importorskip("triton")
        request.addfinalizer(lambda: ops.use_backend("auto"))  # the process's choice, for the tests after
    return request.param


def test_fp8_matches_transformers_on_the_dequantised_weights(model, backend: str):
    family, hf, folder = model
    opts = dict(device="cpu", dtype="float32", progress=False, num_kv_blocks=32, kernel_backend=backend)
    with LLM(str(folder), quantization="fp8", **opts) as llm:
        experts = [m for m in llm.model.modules() if isinstance(m, FusedMoE)]
        assert experts and all(m.w_gate_up.dtype == torch.float8_e4m3fn for m in experts)
        linears = [m for m in llm.model.modules() if isinstance(m, (ColumnLinear, RowLinear))]
        fp8 = {m.weight.dtype == torch.float8_e4m3fn for m in linears if getattr(m, "lora_target", True)}
        routers = [m for m in linears if not getattr(m, "lora_target", True)]
        assert fp8 == {True} and routers and all(m.scales is None for m in routers)
        got = llm.logits(PROMPTS)
    tol = logprob_tol(torch.float32)
    for prompt, logits in zip(PROMPTS, got, strict=True):
        (want,) = hf_logprobs(fp8_reference(hf), [prompt])
        assert (logits.float().log_softmax(-1) - want).abs().max() < tol, family
        # FP8 moves the log-probs well past the tolerance: a model left in fp32 cannot pass.
        (exact,) = hf_logprobs(hf, [prompt])
        assert (exact - want).abs().max() > 10 * tol, family


def test_fp8_with_an_adapter_in_a_mixed_batch(model, tmp_path: Path):
    """A per-expert adapter (LoRA in fp32 on the FP8 experts) and base requests in one batch."""
    family, hf, folder = model
    expected = write_adapter(
        tmp_path / "r8", family, hf.config, rank=8, alpha=4.0, form="per_expert", seed=5,
        dense_targets=ATTENTION,
    )  # fmt: skip
    base = fp8_reference(hf)
    references = {None: base, "r8": merged_hf_model(base, expected)}
    assert_mixed_batch(folder, tmp_path / "r8", references, PROMPTS, family, quantization="fp8")


@pytest.mark.parametrize(("ep", "shares"), [(2, 1), (1, 2)])
def test_fp8_under_tp2(model, ep: int, shares: int):
    """Two gloo ranks, each quantising its own share: ep=2 gives each rank whole experts; ep=1 splits
    every expert's intermediate, so each rank quantises its half of the down projection's columns (the
    whole-row reference fails there: tried); o_proj and the shared expert's down_proj are split by TP
    either way."""
    family, hf, folder = model
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with LLM(
            str(folder), device="cpu", dtype="float32", progress=False, num_kv_blocks=32, tp_size=2,
            ep_size=ep, quantization="fp8",
        ) as llm:  # fmt: skip
            (logits,) = llm.logits(PROMPTS[:1])
    finally:
        torch.set_num_threads(before)
    (want,) = hf_logprobs(fp8_reference(hf, shares, tp=2), PROMPTS[:1])
    assert (logits.float().log_softmax(-1) - want).abs().max() < logprob_tol(torch.float32), family


@pytest.mark.parametrize(
    "family", ["mixtral", "olmoe", "glm4_moe", "deepseek_v3", "deepseek_v2", "qwen3_next", "qwen3_5_moe"]
)
def test_fp8_in_every_family(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The other families' linear layers (latent attention's, linear attention's, OLMoE's and GLM's) and
    experts in FP8, against transformers on the same weights dequantised (on the twins). The linear-attention
    families in float64 against transformers' recurrent delta rule (its chunked fp32 one differs by more than
    the tolerance: see test_qwen3_next.py); both keep the delta rule and norms in fp32, whose rounding one
    position of PROMPTS[0] magnifies in Qwen3.5 (3.4e-4 with FP8 weights, 7e-5 without), so another prompt
    (every position within 4e-5 there)."""
    hf = build_hf_model(family)
    folder = save_per_expert(hf, tmp_path / family)
    ref, dtype = fp8_reference(hf), "float32"
    if family in ("qwen3_next", "qwen3_5_moe"):
        from tests.test_qwen3_next import recurrent

        modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        ref, dtype = recurrent(ref, monkeypatch, modeling), "float64"
    opts = dict(device="cpu", dtype=dtype, progress=False, num_kv_blocks=32, quantization="fp8")
    prompts = [[5, 9, 33, 21, 8, 77, 2, 40]]
    with LLM(str(folder), **opts) as llm:
        got = llm.logits(prompts)
    (want,) = hf_logprobs(ref, prompts)
    assert (got[0].double().log_softmax(-1) - want).abs().max() < logprob_tol(dtype), family


def test_fp8_on_mxfp4_experts_is_refused(tmp_path: Path):
    """MXFP4 experts would be quantised a second time (lossy): refused before anything is read."""
    folder = save_per_expert(build_hf_model("qwen3_moe"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="MXFP4: they would be quantised a second time"):
        LLM(str(folder), device="cpu", dtype="float32", progress=False, quantization="fp8")


def test_the_plan_says_what_is_fp8():
    """The serving line's words for the plan: online FP8, and a checkpoint's names."""
    from moelora.ops.fp8 import Fp8Weights

    assert Fp8Weights(None, True).describe() == "FP8 experts and linear layers"
    assert (
        Fp8Weights(128, False, True, frozenset({"q_proj", "o_proj"})).describe()
        == "FP8 experts and o_proj, q_proj"
    )
    assert Fp8Weights(128, False, False, frozenset({"down_proj"})).describe() == "FP8 down_proj"
