"""`SamplingParams`: how one request picks its tokens and when it stops; validated once on construction."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

MAX_LOGPROBS = 20
_MAX_PENALTY = 2.0
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping options of one request (the names and meanings of vLLM's and OpenAI's).

    After construction `stop` is always a tuple[str, ...] (a single string becomes a 1-tuple) and
    `stop_token_ids` a tuple[int, ...]; None is accepted for either and becomes the empty tuple.
    """

    # Number of completions to generate for the prompt.
    n: int = 1
    # Softmax temperature; 0 means greedy (argmax). n > 1 with temperature 0 gives n identical copies.
    temperature: float = 1.0
    # Nucleus sampling: keep the smallest set of top tokens whose probability mass reaches top_p.
    top_p: float = 1.0
    # Keep only the top_k likeliest tokens; -1 or 0 turns it off.
    top_k: int = -1
    # Drop tokens whose probability is below min_p times the likeliest token's.
    min_p: float = 0.0
    # Divide positive logits (multiply negative ones) of tokens seen in prompt or output; 1 = off.
    repetition_penalty: float = 1.0
    # Subtract from the logit of every token that occurs in the output at least once.
    presence_penalty: float = 0.0
    # Subtract this times the number of occurrences in the output from each token's logit.
    frequency_penalty: float = 0.0
    # Seed of this request's draws (completion i uses seed + i); None derives one from the engine's seed
    # and the request's place in the submission order.
    seed: int | None = None
    # Most tokens to generate; None means until the context (max_model_len) is full.
    max_tokens: int | None = 16
    # EOS, stop_token_ids and stop strings cannot end generation before this many tokens.
    min_tokens: int = 0
    # Stop when the generated text contains one of these strings (it is excluded from the output text).
    stop: str | Sequence[str] = ()
    # Stop after generating one of these token ids (it is kept in the output ids).
    stop_token_ids: Sequence[int] = ()
    # Keep generating after the end-of-sequence token.
    ignore_eos: bool = False
    # Return the log-probs of this many likeliest tokens (plus the chosen one) at each step.
    logprobs: int | None = None
    # Return the log-probs of this many likeliest tokens at each prompt position.
    prompt_logprobs: int | None = None
    # Leave special tokens out of the detokenized text.
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _stop_ids(self.stop_token_ids))
        self._check_ints()
        self._check_floats()
        self._check_lengths()

    @property
    def greedy(self) -> bool:
        """True when the likeliest token is always taken (temperature 0)."""
        return self.temperature == 0

    def _check_ints(self) -> None:
        _require_int("n", self.n)
        _require(self.n >= 1, "n", "must be >= 1", self.n)
        _require_int("top_k", self.top_k)
        _require(self.top_k >= -1, "top_k", "must be -1 or 0 (off) or >= 1", self.top_k)
        if self.seed is not None:
            _require_int("seed", self.seed)
            lo, hi = _SEED_RANGE
            _require(lo <= self.seed <= hi, "seed", f"must be in [{lo}, {hi}]", self.seed)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _require_int(name, value)
                _require(0 <= value <= MAX_LOGPROBS, name, f"must be in [0, {MAX_LOGPROBS}]", value)

    def _check_floats(self) -> None:
        t = self.temperature
        _require(t >= 0 and math.isfinite(t), "temperature", "must be >= 0 and finite", t)
        _require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _require(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p)
        rp = self.repetition_penalty
        _require(rp > 0 and math.isfinite(rp), "repetition_penalty", "must be > 0 and finite", rp)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            bounds = f"must be in [{-_MAX_PENALTY}, {_MAX_PENALTY}]"
            _require(-_MAX_PENALTY <= value <= _MAX_PENALTY, name, bounds, value)

    def _check_lengths(self) -> None:
        if self.max_tokens is not None:
            _require_int("max_tokens", self.max_tokens)
            _require(self.max_tokens >= 1, "max_tokens", "must be None or >= 1", self.max_tokens)
        _require_int("min_tokens", self.min_tokens)
        _require(self.min_tokens >= 0, "min_tokens", "must be >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}: "
                "lower min_tokens or raise max_tokens"
            )


def _require(ok: bool, name: str, rule: str, value: object) -> None:
    """Raise `<name> <rule>, got <value>` unless ok (NaN fails every comparison, so it is caught too)."""
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")


def _require_int(name: str, value: object) -> None:
    """Integer fields take ints (numpy ints too) but not bools or floats such as 2.0."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    _require(ok, name, "must be an integer", value)


def _stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalise `stop` to a tuple of non-empty strings."""
    if stop is None:
        return ()
    strings = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in strings:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must hold non-empty strings, got {s!r}")
    return strings


def _stop_ids(ids: Sequence[int] | None) -> tuple[int, ...]:
    """Normalise `stop_token_ids` to a tuple of non-negative ints."""
    if ids is None:
        return ()
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"stop_token_ids must be a sequence of token ids, got {ids!r}")
    result = tuple(ids)
    for t in result:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise ValueError(f"stop_token_ids must hold token ids >= 0, got {t!r}")
    return tuple(int(t) for t in result)
