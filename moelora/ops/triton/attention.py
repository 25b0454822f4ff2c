"""Attention ops on GPU with the signatures and Semantics of `moelora.ops.torch.attention`.

Decode steps (one new token per sequence) run the split-KV decode kernel; anything else (prefill, a
prompt continuing a cached prefix, prefill mixed with decodes) the variable-length flash kernel. The
host-side lengths of the signatures travel to the device in one small copy per call; `paged_decode`
takes them as a device tensor instead, for CUDA-graph capture.
"""

from __future__ import annotations

import itertools

import torch

from moelora.ops.cache_write import CacheWrite
from moelora.ops.dense_lora import GivenShrink
from moelora.ops.triton.attn_decode import DecodeRotary, check_cache, paged_decode
from moelora.ops.triton.attn_prefill import PrefillTiles, prefill_tiles, tile_table, varlen_attention
from moelora.ops.triton.common import device_ints
from moelora.ops.triton.kv_write import check_write_kv

__all__ = ["paged_attention", "paged_decode", "prefill_attention", "rotary_decode"]


def _check_lens(num_tokens: int, seq_lens: tuple[int, ...], kv_lens: tuple[int, ...], capacity: int) -> None:
    if sum(seq_lens) != num_tokens or len(kv_lens) != len(seq_lens):
        raise ValueError(
            f"attention: seq_lens sum to {sum(seq_lens)} for {num_tokens} query tokens, and kv_lens has "
            f"{len(kv_lens)} entries for {len(seq_lens)} sequences"
        )
    if any(not 1 <= n <= total <= capacity for n, total in zip(seq_lens, kv_lens, strict=True)):
        raise ValueError(
            f"attention: need 1 <= seq_lens[b] <= kv_lens[b] <= {capacity} (block table capacity), got "
            f"seq_lens {seq_lens}, kv_lens {kv_lens}"
        )


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: tuple[int, ...],
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same signature and Semantics as `moelora.ops.torch.attention.prefill_attention`."""
    if k.shape != v.shape or k.shape[0] != q.shape[0] or q.shape[1] % k.shape[1] or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"prefill_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
            "[T, Hq, D], [T, Hkv, D], [T, Hkv, D] with Hkv dividing Hq"
        )
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("prefill_attention: q, k and v need unit stride over the head dim")
    _check_lens(q.shape[0], seq_lens, seq_lens, q.shape[0])
    return varlen(q, k, v, None, seq_lens, seq_lens, scale, window, prefill_tiles(q.shape[2]), sinks)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: tuple[int, ...],
    kv_lens: tuple[int, ...],
    scale: float,
    window: int | None,
    kv_lens_dev: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same signature and Semantics as `moelora.ops.torch.attention.paged_attention`; `kv_lens_dev`
    (kv_lens as int32 on q's device, built once per step) spares decode its per-call copy."""
    check_cache(q, k_cache, v_cache, block_tables)
    if block_tables.shape[0] < len(seq_lens):
        raise ValueError(
            f"paged_attention: {block_tables.shape[0]} block tables for {len(seq_lens)} sequences"
        )
    _check_lens(q.shape[0], seq_lens, kv_lens, block_tables.shape[1] * k_cache.shape[1])
    tables = block_tables[: len(seq_lens)]
    if max(seq_lens) == 1:
        lens = kv_lens_dev if kv_lens_dev is not None else device_ints(list(kv_lens), q.device)
        return paged_decode(q, k_cache, v_cache, tables, lens, scale, window, sinks=sinks)
    tiles = prefill_tiles(q.shape[2])
    return varlen(q, k_cache, v_cache, tables, seq_lens, kv_lens, scale, window, tiles, sinks)


def rotary_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor, float, bool] | None,
    cache: CacheWrite,
    block_tables: torch.Tensor,
    seq_lens: tuple[int, ...],
    kv_lens: tuple[int, ...],
    scale: float,
    window: int | None,
    kv_lens_dev: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    o_shrink: GivenShrink | None = None,
) -> torch.Tensor:
    """`ops.rotary_decode_attention` for a decode step (every seq_lens 1) in one launch: the decode kernel
    q/k-norms and rotates q itself and stores the step's keys and values first (`paged_decode`'s
    `rotary`), and computes `o_shrink` (`paged_decode`'s) where given."""
    if max(seq_lens) != 1:
        raise ValueError(f"rotary_decode: one new token per sequence, got seq_lens {seq_lens}")
    check_write_kv(k, *cache)
    k_cache, v_cache = cache.k_cache, cache.v_cache
    check_cache(q, k_cache, v_cache, block_tables)
    _check_lens(q.shape[0], seq_lens, kv_lens, block_tables.shape[1] * k_cache.shape[1])
    lens = kv_lens_dev if kv_lens_dev is not None else device_ints(list(kv_lens), q.device)
    qw, kw, eps, weight_first = (None, None, 0.0, False) if norm is None else norm
    slots = cache.slot_mapping.contiguous()
    rotary = DecodeRotary(k, cache.v, cos, sin, slots, qw, kw, eps, weight_first)
    tables = block_tables[: len(seq_lens)]
    return paged_decode(
        q, k_cache, v_cache, tables, lens, scale, window, sinks=sinks, rotary=rotary, o_shrink=o_shrink
    )


def mla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: tuple[int, ...],
    kv_lens: tuple[int, ...],
    scale: float,
) -> torch.Tensor:
    """Same signature and Semantics as `moelora.ops.torch.mla.mla_attention` (latent attention's expanded
    form: every sequence's keys and values back to back, values narrower than the keys)."""
    heads, dqk = q.shape[1], q.shape[2]
    if k.shape[1:] != (heads, dqk) or v.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"mla_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be [T, H, Dqk], "
            "[L, H, Dqk], [L, H, Dv]"
        )
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("mla_attention: q, k and v need unit stride over the head dim")
    _check_lens(q.shape[0], seq_lens, kv_lens, max(kv_lens, default=0))
    if sum(kv_lens) != k.shape[0]:
        raise ValueError(f"mla_attention: kv_lens sum to {sum(kv_lens)} for {k.shape[0]} keys")
    return varlen(q, k, v, None, seq_lens, kv_lens, scale, None, prefill_tiles(dqk))


def varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_tables: torch.Tensor | None,
    seq_lens: tuple[int, ...],
    kv_lens: tuple[int, ...],
    scale: float,
    window: int | None,
    tiles: PrefillTiles,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The variable-length kernel over dense k/v [L, Hkv, D] (block_tables None: each sequence's kv_lens[b]
    keys back to back) or the paged cache; checked arguments, `tiles` chosen by the caller."""
    starts = [0, *itertools.accumulate(seq_lens)][:-1]
    kv_starts = [0, *itertools.accumulate(kv_lens)][:-1] if block_tables is None else [0] * len(kv_lens)
    meta = [
        x for s, n, t, kv_s in zip(starts, seq_lens, kv_lens, kv_starts, strict=True) for x in (s, n, t, kv_s)
    ]
    table = tile_table(seq_lens, kv_lens, tiles.block_m)
    dev_meta = device_ints(meta + table, q.device)
    return varlen_attention(q, k, v, block_tables, dev_meta, len(table) // 2, scale, window, tiles, sinks)
