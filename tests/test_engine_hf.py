"""Generation through the engine against Hugging Face transformers (`generate` and full forwards)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from moelora import LLM, SamplingParams
from tests.hf_models import FAMILIES, VOCAB, float64, hf_logprobs, logprob_tol

NEW_TOKENS = 16
NEAR_TIE = 1e-3
TOL = logprob_tol(torch.float32)  # the engines below run in fp32


@torch.no_grad()
def hf_greedy(model: Any, prompt: list[int], new_tokens: int = NEW_TOKENS) -> tuple[list[int], list[float]]:
    """HF greedy continuation (EOS ignored, float64) and the top-2 logit margin at each step."""
    out = float64(model).generate(
        torch.tensor([prompt]),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    margins = [float(v[0, 0] - v[0, 1]) for v in (step.topk(2).values for step in out.logits)]
    return out.sequences[0, len(prompt) :].tolist(), margins


def agree_until_near_tie(ours: list[int], ref: list[int], margins: list[float]) -> None:
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if margins[i] < NEAR_TIE:
            return
        assert a == b, f"token {i}: moelora {a}, transformers {b} (margin {margins[i]:.4f})"


@pytest.fixture(scope="module")
def llms(checkpoints: dict[str, Path]):
    engines = {f: LLM(str(checkpoints[f]), device="cpu", progress=False, num_kv_blocks=64) for f in FAMILIES}
    yield engines
    for llm in engines.values():
        llm.shutdown()


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 13, 1, 9)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_and_logprobs_match_transformers_with_staggered_arrivals(
    family: str, hf_models: dict[str, Any], llms: dict[str, LLM]
):
    check_staggered(hf_models[family], llms[family].engine, prompts())


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_matches_transformers(family: str, hf_models: dict[str, Any], checkpoints):
    """A step budget of 8 tokens: the prompts of 9, 13 and 23 tokens are computed in parts, beside the
    other sequences' decoding, their prompt log-probs too; outputs and log-probs as transformers'."""
    budget = 8
    with LLM(
        str(checkpoints[family]),
        device="cpu",
        progress=False,
        num_kv_blocks=64,
        max_num_batched_tokens=budget,
        max_num_seqs=4,
    ) as llm:
        engine = llm.engine
        assert engine.chunked_prefill
        since = time.perf_counter()
        g = torch.Generator().manual_seed(8)
        check_staggered(
            hf_models[family],
            engine,
            [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (23, 5, 13, 9)],
        )
        records = engine.step_records(since)
    assert all(r.prefill_tokens + r.decode_tokens <= budget for r in records)
    assert any(r.prefill_tokens and r.decode_tokens for r in records), "a part beside decoding"


def check_staggered(model: Any, engine: Any, prompt_list: list[list[int]]) -> None:
    """The prompts submitted one after another (each once the one before has output), greedy with
    log-probs and prompt log-probs, against transformers."""
    params = SamplingParams(
        temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3, prompt_logprobs=2
    )
    streams = []
    for p in prompt_list:
        stream = engine.submit_stream(p, params)
        streams.append(stream)
        # Let the running batch take a few steps before the next request joins it.
        while not stream._items and not stream.finished:
            time.sleep(0.001)
    outputs = [s.result() for s in streams]
    for prompt, out in zip(prompt_list, outputs, strict=True):
        ref_tokens, margins = hf_greedy(model, prompt)
        agree_until_near_tie(out.token_ids, ref_tokens, margins)
        assert out.finish_reason == "length" and len(out.token_ids) == NEW_TOKENS
        # Log-probs of our own sequence, recomputed by transformers in one forward pass.
        full = prompt + out.token_ids
        (ref,) = hf_logprobs(model, [full])
        assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
        for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
            assert entry is not None and full[i] in entry and len(entry) <= 3
            for tok, lp in entry.items():
                assert abs(lp - ref[i - 1, tok].item()) < TOL, (i, tok, lp, ref[i - 1].topk(3))
        assert out.logprobs is not None and len(out.logprobs) == NEW_TOKENS
        for j, entry in enumerate(out.logprobs):
            pos = len(prompt) + j - 1
            top = ref[pos].topk(3).indices.tolist()
            assert set(top) <= set(entry) and out.token_ids[j] in entry
            for tok, lp in entry.items():
                assert abs(lp - ref[pos, tok].item()) < TOL
