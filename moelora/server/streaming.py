"""Server-sent events in OpenAI's chunk format: one chunk per engine delta, an optional usage chunk, [DONE].

If the client goes away, Starlette stops iterating and closes the generator: `deltas` then aborts the
engine requests. An engine failure mid-stream becomes an error event before [DONE].
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from moelora.engine.engine import Engine
from moelora.outputs import RequestDelta, RequestOutput
from moelora.server.formatting import CompletionLogprobs, Decode, Tokens, chat_logprobs, usage
from moelora.server.protocol import ApiError
from moelora.server.runs import Run, deltas

_LOG = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"

ChoiceFn = Callable[[int, RequestDelta], dict[str, Any]]


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def events(
    runs: Sequence[Run],
    engine: Engine,
    envelope: dict[str, Any],
    choice: ChoiceFn,
    include_usage: bool,
    prelude: Sequence[dict[str, Any]] = (),
) -> AsyncIterator[str]:
    """`envelope`: id, object, created, model of every chunk; `choice(index, delta)` one choice's part."""
    outputs: list[RequestOutput] = []
    try:
        for part in prelude:
            yield sse(envelope | {"choices": [part]})
        async for run, delta in deltas(runs, engine):
            if delta.output is not None:
                outputs.append(delta.output)
            if delta.token_ids or delta.text or delta.finish_reason:
                yield sse(envelope | {"choices": [choice(run.first_choice + delta.index, delta)]})
        if include_usage:
            yield sse(envelope | {"choices": [], "usage": usage(outputs)})
    except Exception as e:  # the engine stopped under a running request: say so in the stream
        _LOG.warning("stream %s failed: %r", envelope["id"], e)
        yield sse(ApiError(503, f"the request failed: {e}").body())
    yield DONE


def completion_choice_fn(decode: Decode, logprobs: int | None, token_ids: bool) -> ChoiceFn:
    states: dict[int, CompletionLogprobs] = {}

    def choice(index: int, delta: RequestDelta) -> dict[str, Any]:
        part: dict[str, Any] = {
            "index": index,
            "text": delta.text,
            "logprobs": None,
            "finish_reason": delta.finish_reason,
        }
        if logprobs is not None and delta.logprobs is not None:
            state = states.setdefault(index, CompletionLogprobs(decode, logprobs))
            part["logprobs"] = state.part(delta.token_ids, delta.logprobs)
        if token_ids:
            part["token_ids"] = delta.token_ids
        return part

    return choice


def chat_choice_fn(tokens: Tokens, logprobs: int | None, token_ids: bool) -> ChoiceFn:
    def choice(index: int, delta: RequestDelta) -> dict[str, Any]:
        part: dict[str, Any] = {
            "index": index,
            "delta": {"content": delta.text} if delta.text else {},
            "logprobs": None,
            "finish_reason": delta.finish_reason,
        }
        if logprobs is not None and delta.logprobs is not None:
            part["logprobs"] = chat_logprobs(tokens, logprobs, delta.token_ids, delta.logprobs)
        if token_ids:
            part["token_ids"] = delta.token_ids
        return part

    return choice


def chat_prelude(n: int) -> list[dict[str, Any]]:
    """The first chunk of each chat choice announces the assistant role."""
    return [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in range(n)
    ]
