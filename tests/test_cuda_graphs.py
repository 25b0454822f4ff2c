"""Decode steps replayed from CUDA graphs give what the same steps give run eagerly (GPU only)."""

from __future__ import annotations

import pytest

from moelora import LLM, SamplingParams
from moelora.demo import demo_adapter_paths

pytestmark = [pytest.mark.gpu, pytest.mark.cuda_graphs]

PROMPTS = ["The weather today is", "Hello", "My computer keeps", "To make a simple soup,", "Travelling light"]


def run(cuda_graphs: bool, tmp_path) -> tuple[list, LLM]:
    adapters = demo_adapter_paths(tmp_path)
    llm = LLM("demo", device="cuda", dtype="bfloat16", progress=False, lora_modules=adapters,
              cuda_graphs=cuda_graphs)  # fmt: skip
    names = [None, *adapters]
    prompts, loras, params = [], [], []
    for i, prompt in enumerate(PROMPTS * 3):
        prompts.append(prompt)
        loras.append(names[i % len(names)])
        # Different lengths, so the running batch shrinks step by step through several graph sizes.
        params.append(SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True, logprobs=1))
    outs = llm.generate(prompts, params, lora=loras)
    # Base-only decode steps too (the graph without adapter work).
    outs += llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1))
    return outs, llm


def test_graph_replay_equals_eager(tmp_path):
    eager, llm_e = run(False, tmp_path)
    llm_e.shutdown()
    graphed, llm_g = run(True, tmp_path)
    graphs = llm_g.engine.executor.runner.graphs
    try:
        assert graphs is not None and graphs.replays > 20
        assert {lora for _, lora in graphs._graphs} == {True, False}
        assert len({size for size, _ in graphs._graphs}) >= 3
        for a, b in zip(eager, graphed, strict=True):
            assert a.token_ids == b.token_ids
            for x, y in zip(a.logprobs, b.logprobs, strict=True):
                for tok in set(x) & set(y):
                    assert abs(x[tok] - y[tok]) < 0.05
    finally:
        llm_g.shutdown()
