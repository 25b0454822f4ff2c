"""One decoding step's token choice: penalties, temperature, top-k/top-p/min-p truncation, a seeded draw.

Shapes: B sequences (one logits row each), V vocabulary entries, R rows of a sub-batch that needs an option.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from moelora import ops
from moelora.engine.transfer import HostCopy, to_device
from moelora.ops.torch.sample import row_hash
from moelora.sampling_params import SamplingParams


@dataclass
class SamplingInput:
    """One sequence's sampling state for this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # The sequence's seed (any int): its draw for output position t depends on (seed, t) alone.
    seed: int
    # Token ids that end the sequence (masked while fewer than params.min_tokens tokens are out).
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Sampled:
    """The chosen token of one sequence, with log-probs from the model's own distribution."""

    token: int
    # Raw log-prob of the chosen token: log_softmax of the logits, before penalties and temperature.
    logprob: float
    # If params.logprobs is not None: the top-N raw log-probs (likeliest first) plus the chosen token.
    top_logprobs: dict[int, float] | None


def sample(logits: torch.Tensor, inputs: Sequence[SamplingInput]) -> list[Sampled]:
    """`launch_sample(logits, inputs).result()`: the choices, waited for."""
    return launch_sample(logits, inputs).result()


def launch_sample(logits: torch.Tensor, inputs: Sequence[SamplingInput]) -> PendingSample:
    """Choose one token per row of `logits` [B, V] (fp32, any device), row i belonging to inputs[i]; the
    work is queued on the device and nothing waits for it: the chosen ids are on the device at once
    (`PendingSample.tokens`, what the next step can read), the host learns them from `result()`.

    Semantics, per row with params p, prompt ids P and output ids O:
      raw = log_softmax(logits); every returned log-prob comes from raw.
      x = logits, then in order:
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty, for t in P + O
        x[t] -= p.frequency_penalty * count(t in O) + p.presence_penalty * (count(t in O) > 0)
        x[t] = -inf for t in eos_token_ids + p.stop_token_ids while len(O) < p.min_tokens,
          unless that leaves no finite logit (then the row is left as it was)
      greedy (p.temperature == 0): token = argmax(x)
      otherwise: q = softmax(x / p.temperature), then zero out
        top-k: all but the p.top_k largest (off for -1 or 0),
        top-p: all but the smallest likeliest-first set whose mass reaches p.top_p of what top-k kept
          (the likeliest token always stays),
        min-p: tokens with q[t] < p.min_p * max(q),
      and draw token ~ q / sum(q) as argmax(q / e) with e[t] = -log(u[t]), u[t] uniform in (0, 1) from
      a counter-based hash of (the row's seed, len(O), t) (the exponential race: scale-free, so no
      renormalisation is needed). The draw depends only on the row's own distribution, seed and position:
      never on the other rows of the batch, the timing, or the device.
    Rows whose options are off skip that option's work (in particular, no sort without top-k or top-p).
    """
    if logits.dim() != 2 or logits.shape[0] != len(inputs):
        raise ValueError(f"logits must have shape [{len(inputs)}, V] (one row per input), got {logits.shape}")
    if not inputs:
        return PendingSample(torch.zeros(0, dtype=torch.int64, device=logits.device), None, [], 0)
    x = logits.float()  # [B, V]: the caller's own tensor when it is fp32, never written
    # raw = x - lse, taken only where a log-prob is returned: a [B, V] log_softmax took 34 us a step at
    # batch 1 (H100, 151,936 logits: PyTorch gives a row one thread block), more than the draw itself.
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # [B, 1]
    # Copied only where a penalty or an early-stop mask changes a row (a [B, V] copy per step otherwise).
    work = _apply_repetition_penalty(x, inputs)
    work = _apply_output_penalties(work, inputs)
    work = _mask_early_stops(work, inputs)
    return _pack(x, lse, _choose(work, inputs), inputs)


def _apply_repetition_penalty(work: torch.Tensor, inputs: Sequence[SamplingInput]) -> torch.Tensor:
    """-> work with the penalty applied to the rows that have one (a copy; `work` itself if none do)."""
    rows = [i for i, x in enumerate(inputs) if x.params.repetition_penalty != 1.0]
    if not rows:
        return work
    work = work.clone()
    ids = [itertools.chain(inputs[i].prompt_token_ids, inputs[i].output_token_ids) for i in rows]
    seen = _token_counts(ids, work.shape[1], work.device) > 0  # [R, V]
    idx = _index(rows, work.device)
    sub = work[idx]  # [R, V]
    penalty = _column([inputs[i].params.repetition_penalty for i in rows], work.device)  # [R, 1]
    work[idx] = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    return work


