"""Engine behaviour on the demo model: preemption, streaming, aborts, threads, sampling options, errors."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from moelora import LLM, SamplingParams

PROMPTS = ["The weather today is", "Hello", "My computer keeps", "To make a simple soup,"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters_llm(tmp_path_factory):
    from moelora.demo import demo_adapter_paths

    adapters = demo_adapter_paths(tmp_path_factory.mktemp("demo-adapters"))
    with LLM("demo", device="cpu", progress=False, block_size=4, lora_modules=adapters) as instance:
        yield instance


@pytest.fixture(scope="module")
def llm():
    with LLM("demo", device="cpu", progress=False, num_kv_blocks=256, block_size=4) as instance:
        yield instance


def wait_idle(llm: LLM, timeout: float = 10.0) -> None:
    engine, end = llm.engine, time.time() + timeout
    while engine.allocator.num_free != engine.allocator.num_blocks or engine.scheduler.has_work():
        assert time.time() < end, "engine did not free its KV blocks"
        time.sleep(0.005)


def alone(llm: LLM, prompt: str, params: SamplingParams = GREEDY) -> list[int]:
    return llm.generate(prompt, params)[0].token_ids


def test_preemption_keeps_every_request_intact(llm: LLM):
    expected = [alone(llm, p) for p in PROMPTS]
    # 6 blocks of 4 tokens: each request fits alone (<= 20 tokens), all four together do not.
    with LLM("demo", device="cpu", progress=False, num_kv_blocks=6, block_size=4) as small:
        outputs = small.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outputs] == expected
        assert all(o.finish_reason == "length" for o in outputs)
        assert small.engine.num_preemptions > 0
        wait_idle(small)


def test_streaming_deltas_concatenate_to_the_output(llm: LLM):
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=15, logprobs=2, prompt_logprobs=1)
    stream = llm.engine.submit_stream(PROMPTS[0], params)
    deltas = list(stream)
    final = deltas[-1].output
    assert final is not None and deltas[-1].finished and final.finished
    assert [t for d in deltas for t in d.token_ids] == final.token_ids
    assert "".join(d.text for d in deltas) == final.text
    assert [lp for d in deltas for lp in (d.logprobs or [])] == final.logprobs
    assert deltas[0].prompt_logprobs == final.prompt_logprobs
    assert sum(d.prompt_logprobs is not None for d in deltas) == 1


def test_async_streams(llm: LLM):
    async def consume(prompt: str) -> list[int]:
        stream = llm.engine.submit_stream(prompt, GREEDY)
        return [t async for d in stream for t in d.token_ids]

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(consume(p) for p in PROMPTS))

    assert asyncio.run(main()) == [alone(llm, p) for p in PROMPTS]


def test_abort_frees_blocks(llm: LLM):
    stream = llm.engine.submit_stream(PROMPTS[1], SamplingParams(max_tokens=200, ignore_eos=True))
    first = next(iter(stream))
    assert first.token_ids
    llm.engine.abort(stream.request_id)
    rest = list(stream)
    assert rest[-1].finished and rest[-1].output is not None
    assert rest[-1].output.finish_reason == "abort"
    assert len(rest[-1].output.token_ids) < 200
    wait_idle(llm)


def test_abort_of_a_waiting_request(llm: LLM):
    with LLM("demo", device="cpu", progress=False, num_kv_blocks=5, block_size=4, max_num_seqs=1) as small:
        busy = small.engine.submit_stream(PROMPTS[0], SamplingParams(max_tokens=10, ignore_eos=True))
        waiting = small.engine.submit_stream(PROMPTS[1], GREEDY)
        small.engine.abort(waiting.request_id)
        out = waiting.result()
        assert out.finish_reason == "abort" and out.token_ids == []
        assert busy.result().finish_reason == "length"
        wait_idle(small)


def test_many_threads_submitting_lose_nothing(llm: LLM):
    expected = {p: alone(llm, p) for p in PROMPTS}
    results: list[tuple[str, list[int]]] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(6):
            prompt = PROMPTS[(k + i) % len(PROMPTS)]
            tokens = llm.generate(prompt, GREEDY)[0].token_ids
            with lock:
                results.append((prompt, tokens))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 48
    assert all(tokens == expected[p] for p, tokens in results)
    wait_idle(llm)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm: LLM):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=12, ignore_eos=True)
    a = alone(llm, PROMPTS[0], params)
    batch = llm.generate([PROMPTS[2], PROMPTS[0], PROMPTS[1]], [GREEDY, params, GREEDY])
    assert batch[1].token_ids == a
    other = alone(llm, PROMPTS[0], SamplingParams(temperature=1.0, top_p=0.9, seed=43, max_tokens=12))
    assert other != a


def test_n_completions(llm: LLM):
    out = llm.generate(
        PROMPTS[0], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    )
    (result,) = out
    assert [c.index for c in result.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in result.outputs)
    assert len({tuple(c.token_ids) for c in result.outputs}) > 1
    with pytest.raises(AttributeError, match="3 completions"):
        _ = result.text


def test_repetition_penalty_prevents_repeats(llm: LLM):
    plain = alone(llm, PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert len(set(plain)) < len(plain)  # the demo model loops without a penalty
    penalised = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=50.0)
    tokens = alone(llm, PROMPTS[1], penalised)
    prompt_ids = set(llm.tokenizer.encode(PROMPTS[1], add_special_tokens=False))
    assert len(set(tokens)) == len(tokens) and not prompt_ids & set(tokens)


def test_frequency_and_presence_penalties_change_the_output(llm: LLM):
    plain = alone(llm, PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for kwargs in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        tokens = alone(
            llm, PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **kwargs)
        )
        assert tokens != plain
        assert len(set(tokens)) > len(set(plain))


def test_stop_string_is_cut_from_text(llm: LLM):
    full = llm.generate(PROMPTS[2], GREEDY)[0]
    stop = full.text[5:8]
    out = llm.generate(
        PROMPTS[2], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    assert stop not in out.text


def test_stop_token_ids_and_min_tokens(llm: LLM):
    full = alone(llm, PROMPTS[3])
    stop_id = full[4]
    out = llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids == full[: full.index(stop_id) + 1]
    first = full[0]
    held = llm.generate(
        PROMPTS[3], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[first], min_tokens=3)
    )[0]
    assert first not in held.token_ids[:3] and len(held.token_ids) >= 3


def test_eos_stops_unless_ignored(llm: LLM):
    eos = llm.engine.eos_token_ids
    sampled = SamplingParams(n=12, temperature=1.0, seed=0, max_tokens=150)
    outs = llm.generate(PROMPTS[1], sampled)[0].outputs
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert stopped, "with this seed some completions end with EOS"
    assert all(o.token_ids[-1] in eos and not set(o.token_ids[:-1]) & set(eos) for o in stopped)
    assert all(len(o.token_ids) == 150 for o in outs if o.finish_reason == "length")
    ignored = SamplingParams(n=12, temperature=1.0, seed=0, max_tokens=150, ignore_eos=True)
    assert all(o.finish_reason == "length" for o in llm.generate(PROMPTS[1], ignored)[0].outputs)


def test_max_model_len(llm: LLM):
    with LLM("demo", device="cpu", progress=False, max_model_len=12, num_kv_blocks=16) as short:
        prompt = short.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
        out = short.generate(PROMPTS[0], SamplingParams(max_tokens=None, ignore_eos=True))[0]
        assert out.finish_reason == "length" and len(prompt) + len(out.token_ids) == 12
        with pytest.raises(ValueError, match="max_model_len is 12"):
            short.generate([5] * 12)


def test_bad_requests_fail_clearly(llm: LLM):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        llm.generate("Hi", lora="nope")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 100000]])
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        llm.generate(PROMPTS[:3], [GREEDY, GREEDY])
    with pytest.raises(ValueError, match="too few for max_model_len"):
        LLM("demo", device="cpu", progress=False, num_kv_blocks=2, block_size=4, max_model_len=64)
    # where the memory went, and the knobs
    with pytest.raises(
        ValueError, match=r"free after the weights, adapter slots .* \(2 of rank 16\).*max_lora_rank"
    ):
        LLM(
            "demo",
            device="cpu",
            progress=False,
            kv_cache_memory=100,
            max_loras_per_batch=2,
            max_lora_rank=16,
            enable_lora=True,
        )
    with pytest.raises(ValueError, match="ep_size 3 does not divide tp_size 2"):
        LLM("demo", device="cpu", progress=False, tp_size=2, ep_size=3)
    wait_idle(llm)
    assert alone(llm, PROMPTS[0]) == alone(llm, PROMPTS[0])  # refused requests left nothing behind


def test_decode_graph_sizes():
    from moelora.engine.graphs import buckets

    assert buckets(256) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 128, 160, 192, 224, 256]
    assert buckets(5) == [1, 2, 4, 5]
    assert buckets(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 100]
    assert buckets(1) == [1]


def test_no_graphs_on_cpu(llm: LLM):
    assert llm.engine.executor.runner.graphs is None


def test_n_completions_compute_the_prompt_once(llm: LLM):
    """Completions 1..n-1 start from completion 0's prompt blocks (full ones shared, the partial one
    copied): each equals the same completion run as its own request, and the prompt runs once."""
    prompt = "Grandmother's way: to make a simple soup, first chop an onion and"  # no cached prefix
    size = len(llm.encode(prompt))
    assert size % 4 != 0  # the last prompt block is partial (block_size 4), so it is copied
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=9, ignore_eos=True)
    fed: list[int] = []
    runner = llm.engine.executor.runner
    original = runner.execute

    def counting(step, previous=None):
        fed.append(len(step.ids))
        return original(step, previous)

    runner.execute = counting
    try:
        (shared,) = llm.generate(prompt, params)
    finally:
        del runner.execute
    assert sum(fed) == size + 4 * (9 - 1)
    for i, completion in enumerate(shared.outputs):
        one = SamplingParams(temperature=1.0, seed=11 + i, max_tokens=9, ignore_eos=True)
        assert completion.token_ids == alone(llm, prompt, one), i
    wait_idle(llm)


def test_n_completions_survive_preemption():
    prompt = "Hello there, how"
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)
    with LLM("demo", device="cpu", progress=False, num_kv_blocks=64, block_size=4) as roomy:
        expected = [c.token_ids for c in roomy.generate([prompt, PROMPTS[0]], params)[0].outputs]
    with LLM("demo", device="cpu", progress=False, num_kv_blocks=9, block_size=4) as small:
        out = small.generate([prompt, PROMPTS[0]], params)
        assert [c.token_ids for c in out[0].outputs] == expected
        assert small.engine.num_preemptions > 0
        wait_idle(small)


def per_step(llm: LLM, measure) -> list[int]:
    """measure(StepInput) for every step from now on (recorded until `del runner.execute`)."""
    found: list[int] = []
    runner = llm.engine.executor.runner
    original = type(runner).execute

    def counting(step, previous=None):
        found.append(measure(step))
        return original(runner, step, previous)

    runner.execute = counting
    return found


def fed_tokens(llm: LLM) -> list[int]:
    """Tokens run through the model per step, recorded from now until the list is dropped."""
    return per_step(llm, lambda step: len(step.ids))


def test_prefix_cache_reuses_a_prompt_per_adapter(adapters_llm: LLM):
    llm = adapters_llm
    prompt = "The kettle clicked off just as the rain began to fall on the roof"
    size = len(llm.encode(prompt))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    first = llm.generate(prompt, params)[0]
    hits = llm.engine.allocator.hits
    fed = fed_tokens(llm)
    try:
        again = llm.generate(prompt, params)[0]
        cached = (size - 1) // 4 * 4  # whole blocks only, and the last prompt token is always computed
        assert fed[0] == size - cached and llm.engine.allocator.hits == hits + cached // 4
        assert again.token_ids == first.token_ids
        for a, b in zip(again.logprobs, first.logprobs, strict=True):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)
        fed.clear()
        llm.generate(prompt, params, lora="expert-r8")  # same tokens, other adapter: other keys and values
        assert fed[0] == size
        fed.clear()
        with_prompt_logprobs = llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
        assert fed[0] == size and len(with_prompt_logprobs.prompt_logprobs) == size  # needs every position
    finally:
        del llm.engine.executor.runner.execute


def test_evicted_prefix_blocks_are_never_read_stale():
    """A 12-block cache: other prompts take A's cached blocks for their own; A then computes afresh."""
    a = "The kettle clicked off just as the rain began"
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM("demo", device="cpu", progress=False, num_kv_blocks=12, block_size=4) as llm:
        expected = llm.generate(a, params)[0].token_ids
        for p in PROMPTS * 2:
            llm.generate(p + " and then some more words to fill blocks", params)
        hits = llm.engine.allocator.hits
        assert llm.generate(a, params)[0].token_ids == expected
        assert llm.engine.allocator.hits == hits  # A's blocks were all taken: nothing to reuse
        assert llm.generate(a, params)[0].token_ids == expected and llm.engine.allocator.hits > hits
        wait_idle(llm)


