"""A request and its sequences (one per completion), as the engine thread tracks them; a prompt checked
and tokenised; the seed of an unseeded completion."""

from __future__ import annotations

import enum
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moelora.outputs import CompletionOutput, Logprobs, RequestOutput

if TYPE_CHECKING:
    from moelora.engine.detokenizer import IncrementalDetokenizer
    from moelora.engine.stream import RequestStream
    from moelora.lora.manager import AdapterEntry
    from moelora.sampling_params import SamplingParams


Prompt = str | Seq[int]


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
    num_cached: int = 0  # leading tokens whose keys/values are in the cache (or queued to be written)
    # The row of this sequence's next token among the choices of the step in flight (chosen on the
    # device, not yet read by the host: async scheduling); -1 when the host has every token.
    pending: int = -1
    num_registered: int = 0  # leading blocks offered to the prefix cache
    state_slot: int = -1  # its slot in the linear-attention layers' state cache while it runs (-1: none)
    # Snapshots of that state queued at block boundaries, (block index, snapshot slot, the prefix cache's
    # key of that block where known, else None: its own block's) each, kept for later prompts with the
    # same prefix once that block is in the prefix cache
    snapshots: list[tuple[int, int, Any]] = field(default_factory=list)
    # Where its prefix leaves the cached blocks that have no states kept, and the key of the last of
    # them (None: nowhere): a boundary to keep the states at, for the next prompt with that prefix
    divergence: tuple[int, Any] | None = None
    status: Status = Status.WAITING
    logprobs: list[Logprobs] | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0
    skips: int = 0  # times later requests were admitted first because this one's adapter did not fit

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens so far, the one still on its way to the host included."""
        return len(self.token_ids) + (self.pending >= 0)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Only the first completion computes prompt log-probs, once, on its first prefill (in parts when
        its prompt is computed in parts: until there is one entry a prompt position)."""
        done = self.request.prompt_logprobs
        return (
            self.index == 0
            and self.request.params.prompt_logprobs is not None
            and (done is None or len(done) < self.num_prompt)
        )

    def completion(self) -> CompletionOutput:
        """The completion so far; its text is left empty for a deferred detokenizer (the consumer
        decodes it: `RequestStream.final_texts`)."""
        text = "" if self.detokenizer.deferred else self.detokenizer.text
        return CompletionOutput(self.index, list(self.output_ids), text, self.finish_reason, self.logprobs)


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
    whole_output: bool = False  # its consumer reads only the final output: no delta per token
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


def encode_prompt(tokenizer: Any | None, prompt: Prompt, vocab_size: int) -> list[int]:
    """A prompt's token ids (text tokenised as is, no special tokens added), checked: valid Unicode, not
    empty, every id in the vocabulary; InvalidRequestError (param "prompt") otherwise."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidRequestError(
                "this model folder has no tokenizer: give prompts as lists of token ids", "prompt"
            )
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(
                f"the prompt is not valid Unicode text (a lone surrogate at character {e.start})", "prompt"
            ) from None
        ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise InvalidRequestError("a prompt needs at least one token", "prompt")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
    return ids


def derived_seed(engine_seed: int, arrival: int, index: int) -> int:
    """The seed of completion `index` of the `arrival`-th request submitted to an engine seeded so."""
    mixed = engine_seed * 0x9E3779B97F4A7C15 + (arrival + 1) * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB
    return mixed % 2**64
