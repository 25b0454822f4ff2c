"""Property tests (hypothesis): any JSON body gets a 2xx or an OpenAI-shaped 4xx and leaves nothing
counted; any mix of arrivals, aborts and preemptions ends every request exactly once and frees every
block and adapter reference."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moelora import LLM, SamplingParams
from moelora.config import ServerArgs
from moelora.server.app import build_app

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
FIELDS = ["model", "prompt", "messages", "n", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "logprobs", "top_logprobs", "max_tokens", "stream_options", "ignore_eos", "best_of", "echo",
          "response_format", "min_tokens", "presence_penalty", "user", "extra"]  # fmt: skip
small = st.integers(-3, 4)
field_values: dict[str, Any] = {
    "model": st.sampled_from(["demo", "expert-r8", "demo:fused-r16", "nope", ""]) | json_values,
    "prompt": st.text(max_size=30) | st.lists(st.integers(-2, 600), max_size=8) | json_values,
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "tool"]), "content": st.text(max_size=20)}
        ),
        max_size=3,
    )
    | json_values,
    "max_tokens": small | json_values,
    "n": small,
    "logprobs": small | st.booleans(),
    "top_logprobs": small,
}
bodies = st.dictionaries(
    st.sampled_from(FIELDS),
    st.deferred(lambda: json_values),
    max_size=8,
).flatmap(lambda d: st.fixed_dictionaries({k: field_values.get(k, st.just(v)) for k, v in d.items()}))


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    llm = LLM("demo", device="cpu", progress=False, num_kv_blocks=64)
    with TestClient(build_app(llm, ServerArgs(max_waiting=8), "demo")) as http:
        yield http


@SETTINGS
@given(body=bodies, chat=st.booleans())
def test_any_body_gets_2xx_or_an_openai_4xx_and_nothing_stays_counted(client, body, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    # json.dumps writes NaN/Infinity literals for non-finite floats: not JSON, which the server must refuse.
    raw = json.dumps(body)
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    ctx = client.app.state.ctx  # type: ignore[attr-defined]
    assert ctx.metrics.pending.count == 0
    engine = ctx.llm.engine
    deadline = time.monotonic() + 10
    while (engine.scheduler.has_work() or engine._requests) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.allocator.num_free == engine.allocator.num_blocks


@pytest.fixture(scope="module")
def tight() -> Iterator[LLM]:
    """Few KV blocks (preemption), three sequences at a time, two adapter slots for three adapters, a step
    budget of 4 tokens (prompts computed in parts)."""
    with LLM("demo", device="cpu", progress=False, num_kv_blocks=10, block_size=4, max_num_seqs=3,
             max_loras_per_batch=2, max_num_batched_tokens=4) as llm:  # fmt: skip
        yield llm


request_plans = st.lists(
    st.tuples(
        st.integers(1, 12),  # prompt tokens
        st.integers(1, 10),  # max_tokens
        st.integers(1, 3),  # n
        st.sampled_from([None, "expert-r8", "fused-r16", "partial-r4"]),
        st.floats(0, 1.5),  # temperature
        st.sampled_from([None, 0, 1, 3]),  # abort after this many deltas (None: never)
    ),
    min_size=1,
    max_size=8,
)


@SETTINGS
@given(plans=request_plans)
def test_every_request_ends_exactly_once_and_frees_everything(tight, plans):
    engine = tight.engine
    streams = []
    for i, (length, max_tokens, n, lora, temperature, _) in enumerate(plans):
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, ignore_eos=i % 2 == 0)
        streams.append(engine.submit_stream([3 + (i + j) % 400 for j in range(length)], params, lora))
    ends = []
    for stream, plan in zip(streams, plans, strict=True):
        finals = 0
        for count, delta in enumerate(stream):
            if plan[5] is not None and count == plan[5]:
                engine.abort(stream.request_id)
            if delta.finished:
                finals += 1
        assert finals == 1 and stream.finished and not stream._items
        out = delta.output  # the last delta carries the whole output
        assert out is not None and len(out.outputs) == plan[2]
        for completion in out.outputs:
            assert completion.finish_reason in ("length", "stop", "abort")
            assert len(completion.token_ids) <= plan[1]
        ends.append(out)
    deadline = time.monotonic() + 10
    while (engine._requests or engine.scheduler.has_work()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine._requests and not engine._streams
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert engine.loras is not None and all(e.users == 0 for e in engine.loras._names.values())
    assert len(ends) == len(plans)