def _apply_output_penalties(work: torch.Tensor, inputs: Sequence[SamplingInput]) -> torch.Tensor:
    """-> work with frequency and presence penalties applied (a copy; `work` itself if no row has one)."""
    rows = [
        i
        for i, x in enumerate(inputs)
        if (x.params.frequency_penalty != 0 or x.params.presence_penalty != 0) and x.output_token_ids
    ]
    if not rows:
        return work
    work = work.clone()
    counts = _token_counts([inputs[i].output_token_ids for i in rows], work.shape[1], work.device)  # [R, V]
    frequency = _column([inputs[i].params.frequency_penalty for i in rows], work.device)  # [R, 1]
    presence = _column([inputs[i].params.presence_penalty for i in rows], work.device)  # [R, 1]
    idx = _index(rows, work.device)
    work[idx] -= frequency * counts + presence * (counts > 0)
    return work


def _mask_early_stops(work: torch.Tensor, inputs: Sequence[SamplingInput]) -> torch.Tensor:
    """While a row is below min_tokens, its end tokens get -inf (ids outside the vocabulary are ignored);
    a copy, or `work` itself if no row is below."""
    vocab = work.shape[1]
    banned: dict[int, list[int]] = {}
    for i, x in enumerate(inputs):
        if len(x.output_token_ids) < x.params.min_tokens:
            ends = [t for t in (*x.eos_token_ids, *(x.params.stop_token_ids or ())) if 0 <= t < vocab]
            if ends:
                banned[i] = ends
    if not banned:
        return work
    work = work.clone()
    ban = _token_counts(list(banned.values()), vocab, work.device) > 0  # [R, V]
    idx = _index(list(banned), work.device)
    sub = work[idx]  # [R, V]
    masked = sub.masked_fill(ban, float("-inf"))
    nothing_left = torch.isneginf(masked).all(dim=-1, keepdim=True)  # [R, 1]
    work[idx] = torch.where(nothing_left, sub, masked)
    return work


def _choose(work: torch.Tensor, inputs: Sequence[SamplingInput]) -> torch.Tensor:
    """Token ids [B] int64: argmax for greedy rows, a draw from the truncated distribution for the rest."""
    rows = [i for i, x in enumerate(inputs) if not x.params.greedy]
    if not rows:
        return work.argmax(dim=-1)
    device = work.device
    idx = None if len(rows) == len(inputs) else _index(rows, device)
    logits = work if idx is None else work[idx]  # [R, V]
    params = [inputs[i].params for i in rows]
    top = logits.amax(dim=-1)  # [R]
    temperature = to_device([p.temperature for p in params], torch.float32, device)  # [R]
    keys = [row_hash(inputs[i].seed, len(inputs[i].output_token_ids)) for i in rows]
    hashes = to_device(keys, torch.int32, device)  # [R]
    probs = _truncated_probs(logits, top, temperature, params)
    if probs is None:  # nothing truncated: the draw makes the weights itself, in the same pass
        drawn = ops.race_argmax(logits, top, temperature, hashes, from_logits=True)
    else:
        drawn = ops.race_argmax(probs, top, temperature, hashes, from_logits=False)
    if idx is None:
        return drawn
    tokens = work.argmax(dim=-1)  # [B]
    tokens[idx] = drawn
    return tokens


def _truncated_probs(
    logits: torch.Tensor, top: torch.Tensor, temperature: torch.Tensor, params: Sequence[SamplingParams]
) -> torch.Tensor | None:
    """Temperature-scaled probabilities [R, V] up to a factor per row (the likeliest token has 1; the draw
    and every truncation below are scale-free, so a softmax's sum and division are not needed), with
    truncated tokens set to 0; None if no row truncates (top-k, top-p or min-p). top [R]: the rows'
    maxima; temperature [R]."""
    device, vocab = logits.device, logits.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    cut = [j for j, p in enumerate(params) if top_k[j] < vocab or p.top_p < 1]
    floors = [j for j, p in enumerate(params) if p.min_p > 0]
    if not cut and not floors:
        return None
    # Shifting by the row max first keeps tiny temperatures from overflowing to inf - inf = nan.
    probs = torch.exp((logits - top[:, None]) / temperature[:, None])  # [R, V]
    if cut:
        idx = _index(cut, device)
        k = to_device([top_k[j] for j in cut], torch.int64, device)[:, None]  # [R', 1]
        probs[idx] = _top_k_top_p(probs[idx], k, _column([params[j].top_p for j in cut], device))
    if floors:
        idx = _index(floors, device)
        sub = probs[idx]
        floor = _column([params[j].min_p for j in floors], device) * sub.amax(dim=-1, keepdim=True)
        probs[idx] = sub.masked_fill(sub < floor, 0.0)
    return probs


