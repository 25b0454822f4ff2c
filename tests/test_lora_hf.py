"""Mixed adapter batches through the engine against references nobody here wrote: transformers with the
LoRA merged by hand (`W += s * B @ A`, fp32), and PEFT itself where it loads the adapter correctly."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch

from moelora import LLM, SamplingParams
from moelora.engine.request import RequestOutput
from tests.hf_models import FAMILIES, VOCAB, float64, hf_logprobs, logprob_tol
from tests.lora_files import merged_hf_model
from tests.test_engine_hf import NEW_TOKENS, agree_until_near_tie, hf_greedy

TOL = logprob_tol(torch.float64)

LAYOUTS = [
    *[pytest.param((f, d, "cpu"), id=f"{f}-{d}") for f in FAMILIES for d in ("float32", "float64")],
    # On a GPU the same batch runs through the Triton MoE and LoRA kernels (fp32: full-precision dots).
    *[pytest.param((f, "float32", "cuda"), id=f"{f}-float32-cuda", marks=pytest.mark.gpu) for f in FAMILIES],
]


@pytest.fixture(scope="module", params=LAYOUTS)
def setup(request, checkpoints, mixed_adapters):
    """(family, dtype, LLM with the three adapters, {name: (folder, ExpectedLora)}) per family and dtype.

    float32 is what users run, compared with transformers in fp32. float64 takes fp32 rounding out of
    both sides (transformers keeps only its norms, rotary angles and router softmax in fp32 then), so the
    same tolerance there bounds the LoRA arithmetic far more tightly."""
    family, dtype, device = request.param
    adapters = mixed_adapters[family]
    llm = LLM(
        str(checkpoints[family]),
        device=device,
        progress=False,
        num_kv_blocks=96,
        lora_modules={name: str(folder) for name, (folder, _) in adapters.items()},
        max_loras_per_batch=3,
        dtype=dtype,
    )
    yield family, getattr(torch, dtype), llm, adapters
    llm.shutdown()


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 11, 2)]


def check_against(model: Any, prompt: list[int], out: RequestOutput, where: str, tol: float = TOL) -> None:
    """Greedy tokens up to the reference's first near-tie; every reported log-prob within TOL."""
    ref_tokens, margins = hf_greedy(model, prompt)
    agree_until_near_tie(out.token_ids, ref_tokens, margins)
    full = prompt + out.token_ids
    (ref,) = hf_logprobs(model, [full])
    assert out.prompt_logprobs is not None
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry is not None and full[i] in entry
        for tok, lp in entry.items():
            assert abs(lp - ref[i - 1, tok].item()) < tol, (
                where,
                "prompt",
                i,
                tok,
                lp,
                ref[i - 1, tok].item(),
            )
    assert out.logprobs is not None and len(out.logprobs) == NEW_TOKENS
    for j, entry in enumerate(out.logprobs):
        pos = len(prompt) + j - 1
        for tok, lp in entry.items():
            assert abs(lp - ref[pos, tok].item()) < tol, (where, "decode", j, tok, lp, ref[pos, tok].item())


def run_mixed(llm: LLM, adapters: list[str]) -> tuple[list[str | None], list[list[int]], list[RequestOutput]]:
    """Every prompt on the base model and on each adapter, in one greedy batch with log-probs:
    (each request's adapter, its prompt, its output)."""
    names: list[str | None] = [None, *adapters]
    lora = [name for name in names for _ in prompts()]
    batch = [p for _ in names for p in prompts()]
    params = SamplingParams(
        temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2, prompt_logprobs=2
    )
    return lora, batch, llm.generate(batch, params, lora=lora)


def test_mixed_batch_matches_merged_transformers(setup, hf_models):
    family, dtype, llm, adapters = setup
    base = hf_models[family]
    # The references run in float64; moelora's fp32 runs (CPU, or GPU with its own summation order) are
    # held to them within fp32's tolerance (tests/hf_models.py says how it is derived).
    ref_dtype, tol = torch.float64, logprob_tol(dtype)
    lora, batch, outs = run_mixed(llm, list(adapters))
    # The adapters took part in the same steps as the base requests: one batch, all four present.
    assert any(len(set(step)) >= 3 for step in llm.engine.loras.history), llm.engine.loras.history
    references = {None: copy.deepcopy(base).to(ref_dtype)} | {
        n: merged_hf_model(base, exp).to(ref_dtype) for n, (_, exp) in adapters.items()
    }
    for name, prompt, out in zip(lora, batch, outs, strict=True):
        check_against(references[name], prompt, out, f"{family}/{name or 'base'}", tol)
    # Each adapter moves the log-probs well beyond the tolerance, so a dropped LoRA cannot pass.
    (plain,) = hf_logprobs(references[None], [prompts()[1]])
    for name in adapters:
        (merged,) = hf_logprobs(references[name], [prompts()[1]])
        assert (merged - plain).abs().max() > 100 * TOL, name


def test_peft_agrees_where_it_loads_correctly(setup, hf_models):
    """PEFT's own model on the fused-form adapter (reference/peft_moe_format.md: it drops per-expert
    tensors on Qwen2-MoE, so that family is left to the manual merge)."""
    family, dtype, llm, adapters = setup
    if family == "qwen2_moe":
        pytest.skip("PEFT 0.21 silently ignores expert LoRA on Qwen2-MoE")
    from peft import PeftModel

    folder, _ = adapters["r8-fused"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(float64(hf_models[family])), str(folder))
        peft_model = peft_model.to(torch.float64).eval()
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=4)
    outs = llm.generate(prompts(), params, lora="r8-fused")
    for prompt, out in zip(prompts(), outs, strict=True):
        with torch.no_grad():
            ref = peft_model(torch.tensor([prompt])).logits[0].log_softmax(-1)
        assert out.prompt_logprobs is not None
        for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
            assert entry is not None
            for tok, lp in entry.items():
                assert abs(lp - ref[i - 1, tok].item()) < logprob_tol(dtype), (family, i, tok)