def test_a_reused_block_orphans_the_cached_blocks_after_it():
    """Block keys name the previous block by id and generation: once block 0 is evicted and holds other
    tokens, the cached block that followed its old content never matches again."""
    from moelora.cache.kv_cache import BlockAllocator

    alloc = BlockAllocator(2)
    b0, b1 = alloc.allocate(2)
    alloc.register(b0, (-1, 0, (1, 2), 0))
    alloc.register(b1, (b0, alloc.generation[b0], (3, 4), 0))
    alloc.free([b0, b1])
    assert (
        alloc.lookup((-1, 0, (1, 2), 0)) == b0 and alloc.lookup((b0, alloc.generation[b0], (3, 4), 0)) == b1
    )
    alloc.free([b0, b1])
    (reused,) = alloc.allocate(1)  # least recently freed first: b0, now for other tokens
    assert reused == b0
    alloc.register(b0, (-1, 0, (9, 9), 0))
    assert alloc.lookup((-1, 0, (1, 2), 0)) is None
    assert alloc.lookup((-1, 0, (9, 9), 0)) == b0
    assert alloc.lookup((b0, alloc.generation[b0], (3, 4), 0)) is None  # b1 still cached, but orphaned


def test_kernel_backend_is_a_setting():
    """The ops' backend comes from configuration (`kernel_backend`, `--kernel-backend`), checked before
    anything loads, and reaches the ops."""
    import argparse

    from moelora import ops
    from moelora.config import ModelArgs
    from moelora.flags import add_dataclass_args, from_args

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ModelArgs)
    assert from_args(ModelArgs, parser.parse_args(["--kernel-backend", "torch"])).kernel_backend == "torch"
    with pytest.raises(ValueError, match="kernel_backend 'cuda': use one of auto, torch, triton"):
        LLM("demo", device="cpu", progress=False, kernel_backend="cuda")
    try:
        with LLM("demo", device="cpu", progress=False, kernel_backend="torch") as llm:
            assert ops._BACKEND == "torch"
            assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
    finally:
        ops.use_backend("auto")


