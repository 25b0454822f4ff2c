"""A request and its sequences (one per completion), as the engine thread tracks them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moelora.outputs import CompletionOutput, Logprobs, RequestOutput

if TYPE_CHECKING:
    from moelora.engine.detokenizer import IncrementalDetokenizer
    from moelora.engine.stream import RequestStream
    from moelora.lora.manager import AdapterEntry
    from moelora.sampling_params import SamplingParams


class InvalidRequestError(ValueError):
    """A request refused before it starts; `param` names the request field at fault (for the API)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Status(enum.Enum):
    WAITING = "waiting"  # not in the KV cache (new, or preempted and to be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion: prompt + generated tokens, the KV blocks holding them, and its sampling state."""

    request: Request
    index: int
    token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    seed: int  # its draws: params.seed + index, or derived from the engine seed and the arrival order
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # leading tokens whose keys/values are in the cache
    num_registered: int = 0  # leading blocks offered to the prefix cache
    status: Status = Status.WAITING
    logprobs: list[Logprobs] | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0
    skips: int = 0  # times later requests were admitted first because this one's adapter did not fit

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Only the first completion computes prompt log-probs, once, on its first prefill."""
        return (
            self.index == 0
            and self.request.params.prompt_logprobs is not None
            and self.request.prompt_logprobs is None
        )

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            self.index, list(self.output_ids), self.detokenizer.text, self.finish_reason, self.logprobs
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    lora: str | None
    stream: RequestStream
    arrival: int  # submission order; earlier requests are scheduled first and preempted last
    lora_entry: AdapterEntry | None = None
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[Logprobs | None] | None = None
    prompt_logprobs_sent: bool = False
    # Completions 1..n-1 before completion 0's prompt is in the cache: they then start from its blocks.
    forks: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(
            self.request_id,
            self.prompt,
            list(self.prompt_token_ids),
            self.prompt_logprobs,
            [s.completion() for s in self.seqs],
            self.lora,
        )
