"""PyTorch twin of causal prefill attention over a flattened batch of sequences."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelora.ops.torch import acc_dtype


def _attend(
    qs: torch.Tensor,
    ks: torch.Tensor,
    vs: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """softmax(scale * q.k over the allowed keys) @ v, per head ([H, n, D] each, in the accumulation
    dtype); with sinks [H], each head's sink logit joins its softmax and its weight is dropped."""
    if sinks is None:
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)
    score = (qs @ ks.transpose(1, 2)) * scale  # [H, n, L]
    score = score.masked_fill(~allowed, float("-inf"))
    sink = sinks.to(score.dtype)[:, None, None].expand(-1, score.shape[1], 1)  # [H, n, 1]
    probs = torch.softmax(torch.cat((score, sink), dim=-1), dim=-1)[..., :-1]
    return probs @ vs


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: tuple[int, ...],
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention, each sequence attending only to itself.

    Shapes: T tokens (sequences back to back, lengths `seq_lens`), Hq query heads, Hkv key/value heads
    (Hq % Hkv == 0, query head h reads kv head h // (Hq / Hkv)), D head dim.
    q [T, Hq, D], k and v [T, Hkv, D] -> o [T, Hq, D].

    Semantics: for a query at position i of its sequence and key j of the same sequence,
    score = scale * q.k if j <= i and (window is None or i - j < window), else masked;
    o = softmax(score) @ v, softmax in fp32 (fp64 for fp64 inputs). With sinks [Hq] (GPT-OSS), head h's
    softmax also takes the logit sinks[h], whose weight multiplies no value: o = sum_j p_j v_j with
    p = softmax(score_0, ..., score_L, sinks[h]) over the first L + 1 entries.
    """
    group = q.shape[1] // k.shape[1]
    acc = acc_dtype(q.dtype)
    out = torch.empty_like(q)
    start = 0
    for n in seq_lens:
        sl = slice(start, start + n)
        start += n
        qs = q[sl].transpose(0, 1).to(acc)  # [Hq, n, D]
        ks = k[sl].transpose(0, 1).to(acc).repeat_interleave(group, dim=0)
        vs = v[sl].transpose(0, 1).to(acc).repeat_interleave(group, dim=0)
        i = torch.arange(n, device=q.device)
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed &= (i[:, None] - i[None, :]) < window
        o = _attend(qs, ks, vs, allowed, scale, sinks)
        out[sl] = o.transpose(0, 1).to(q.dtype)
    return out


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store this step's keys and values in the paged cache.

    k, v [T, Hkv, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; slot_mapping [T] int64.
    Semantics: cache.view(-1, Hkv, D)[slot_mapping[t]] = k[t] (and v, cast to the cache's dtype), for
    every token t. Slots must lie in [0, num_blocks * block_size) (the engine pads with a block no
    sequence owns, never -1): the Triton kernel writes nothing for a slot outside, this twin would index
    with it.
    """
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: tuple[int, ...],
    kv_lens: tuple[int, ...],
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached keys and values (prefill or decode).

    Shapes: q [T, Hq, D] (sequences back to back, seq_lens[b] new tokens each); k_cache, v_cache
    [num_blocks, block_size, Hkv, D] already holding this step's keys; block_tables [B, max_blocks] int32;
    kv_lens[b] = tokens of sequence b in the cache, the new ones last. -> o [T, Hq, D].

    Semantics: the new tokens of sequence b sit at positions kv_lens[b] - seq_lens[b] + i; the query at
    position p attends key position j iff j <= p and (window is None or p - j < window), with
    score = scale * q.k; o = softmax(score) @ v, softmax in fp32 (fp64 for fp64 inputs); sinks as in
    `prefill_attention`. Query head h reads KV head h // (Hq / Hkv).
    """
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    acc = acc_dtype(q.dtype)
    out = torch.empty_like(q)
    start = 0
    for b, (n, total) in enumerate(zip(seq_lens, kv_lens, strict=True)):
        blocks = block_tables[b, : (total + block_size - 1) // block_size].long()
        ks = k_cache[blocks].flatten(0, 1)[:total].transpose(0, 1).to(acc).repeat_interleave(group, dim=0)
        vs = v_cache[blocks].flatten(0, 1)[:total].transpose(0, 1).to(acc).repeat_interleave(group, dim=0)
        qs = q[start : start + n].transpose(0, 1).to(acc)  # [Hq, n, D]
        pos = torch.arange(total - n, total, device=q.device)[:, None]
        key = torch.arange(total, device=q.device)[None, :]
        allowed = key <= pos
        if window is not None:
            allowed &= (pos - key) < window
        o = _attend(qs, ks, vs, allowed, scale, sinks)
        out[start : start + n] = o.transpose(0, 1).to(q.dtype)
        start += n
    return out