def test_generate_decodes_its_texts_in_the_callers_thread(llm: LLM, monkeypatch):
    """LLM.generate reads whole outputs: the engine's loop never decodes their text (256 completions
    ending in one step held it for ~10 ms); `result()` decodes each once in the caller's thread, the
    same text a stream of the same ids gives (greedy, EOS and length endings, n = 2)."""
    from moelora.engine.detokenizer import IncrementalDetokenizer

    threads: list[str] = []
    final_text = IncrementalDetokenizer.final_text

    def recorded(self):
        threads.append(threading.current_thread().name)
        return final_text(self)

    monkeypatch.setattr(IncrementalDetokenizer, "final_text", recorded)
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (3, 40)]
    params.append(SamplingParams(temperature=0.8, max_tokens=12, n=2, seed=5))
    outs = llm.generate(PROMPTS[:3], params)
    assert threads == [threading.current_thread().name] * 4
    for out in outs:
        for c in out.outputs:
            # What streaming these ids gives (an EOS that ended the completion is not text).
            detok = IncrementalDetokenizer(llm.tokenizer, out.prompt_token_ids, (), True)
            ids = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
            assert c.text == "".join(detok.add(t) for t in ids) + detok.finish()
            assert c.text


def test_whole_output_requests_get_one_delta(llm: LLM):
    """submit_many(text_deltas=False), as LLM.generate uses it: no delta per token (each woke the consumer
    and cost the engine's loop a lock), one at the end with the whole output, logprobs included."""
    params = SamplingParams(temperature=0.7, seed=4, max_tokens=9, n=2, logprobs=1, prompt_logprobs=1)
    (stream,) = llm.engine.submit_many([(PROMPTS[0], params, None)], text_deltas=False)
    deltas = list(stream)
    assert len(deltas) == 1 and deltas[0].finished
    out = deltas[0].output
    assert out is not None and out.prompt_logprobs is not None
    assert [len(c.token_ids) for c in out.outputs] == [9, 9]
    assert all(c.logprobs is not None and len(c.logprobs) == 9 for c in out.outputs)


