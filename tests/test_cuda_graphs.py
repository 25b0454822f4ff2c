"""Decode steps replayed from CUDA graphs give what the same steps give run eagerly (GPU only)."""

from __future__ import annotations

import pytest
import torch

from moelora import LLM, SamplingParams
from moelora.demo import demo_adapter_paths

pytestmark = [pytest.mark.gpu, pytest.mark.cuda_graphs]

PROMPTS = ["The weather today is", "Hello", "My computer keeps", "To make a simple soup,", "Travelling light"]


def run(cuda_graphs: bool, tmp_path) -> tuple[list, LLM]:
    adapters = demo_adapter_paths(tmp_path)
    llm = LLM("demo", device="cuda", dtype="bfloat16", progress=False, lora_modules=adapters,
              cuda_graphs=cuda_graphs)  # fmt: skip
    return run_on(llm, tmp_path)


def run_on(llm: LLM, tmp_path) -> tuple[list, LLM]:
    names = [None, *demo_adapter_paths(tmp_path)]
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
        assert_same(eager, graphed)
    finally:
        llm_g.shutdown()


def assert_same(first: list, second: list) -> None:
    """The same tokens, and log-probs within a bf16 run's rounding."""
    for a, b in zip(first, second, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            for tok in set(x) & set(y):
                assert abs(x[tok] - y[tok]) < 0.05


def test_async_scheduling_equals_waiting_steps(tmp_path):
    """Steps queued before the previous step's tokens reach the host, their last tokens fed from the
    device into the graphs' inputs (and into eager steps that mix prefills in), give exactly what steps
    that wait for their tokens give: sampling options, n > 1, adapters, graphs of every size. (Only
    length endings: an EOS ending leaves its row in one more step with async scheduling, and a batch of
    another size may round bf16 differently.)"""
    options = [
        dict(temperature=1.0, seed=1),
        dict(temperature=0.8, seed=2, logprobs=2),
        dict(temperature=0, repetition_penalty=1.3, prompt_logprobs=2),
        dict(temperature=1.0, seed=3, n=2, frequency_penalty=0.5),
        dict(temperature=1.0, seed=4, top_k=20, top_p=0.9, presence_penalty=0.3),
        dict(temperature=0.9, seed=5, min_p=0.05),
    ]
    adapters = demo_adapter_paths(tmp_path)
    names = [None, *adapters]
    prompts, loras, params = [], [], []
    for i in range(18):
        prompts.append(PROMPTS[i % len(PROMPTS)])
        loras.append(names[i % len(names)])
        params.append(SamplingParams(max_tokens=3 + 2 * i, ignore_eos=True, **options[i % len(options)]))
    results = []
    for overlap in (False, True):
        llm = LLM("demo", device="cuda", dtype="bfloat16", progress=False, lora_modules=adapters,
                  async_scheduling=overlap)  # fmt: skip
        try:
            results.append(llm.generate(prompts, params, lora=loras))
            assert llm.engine.executor.runner.graphs.replays > 20
        finally:
            llm.shutdown()
    for a, b in zip(*results, strict=True):
        assert a.prompt_logprobs == b.prompt_logprobs
        for c, d in zip(a.outputs, b.outputs, strict=True):
            assert (c.token_ids, c.text, c.logprobs) == (d.token_ids, d.text, d.logprobs)


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2", "qwen3_next", "qwen3_5_moe"])
def test_hard_families_graphs_equal_eager(family, tmp_path):
    """DeepSeek's absorbed decode (the latent kernel with its keys split, a kv_b LoRA by its rank-r terms)
    and the hybrid models' linear-attention steps (each sequence's state in its slot, padding rows on slot
    -1) replayed from CUDA graphs give the eager steps' tokens, base and adapter rows mixed. The graphs split
    the keys by the cache's capacity, eager steps by the batch's, so the sums differ in order: both fp16
    runs are measured against an fp32 eager run (graphs need a half dtype), and the graphed run may be at
    most twice as far from it as the eager one (plus 0.02); tokens are compared up to the eager run's first
    near-tie (a flip there only shows the rounding)."""
    from moelora.lora.dummy import DummyLora
    from tests.hf_models import VOCAB, build_hf_model

    build_hf_model(family).save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 19, 40)] * 2
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    outs = {}
    for dtype, graphs in (("float32", False), ("float16", False), ("float16", True)):
        with LLM(str(tmp_path / "model"), device="cuda", dtype=dtype, progress=False,
                 cuda_graphs=graphs, lora_modules={"d": DummyLora(8, 3)}) as llm:  # fmt: skip
            outs[dtype, graphs] = llm.generate(prompts, params, lora=[None] * 3 + ["d"] * 3)
            runner_graphs = llm.engine.executor.runner.graphs
            assert (runner_graphs is not None and runner_graphs.replays > 10) == graphs
    compared, gaps = 0, {False: 0.0, True: 0.0}
    runs = outs["float32", False], outs["float16", False], outs["float16", True]
    for ref, eager, graphed in zip(*runs, strict=True):
        a, b, r = eager.outputs[0], graphed.outputs[0], ref.outputs[0]
        steps = zip(a.token_ids, b.token_ids, r.token_ids, a.logprobs, b.logprobs, r.logprobs, strict=True)
        for tok, other, want, x, y, z in steps:
            assert tok == other
            if tok != want:
                break  # fp16 and fp32 went different ways at a near-tie of the fp32 run
            compared += 1
            for run, got in ((False, x), (True, y)):
                gaps[run] = max([gaps[run], *(abs(got[t] - z[t]) for t in set(got) & set(z))])
            top = sorted(x.values(), reverse=True)
            if len(top) > 1 and top[0] - top[1] < 0.1:
                break  # a near-tie: the next tokens may follow either branch
    assert compared >= 24
    assert gaps[True] <= 2 * gaps[False] + 0.02, gaps


def test_a_new_plan_drops_the_graphs_and_recaptures_them(tmp_path):
    """`Engine.use_plan` (`bench latency --plan-variants`): the graphs captured under the old plan are
    dropped, the next steps capture them again under the new one, and a plan that changes only how kernels
    are launched (`pdl`) gives the same tokens as before."""
    before, llm = run(True, tmp_path)
    graphs = llm.engine.executor.runner.graphs
    try:
        assert graphs is not None and graphs._graphs
        llm.engine.use_plan("pdl=False")
        assert not graphs._graphs
        after, _ = run_on(llm, tmp_path)
        assert graphs._graphs and llm.engine.executor.runner.graphs is graphs
        assert_same(before, after)
    finally:
        llm.engine.use_plan("")
        llm.shutdown()
