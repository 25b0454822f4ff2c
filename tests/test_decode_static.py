"""The CUDA-graph decode path's inputs on the CPU: with `ops.graph_safe` patched on, decode steps run
through `DecodeGraphs`' static buffers (padded to the graph sizes: padding rows on the spare KV block, no
adapter, state slot -1) eagerly, as the graphs would replay them. Tokens and log-probs equal the ordinary
eager path's, for an attention model with adapters, the hybrid linear-attention model (state slots, a
one-token prompt admitted while the others decode, which must start from zeros, n > 1 forks; at most three
sequences at a time, so later prompts join decoding batches and reuse freed slots) and DeepSeek's latent
attention. In float64 (the routers' scores in fp32, as transformers computes them): the padded batches
change only the sums' blocking, so a wrong row or slot shows (tenths), rounding does not (up to 2e-6)."""

from __future__ import annotations

import pytest
import torch

from moelora import LLM, SamplingParams, ops
from moelora.lora.dummy import DummyLora
from tests.hf_models import VOCAB, build_hf_model


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(9)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 3, 19, 11, 1)]


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_next", "qwen3_5_moe", "deepseek_v3"])
def test_static_decode_inputs_equal_eager(family, tmp_path, monkeypatch):
    build_hf_model(family).save_pretrained(tmp_path / "model")
    params = [SamplingParams(temperature=0, max_tokens=9 + i, ignore_eos=True, logprobs=2) for i in range(5)]
    params[2] = SamplingParams(n=2, temperature=0, max_tokens=7, ignore_eos=True, logprobs=2)
    loras = [None, "d", "e", None, "d"]
    outs = {}
    for static in (False, True):
        if static:
            monkeypatch.setattr(ops, "graph_safe", lambda t: True)
        with LLM(str(tmp_path / "model"), device="cpu", dtype="float64", progress=False, max_num_seqs=3,
                 lora_modules={"d": DummyLora(8, 3), "e": DummyLora(4, 4)}) as llm:  # fmt: skip
            outs[static] = llm.generate(prompts(), params, lora=loras)
            graphs = llm.engine.executor.runner.graphs
            assert (graphs is not None and graphs.replays > 10) == static
    for eager, via_static in zip(outs[False], outs[True], strict=True):
        for a, b in zip(eager.outputs, via_static.outputs, strict=True):
            assert a.token_ids == b.token_ids
            for x, y in zip(a.logprobs, b.logprobs, strict=True):
                assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-5 for t in x)