def mixed_requests() -> tuple[list[str], list[SamplingParams]]:
    """Requests that end every way (EOS, stop strings, stop ids, length) with every sampling option."""
    prompts = [*PROMPTS, "Once upon a time", "The capital of France is"]
    params = [
        SamplingParams(temperature=1.0, seed=1, max_tokens=40),  # ends at EOS or length
        SamplingParams(temperature=0.8, seed=2, max_tokens=30, stop=[" the", "."], logprobs=2),
        SamplingParams(temperature=0, max_tokens=7, repetition_penalty=1.3, prompt_logprobs=2),
        SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=25, frequency_penalty=0.5, min_tokens=3),
        SamplingParams(temperature=1.0, seed=4, max_tokens=33, top_k=20, top_p=0.9, presence_penalty=0.3),
        SamplingParams(temperature=0.9, seed=5, max_tokens=16, min_p=0.05, stop_token_ids=[11, 13]),
    ]
    return prompts, params


def assert_same_outputs(a, b) -> None:
    """Tokens, texts and finish reasons equal; log-probs equal to 1e-4 (a sequence preempted at another
    step recomputes its prefix in another batch: the last bits of its later log-probs move)."""

    def close(x, y) -> bool:
        if x is None or y is None:
            return x is y
        return len(x) == len(y) and all(
            e is f or (e.keys() == f.keys() and all(abs(e[t] - f[t]) < 1e-4 for t in e))
            for e, f in zip(x, y, strict=True)
        )

    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert close(x.prompt_logprobs, y.prompt_logprobs)
        for c, d in zip(x.outputs, y.outputs, strict=True):
            assert (c.token_ids, c.text, c.finish_reason) == (d.token_ids, d.text, d.finish_reason)
            assert close(c.logprobs, d.logprobs)


