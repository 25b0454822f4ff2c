"""Causal variable-length attention (flash-attention 2 style) over dense or paged keys and values.

One program per (query head, tile of BLOCK_M query tokens of one sequence). Keys come either from the
dense k/v of the batch (cacheless prefill) or from the paged cache through the block table (prefill
continuing a cached prefix, mixed prefill + decode steps). The tile table is built on the host from the
host-side lengths, heaviest tiles first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moelora.ops.triton.attn_decode import LOG2E, mma


@dataclass(frozen=True)
class PrefillTiles:
    block_m: int
    block_n: int
    warps: int
    stages: int


def prefill_tiles(head_dim: int) -> PrefillTiles:
    if head_dim > 128:  # latent attention's expanded keys (192 wide, 256 in registers): half the query rows
        return PrefillTiles(64, 64, 4, 2)
    return PrefillTiles(128, 64, 8 if head_dim > 64 else 4, 3)


@triton.jit
def _key_offsets(bt_ptr, n, n_ok, kv_start, s_b, s_s, s_h, kvh, PAGE: tl.constexpr, PAGED: tl.constexpr):
    if PAGED:
        page = tl.load(bt_ptr + n // PAGE, mask=n_ok, other=0).to(tl.int64)
        return page * s_b + (n % PAGE) * s_s + kvh * s_h
    return (kv_start + n).to(tl.int64) * s_s + kvh * s_h


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, k_ptr, v_ptr, bt_ptr, n0, pos, kv_len, kv_start, window, qk_scale, kvh, d, d_ok,
    dv, dv_ok, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h,
    PAGE: tl.constexpr, PAGED: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < kv_len
    k_off = _key_offsets(bt_ptr, n, n_ok, kv_start, sk_b, sk_s, sk_h, kvh, PAGE, PAGED)
    v_off = _key_offsets(bt_ptr, n, n_ok, kv_start, sv_b, sv_s, sv_h, kvh, PAGE, PAGED)
    k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(v_ptr + v_off[:, None] + dv[None, :], mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    s = mma(q, tl.trans(k), IEEE) * qk_scale  # log2 domain
    if MASKED:
        allowed = (n[None, :] <= pos[:, None]) & n_ok[None, :]
        if HAS_WINDOW:
            allowed &= (pos[:, None] - n[None, :]) < window
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at zero weight
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, meta_ptr, tile_ptr, sinks_ptr, qk_scale, window,
    sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sbt_b, so_t, so_h,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_DV: tl.constexpr, PAGE: tl.constexpr,
    PAGED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
    IEEE: tl.constexpr, PIPELINED: tl.constexpr, HAS_SINKS: tl.constexpr,
):  # fmt: skip
    """HAS_SINKS: each row's softmax starts from the head's sink logit (sinks_ptr, log2 domain): running
    maximum the sink, sum 1, no value."""
    h = tl.program_id(0)
    tile = tl.program_id(1)
    b = tl.load(tile_ptr + 2 * tile)
    m0 = tl.load(tile_ptr + 2 * tile + 1)
    q_start = tl.load(meta_ptr + 4 * b)
    q_len = tl.load(meta_ptr + 4 * b + 1)
    kv_len = tl.load(meta_ptr + 4 * b + 2)
    kv_start = tl.load(meta_ptr + 4 * b + 3)
    kvh = h // GROUP
    bt_ptr += b.to(tl.int64) * sbt_b

    m = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_ok = m < q_len
    d_ok = d < HEAD_DIM
    dv = tl.arange(0, BLOCK_DV)  # the values' head dim (latent attention's differs from the keys')
    dv_ok = dv < HEAD_DV
    pos = kv_len - q_len + m  # positions of this tile's queries in their sequence
    rows = (q_start + m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * sq_t + h * sq_h + d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINKS:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(sinks_ptr + h).to(tl.float32)
        l_i = l_i + 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    first = kv_len - q_len + m0  # the tile's earliest query position
    hi = tl.minimum(kv_len, first + BLOCK_M)
    if HAS_WINDOW:
        lo = tl.maximum(first - window + 1, 0) // BLOCK_N * BLOCK_N
        full = lo
    else:
        lo = 0
        full = (first + 1) // BLOCK_N * BLOCK_N  # key tiles every query of the tile sees whole
    # The interpreter cannot run `range` over loaded bounds; on GPU the `for` is software-pipelined.
    if PIPELINED:
        for n0 in range(lo, full, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_ptr, v_ptr, bt_ptr, n0, pos, kv_len, kv_start, window, qk_scale, kvh, d,
                d_ok, dv, dv_ok, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, PAGE, PAGED, BLOCK_N, False, HAS_WINDOW,
                IEEE,
            )  # fmt: skip
        for n0 in range(full, hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_ptr, v_ptr, bt_ptr, n0, pos, kv_len, kv_start, window, qk_scale, kvh, d,
                d_ok, dv, dv_ok, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, PAGE, PAGED, BLOCK_N, True, HAS_WINDOW,
                IEEE,
            )  # fmt: skip
    else:
        n0 = lo
        while n0 < hi:
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_ptr, v_ptr, bt_ptr, n0, pos, kv_len, kv_start, window, qk_scale, kvh, d,
                d_ok, dv, dv_ok, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, PAGE, PAGED, BLOCK_N, True, HAS_WINDOW,
                IEEE,
            )  # fmt: skip
            n0 += BLOCK_N
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = o_ptr + rows[:, None] * so_t + h * so_h + dv[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])


def tile_table(seq_lens: tuple[int, ...], kv_lens: tuple[int, ...], block_m: int) -> list[int]:
    """Flattened (sequence, first query row) pairs, the tiles with the most keys to read first."""
    tiles = [(b, m0) for b, n in enumerate(seq_lens) for m0 in range(0, n, block_m)]
    tiles.sort(key=lambda t: kv_lens[t[0]] - seq_lens[t[0]] + t[1], reverse=True)
    return [x for t in tiles for x in t]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_tables: torch.Tensor | None,
    meta: torch.Tensor,
    num_tiles: int,
    scale: float,
    window: int | None,
    tiles: PrefillTiles,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch over a prepared batch; `meta` [4 * B + 2 * num_tiles] int32 on q's device holds, per
    sequence, (first query row, query count, key count, first key row when dense), then `tile_table`.

    q [T, Hq, D]; paged (block_tables [B, max_blocks] int32): k, v [num_blocks, block_size, Hkv, D];
    dense (block_tables None): k, v [T_kv, Hkv, D]; sinks [Hq] or None (GPT-OSS's). -> o [T, Hq, Dv]
    (v's last dim Dv may differ from D: latent attention's expanded form).
    """
    head_dim, head_dv = q.shape[2], v.shape[-1]
    paged = block_tables is not None
    out = q.new_empty(q.shape[0], q.shape[1], head_dv)
    if num_tiles == 0:
        return out
    batch = (meta.numel() - 2 * num_tiles) // 4
    kv_heads = k.shape[2] if paged else k.shape[1]
    k_strides = k.stride()[:3] if paged else (0, *k.stride()[:2])
    v_strides = v.stride()[:3] if paged else (0, *v.stride()[:2])
    bt = block_tables if block_tables is not None else meta
    sinks_l2 = meta if sinks is None else sinks.float() * LOG2E  # (a placeholder when there are none)
    _prefill_kernel[(q.shape[1], num_tiles)](
        q, k, v, out, bt, meta, meta[4 * batch :], sinks_l2, scale * LOG2E, window or 0,
        q.stride(0), q.stride(1), *k_strides, *v_strides, bt.stride(0), out.stride(0), out.stride(1),
        GROUP=q.shape[1] // kv_heads, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HEAD_DV=head_dv, BLOCK_DV=max(16, triton.next_power_of_2(head_dv)),
        PAGE=k.shape[1] if paged else 1, PAGED=paged, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        HAS_WINDOW=window is not None, IEEE=q.dtype == torch.float32, PIPELINED=q.is_cuda,
        HAS_SINKS=sinks is not None, num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return out
