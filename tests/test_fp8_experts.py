"""`quantization="fp8"`: the routed experts held in FP8 with a scale per row and 128 input columns.
Against transformers (fp32, eager) on the same model with its expert weights replaced by their
dequantised FP8 values, without and with a per-expert adapter in one batch (the reference merges the
adapter into the dequantised weights), on one rank and under tp=2/ep=2; on the twins and through the
Triton kernels (the interpreter on CPU)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from moelora import LLM, ops
from moelora.layers.moe import FusedMoE
from moelora.ops.torch.fp8 import dequantize_rows, quantize_rows
from tests.hf_models import assert_mixed_batch, build_hf_model, hf_logprobs, logprob_tol, save_per_expert
from tests.lora_files import ATTENTION, merged_hf_model, write_adapter

PROMPTS = [[3, 17, 42, 8, 99, 5, 61, 7, 23], [11, 12, 13]]


def fp8_reference(hf: Any, shares: int = 1) -> Any:
    """A copy of the transformers model whose routed experts' weights are their FP8 values, dequantised
    (per row and 128 columns, as moelora quantises them), with the down projection's columns quantised in
    `shares` equal parts (each rank's share of the intermediate where TP splits it)."""
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for layer in ref.model.layers:
            experts = getattr(layer.mlp, "experts", None)
            if experts is None:
                continue
            for name, parts in (("gate_up_proj", 1), ("down_proj", shares)):
                w = getattr(experts, name)
                for part in w.data.chunk(parts, dim=-1):
                    w8, scales = quantize_rows(part, 128)
                    part.copy_(dequantize_rows(w8, scales, 128, torch.float32))
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


def test_fp8_experts_match_transformers_on_the_dequantised_weights(model, backend: str):
    family, hf, folder = model
    opts = dict(device="cpu", dtype="float32", progress=False, num_kv_blocks=32, kernel_backend=backend)
    with LLM(str(folder), quantization="fp8", **opts) as llm:
        experts = [m for m in llm.model.modules() if isinstance(m, FusedMoE)]
        assert experts and all(m.w_gate_up.dtype == torch.float8_e4m3fn for m in experts)
        got = llm.logits(PROMPTS)
    tol = logprob_tol(torch.float32)
    for prompt, logits in zip(PROMPTS, got, strict=True):
        (want,) = hf_logprobs(fp8_reference(hf), [prompt])
        assert (logits.float().log_softmax(-1) - want).abs().max() < tol, family
        # FP8 moves the log-probs well past the tolerance: a model left in fp32 cannot pass.
        (exact,) = hf_logprobs(hf, [prompt])
        assert (exact - want).abs().max() > 10 * tol, family


def test_fp8_experts_with_an_adapter_in_a_mixed_batch(model, tmp_path: Path):
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
def test_fp8_experts_under_tp2(model, ep: int, shares: int):
    """Two gloo ranks, each quantising its own share: ep=2 gives each rank whole experts; ep=1 splits
    every expert's intermediate, so each rank quantises its half of the down projection's columns (the
    whole-row reference fails there: tried)."""
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
    (want,) = hf_logprobs(fp8_reference(hf, shares), PROMPTS[:1])
    assert (logits.float().log_softmax(-1) - want).abs().max() < logprob_tol(torch.float32), family


def test_fp8_on_mxfp4_experts_is_refused(tmp_path: Path):
    """MXFP4 experts would be quantised a second time (lossy): refused before anything is read."""
    folder = save_per_expert(build_hf_model("qwen3_moe"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="MXFP4: they would be quantised a second time"):
        LLM(str(folder), device="cpu", dtype="float32", progress=False, quantization="fp8")