@pytest.mark.parametrize("num_kv_blocks", [256, 12])  # 12 blocks of 4 tokens: preemptions
def test_async_scheduling_changes_no_output(num_kv_blocks: int):
    """A step queued before the previous step's tokens reach the host (its last tokens fed on the
    device) gives the outputs of steps that wait for their tokens: every way of ending, every sampling
    option, n > 1, preemptions."""
    prompts, params = mixed_requests()
    results = {}
    for overlap in (False, True):
        kwargs = dict(num_kv_blocks=num_kv_blocks, block_size=4, async_scheduling=overlap)
        with LLM("demo", device="cpu", progress=False, **kwargs) as instance:
            fed = fed_steps(instance)
            results[overlap] = instance.generate(prompts, params)
            preemptions = instance.engine.num_preemptions
            wait_idle(instance)
        assert any(fed) == overlap  # tokens were fed on the device only with async scheduling
    assert_same_outputs(results[True], results[False])
    reasons = {c.finish_reason for o in results[True] for c in o.outputs}
    assert {"stop", "length"} <= reasons
    assert (preemptions > 0) == (num_kv_blocks == 12)


@pytest.mark.parametrize("num_kv_blocks", [256, 12])  # 12 blocks of 4 tokens: preemptions
def test_chunked_prefill_changes_no_output(num_kv_blocks: int):
    """A step budget of 5 tokens computes every prompt in parts (beside decoding, prompt log-probs in
    parts, n > 1 forked after the last part, preempted sequences recomputed in parts), and also with
    parts of at most 2 tokens (`long_prefill_token_threshold`): the outputs of whole prompts, and no step
    or part over its limit."""
    prompts, params = mixed_requests()
    results = {}
    for chunked, cap in ((False, 0), (True, 0), (True, 2)):
        kwargs = dict(num_kv_blocks=num_kv_blocks, block_size=4, enable_chunked_prefill=chunked)
        kwargs |= dict(max_num_batched_tokens=5, max_num_seqs=5, long_prefill_token_threshold=cap)
        with LLM("demo", device="cpu", progress=False, **kwargs) as instance:
            sizes = per_step(instance, lambda step: (len(step.ids), max(step.seq_lens)))
            results[chunked, cap] = instance.generate(prompts, params)
            preemptions = instance.engine.num_preemptions
            wait_idle(instance)
        assert (max(s for s, _ in sizes) <= 5) == chunked  # without chunks the longer prompts run whole
        assert max(part for _, part in sizes) <= (cap or 5) or not chunked
        assert (preemptions > 0) == (num_kv_blocks == 12)
    assert_same_outputs(results[True, 0], results[False, 0])
    assert_same_outputs(results[True, 2], results[False, 0])


def fed_steps(llm: LLM) -> list[int]:
    """Per step from now on: how many of its tokens the previous step fed on the device."""
    return per_step(llm, lambda step: len(step.fed))


def test_async_scheduling_runs_no_step_past_a_length_limit(llm: LLM):
    """Sequences that end by length run exactly as many steps as when each step waits for its tokens:
    a token in flight that is a sequence's last is never fed to another step."""
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 9, 14, 14)]
    fed = fed_steps(llm)
    outputs = llm.generate(PROMPTS, params)
    del llm.engine.executor.runner.execute
    assert [len(o.token_ids) for o in outputs] == [3, 9, 14, 14]
    # One prefill step, then 13 decode steps, every decode token fed from the step before.
    assert fed == [0] + [4] * 2 + [3] * 6 + [2] * 5