def _top_k_top_p(probs: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero all but the k [R, 1] likeliest tokens, then all but the top_p [R, 1] nucleus of those."""
    ordered, order = probs.sort(dim=-1, descending=True)  # [R, V] each
    rank = torch.arange(probs.shape[1], device=probs.device)  # [V]
    in_top_k = rank < k  # [R, V]
    kept = ordered.masked_fill(~in_top_k, 0.0)
    mass = kept.cumsum(dim=-1)  # [R, V]
    # A token stays if the mass before it is short of top_p; top_p == 1 keeps all, whatever the rounding.
    in_top_p = (mass - kept < top_p * mass[:, -1:]) | (top_p >= 1)
    keep = torch.zeros_like(in_top_k).scatter_(-1, order, in_top_k & in_top_p)
    return probs.masked_fill(~keep, 0.0)


class PendingSample:
    """A step's choices: the token ids on the device now, everything on the host once `result()` returns
    (one copy to the host a step, started when the draw was queued)."""

    def __init__(
        self, tokens: torch.Tensor, packed: HostCopy | None, inputs: Sequence[SamplingInput], width: int
    ) -> None:
        self.tokens = tokens  # [B] int64 on the device
        self._packed, self._inputs, self._width = packed, inputs, width

    def result(self) -> list[Sampled]:
        """The choices with their raw log-probs (waits for the device's copy)."""
        if self._packed is None:
            return []
        width, packed = self._width, self._packed.tolist()  # [B, 2 + 2 * width]
        if width:
            rows = [(int(r[0]), r[1], [int(i) for i in r[2 : 2 + width]], r[2 + width :]) for r in packed]
        else:  # no inner list per row (the common case; this loop runs for every sequence of every step)
            rows = [(int(r[0]), r[1], [], []) for r in packed]
        results = []
        for x, (token, logprob, ids, values) in zip(self._inputs, rows, strict=True):
            top = None
            if x.params.logprobs is not None:
                n = x.params.logprobs
                top = dict(zip(ids[:n], values[:n], strict=True))
                top[token] = logprob
            results.append(Sampled(token, logprob, top))
        return results


def _pack(
    logits: torch.Tensor, lse: torch.Tensor, tokens: torch.Tensor, inputs: Sequence[SamplingInput]
) -> PendingSample:
    """The choices with their raw log-probs (logits - lse; lse [B, 1]) in one tensor, its copy to the host
    started (token ids and fp32 values are exact in fp64)."""
    chosen = logits.gather(-1, tokens[:, None]) - lse  # [B, 1]
    wanted = [x.params.logprobs for x in inputs if x.params.logprobs is not None]
    width = min(max(wanted, default=0), logits.shape[1])
    columns = [tokens[:, None].double(), chosen.double()]
    if width:
        top_values, top_ids = logits.topk(width, dim=-1)  # [B, width] each: the raw log-probs' top too
        columns += [top_ids.double(), (top_values - lse).double()]
    return PendingSample(tokens, HostCopy(torch.cat(columns, dim=1)), inputs, width)


def _token_counts(id_lists: Sequence[Iterable[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """counts[r, t] = occurrences of token t in id_lists[r], as fp32 [R, V] on device."""
    flat: list[int] = []
    rows: list[int] = []
    for r, ids in enumerate(id_lists):
        before = len(flat)
        flat.extend(ids)
        rows.extend([r] * (len(flat) - before))
    counts = torch.zeros(len(id_lists), vocab, dtype=torch.float32, device=device)
    index = (_index(rows, device), _index(flat, device))
    counts.index_put_(index, torch.ones(len(flat), dtype=torch.float32, device=device), accumulate=True)
    return counts


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.int64, device)


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-row parameters as an fp32 column [R, 1] that broadcasts over the vocabulary."""
    return to_device(values, torch.float32, device)[:, None]
