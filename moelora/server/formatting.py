"""Engine outputs in OpenAI's JSON shapes: completion and chat choices, their log-probs, stream chunks, usage.

Log-probs are the engine's raw ones (before temperature and penalties); `top` lists hold the likeliest
`n` tokens, which include the chosen one only if it is among them (as OpenAI does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from moelora.outputs import Logprobs, RequestOutput

Decode = Callable[[Sequence[int]], str]


class Tokens(Protocol):
    """Token ids as text, and one token as the bytes it stands for (an `LLM`)."""

    def decode(self, ids: Sequence[int]) -> str: ...
    def token_bytes(self, token: int) -> bytes: ...


LOGPROB_FLOOR = -9999.0  # JSON has no -inf; a token of probability 0 reports this (as vLLM does)


def _finite(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps nan to the floor


def _top(entry: Logprobs, n: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:n]


@dataclass
class CompletionLogprobs:
    """Completions' `logprobs` object, built up token by token (text offsets continue across chunks)."""

    decode: Decode
    n: int
    offset: int = 0
    tokens: list[str] = field(default_factory=list)

    def part(self, token_ids: Sequence[int], entries: Sequence[Logprobs]) -> dict[str, Any]:
        tokens = [self.decode([t]) for t in token_ids]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(e[t]) for t, e in zip(token_ids, entries, strict=True)],
            "top_logprobs": [{self.decode([k]): _finite(v) for k, v in _top(e, self.n)} for e in entries],
            "text_offset": offsets,
        }


def chat_logprobs(
    tokens: Tokens, n: int, token_ids: Sequence[int], entries: Sequence[Logprobs]
) -> dict[str, Any]:
    """Chat's `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}; `bytes` are the
    token's own, also where it holds part of a multi-byte character (its text is then U+FFFD)."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        text, raw = tokens.decode([token]), list(tokens.token_bytes(token))
        return {"token": text, "logprob": _finite(logprob), "bytes": raw}

    content = [
        item(t, e[t]) | {"top_logprobs": [item(k, v) for k, v in _top(e, n)]}
        for t, e in zip(token_ids, entries, strict=True)
    ]
    return {"content": content}


def usage(outputs: Sequence[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_choices(
    outputs: Sequence[RequestOutput], decode: Decode, logprobs: int | None, token_ids: bool
) -> list[dict[str, Any]]:
    choices = []
    for prompt_index, out in enumerate(outputs):
        for c in out.outputs:
            choice: dict[str, Any] = {
                "index": prompt_index * len(out.outputs) + c.index,
                "text": c.text,
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            if logprobs is not None and c.logprobs is not None:
                choice["logprobs"] = CompletionLogprobs(decode, logprobs).part(c.token_ids, c.logprobs)
            if token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
    return choices


def chat_choices(
    outputs: Sequence[RequestOutput], tokens: Tokens, logprobs: int | None, token_ids: bool
) -> list[dict[str, Any]]:
    choices = []
    for c in outputs[0].outputs:
        choice: dict[str, Any] = {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": None,
            "finish_reason": c.finish_reason,
        }
        if logprobs is not None and c.logprobs is not None:
            choice["logprobs"] = chat_logprobs(tokens, logprobs, c.token_ids, c.logprobs)
        if token_ids:
            choice["token_ids"] = c.token_ids
        choices.append(choice)
    return choices
