"""What generation returns: whole results (`RequestOutput`) and the streamed increments (`RequestDelta`)."""

from __future__ import annotations

from dataclasses import dataclass, field

Logprobs = dict[int, float]


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop", "length" or "abort"; None while running
    logprobs: list[Logprobs] | None = None  # per generated token, when SamplingParams.logprobs is set


@dataclass
class RequestOutput:
    """The result of one request. For n = 1 the completion's fields are also readable here directly."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[Logprobs | None] | None
    outputs: list[CompletionOutput]
    lora: str | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)

    def _single(self) -> CompletionOutput:
        if len(self.outputs) != 1:
            raise AttributeError(f"this request has {len(self.outputs)} completions: read them from .outputs")
        return self.outputs[0]

    @property
    def token_ids(self) -> list[int]:
        return self._single().token_ids

    @property
    def text(self) -> str:
        return self._single().text

    @property
    def finish_reason(self) -> str | None:
        return self._single().finish_reason

    @property
    def logprobs(self) -> list[Logprobs] | None:
        return self._single().logprobs


@dataclass(frozen=True)
class RequestDelta:
    """What one engine step added to one completion of a request (streamed in order).

    The first delta of a request carries `prompt_logprobs` (if asked for); the last one has `finished`
    set and `output`, the whole RequestOutput.
    """

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[Logprobs] | None
    finish_reason: str | None
    prompt_logprobs: list[Logprobs | None] | None = None
    finished: bool = False
    output: RequestOutput | None = None
