"""Decode attention over the paged KV cache, split over the KV length (flash-decoding).

One program per (sequence, KV head, split): the GQA group's query heads share every K/V tile it loads;
the last split of a (sequence, KV head) to finish merges the splits' outputs by their log-sum-exps (in
split order: the result does not depend on timing). The grid and the buffers depend on shapes only (the
split count comes from the block table's width), so a launch can be captured in a CUDA graph and
replayed with other lengths and block tables. The program that finishes a (sequence, KV head) can also
compute the output projection's LoRA shrink over those heads (`paged_decode`'s `o_shrink`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moelora.ops.dense_lora import DenseLora, GivenShrink
from moelora.ops.plan import TUNED, AttnDecodeTiles
from moelora.ops.triton.common import (
    after_previous,
    dependent_launch,
    lanes_in_rank,
    num_sms,
    prefetch_l2,
    valid_slot,
)
from moelora.ops.triton.counters import last_one, launch_counters

LOG2E = 1.4426950408889634


@triton.jit
def mma(a, b, IEEE: tl.constexpr):
    """a @ b in fp32; exact fp32 products for fp32 inputs (no TF32), as the twin computes."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def online_update(acc, m_i, l_i, s, v, IEEE: tl.constexpr):
    """Online softmax: fold scores s [M, N] (log2 domain, -inf where masked, every row with a finite
    one) and values v [N, D] into (acc [M, D], running maximum m_i [M], sum l_i [M])."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_i


@triton.jit
def _decode_tile(
    q, acc, m_i, l_i, k_ptr, v_ptr, bt_ptr, n0, end, b, kvh, d, d_ok, qk_scale,
    sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sbt_b,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of the group's rows with keys [n0, n0 + BLOCK_N) ∩ [.., end)."""
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < end
    page = tl.load(bt_ptr + b * sbt_b + n // PAGE, mask=n_ok, other=0).to(tl.int64)
    kd_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(
        k_ptr + (page * sk_b + (n % PAGE) * sk_s + kvh * sk_h)[:, None] + d[None, :], mask=kd_ok, other=0.0
    )
    v = tl.load(
        v_ptr + (page * sv_b + (n % PAGE) * sv_s + kvh * sv_h)[:, None] + d[None, :], mask=kd_ok, other=0.0
    )
    s = mma(q, tl.trans(k), IEEE)
    s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))  # log2 domain; every tile has a valid key
    return online_update(acc, m_i, l_i, s, v, IEEE)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr, out_ptr, count_ptr, sinks_ptr, qk_scale, window,
    sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sbt_b, so_t, so_h, so_s, sout_t, sout_h,
    kn_ptr, vn_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, slot_ptr, eps, cache_slots, skn_t, skn_h, svn_t, svn_h,
    sc_t, ss_t,
    oa_ptr, oxa_ptr, oslot_ptr, orank_ptr, num_seqs, o_rank, soa_s, soa_r, soa_k, s_or,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_LSE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    IEEE: tl.constexpr, PIPELINED: tl.constexpr, HAS_SINKS: tl.constexpr, PDL: tl.constexpr,
    ROTATE: tl.constexpr, QK_NORM: tl.constexpr, ROT: tl.constexpr,
    O_SLOTS: tl.constexpr, O_HAS_RANK: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_R: tl.constexpr,
    O_LINE: tl.constexpr, O_LINES: tl.constexpr,
):  # fmt: skip
    """HAS_SINKS: split 0 starts each head's softmax from its sink logit (sinks_ptr, log2 domain: weight
    1 at running maximum sink, no value), so the sink counts once in the split's sum and in the merge.
    ROTATE: q_ptr holds the queries before the rotary embedding of their first ROT features (and QK_NORM,
    the per-head norm: `_rotated`): each program rotates its group's heads itself, and the split holding
    the sequence's new key first stores that key (normed, rotated: kn_ptr) and its value (vn_ptr) into
    the cache at the token's slot (none outside the cache), then reads it back with the others.
    O_SLOTS (> 0): the program that stores a (sequence, KV head)'s output also computes the output
    projection's LoRA shrink over those heads' columns (`_o_shrink`); every split program first brings that
    slot's A block into L2 (`_o_prefetch`), before the wait for the previous kernel."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    if O_SLOTS and PDL:
        _o_prefetch(oa_ptr, oslot_ptr, b, kvh, o_rank, O_SLOTS, soa_s, soa_r, soa_k, GROUP * HEAD_DIM, O_LINE,
                    O_LINES)  # fmt: skip
    after_previous(PDL)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    kv_len = tl.load(lens_ptr + b)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(kv_len - window, 0)
    # This sequence's keys [lo, kv_len) cut into `splits` chunks of whole BLOCK_N tiles.
    chunk = tl.cdiv(tl.cdiv(kv_len - lo, splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, kv_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kvh * GROUP + g
    q_rows = q_ptr + b * sq_t + heads[:, None] * sq_h
    q_ok = g_ok[:, None] & d_ok[None, :]
    if ROTATE:
        cos_row, sin_row = cos_ptr + b * sc_t, sin_ptr + b * ss_t
        q = _rotated(q_rows, qw_ptr, cos_row, sin_row, d, q_ok, eps, HEAD_DIM, ROT, QK_NORM)
        if split == (kv_len - 1 - lo) // chunk:  # the split holding the new key
            _store_new(
                k_ptr, v_ptr, kn_ptr, vn_ptr, kw_ptr, cos_row, sin_row, slot_ptr, b, kvh, d, d_ok, eps,
                cache_slots, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, skn_t, skn_h, svn_t, svn_h, PAGE, HEAD_DIM,
                ROT, QK_NORM,
            )  # fmt: skip
            tl.debug_barrier()  # the block's stores visible to its own loads of the cache below
    else:
        q = tl.load(q_rows + d[None, :], mask=q_ok, other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + heads, mask=g_ok, other=0.0).to(tl.float32)
        m_i = tl.where(split == 0, sink, m_i)
        l_i = tl.where(split == 0, 1.0, l_i)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    # The interpreter cannot run `range` over loaded bounds; on GPU the `for` is software-pipelined.
    if PIPELINED:
        for n0 in range(start, end, BLOCK_N):
            acc, m_i, l_i = _decode_tile(
                q, acc, m_i, l_i, k_ptr, v_ptr, bt_ptr, n0, end, b, kvh, d, d_ok, qk_scale,
                sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sbt_b, PAGE, BLOCK_N, IEEE,
            )  # fmt: skip
    else:
        n0 = start
        while n0 < end:
            acc, m_i, l_i = _decode_tile(
                q, acc, m_i, l_i, k_ptr, v_ptr, bt_ptr, n0, end, b, kvh, d, d_ok, qk_scale,
                sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sbt_b, PAGE, BLOCK_N, IEEE,
            )  # fmt: skip
            n0 += BLOCK_N
    part_ptrs = o_ptr + b * so_t + heads[:, None] * so_h + d[None, :]
    lse_row = lse_ptr + (b * (GROUP * tl.num_programs(1)) + heads) * splits
    out_ptrs = out_ptr + b * sout_t + heads[:, None] * sout_h + d[None, :]
    used = tl.cdiv(kv_len - lo, chunk)
    counter = count_ptr + b * tl.num_programs(1) + kvh
    if O_SLOTS:
        out, final = split_done(
            acc, m_i, l_i, part_ptrs, so_s, lse_row, counter, out_ptrs, g_ok, d_ok, WRITE_LSE
        )
        if final:
            # o's A tile loaded before the merge reads the splits: both loads in flight together
            s, a, head = _o_tile(
                oa_ptr, oslot_ptr, orank_ptr, b, kvh, o_rank, soa_s, soa_r, soa_k, s_or, d, d_ok, O_SLOTS,
                O_HAS_RANK, GROUP, GROUP_P2, HEAD_DIM, BLOCK_R,
            )  # fmt: skip
            if WRITE_LSE:
                out = combine(
                    part_ptrs, lse_row, so_s, used, out_ptrs, g_ok, d_ok, GROUP_PAD, BLOCK_D, PIPELINED
                )
            _o_shrink(out, s, a, head, oxa_ptr, b, kvh, num_seqs, o_rank, g, O_SLOTS, GROUP_P2, BLOCK_R, IEEE)
    else:
        finish_split(acc, m_i, l_i, part_ptrs, so_s, lse_row, counter, used, out_ptrs, g_ok, d_ok, WRITE_LSE,
                     GROUP_PAD, BLOCK_D, PIPELINED)  # fmt: skip


@triton.jit
def _o_prefetch(oa_ptr, oslot_ptr, b, kvh, o_rank, O_SLOTS: tl.constexpr, soa_s, soa_r, soa_k,
                COLS: tl.constexpr, O_LINE: tl.constexpr, O_LINES: tl.constexpr):  # fmt: skip
    """Sequence b's slot's A block for KV head kvh's COLS columns (its heads') into L2 (`_o_shrink` reads
    it): O_LINE columns a cache line, O_LINES >= lanes x lines a lane. The slot id is read before the wait
    for the previous kernel: the step writes slot ids with a copy before its first kernel, and no kernel
    writes adapter weights."""
    s = valid_slot(tl.load(oslot_ptr + b), O_SLOTS)
    if s < O_SLOTS:
        i = tl.arange(0, O_LINES)
        per_lane: tl.constexpr = (COLS + O_LINE - 1) // O_LINE
        lane = tl.minimum(i // per_lane, o_rank - 1)
        col = kvh * COLS + tl.minimum((i % per_lane) * O_LINE, COLS - 1)
        prefetch_l2(oa_ptr + s.to(tl.int64) * soa_s + lane * soa_r + col * soa_k)


@triton.jit
def _o_tile(
    oa_ptr, oslot_ptr, orank_ptr, b, kvh, o_rank, soa_s, soa_r, soa_k, s_or, d, d_ok, O_SLOTS: tl.constexpr,
    O_HAS_RANK: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    """(sequence b's slot s, O_SLOTS for none; the output projection's A of s over KV head kvh's query
    heads as [BLOCK_D, GROUP_P2 x BLOCK_R]: feature d of head c // BLOCK_R, lane c % BLOCK_R, zeros where
    not read: past the group, past the slot's rank (`lanes_in_rank`), or without a slot; each column's
    head). For `_o_shrink`."""
    s = valid_slot(tl.load(oslot_ptr + b), O_SLOTS)
    c = tl.arange(0, GROUP_P2 * BLOCK_R)
    head, lane = c // BLOCK_R, c % BLOCK_R
    ok = (head < GROUP) & (s < O_SLOTS)
    ok = ok & lanes_in_rank(lane, o_rank, orank_ptr, tl.where(s < O_SLOTS, s, 0) * s_or, O_HAS_RANK)
    col = (kvh * GROUP + head[None, :]) * HEAD_DIM + d[:, None]
    a_ptrs = oa_ptr + tl.where(s < O_SLOTS, s, 0).to(tl.int64) * soa_s + lane[None, :] * soa_r + col * soa_k
    return s, tl.load(a_ptrs, mask=d_ok[:, None] & ok[None, :], other=0.0), head


@triton.jit
def _o_shrink(out, s, a, head, oxa_ptr, b, kvh, num_seqs, o_rank, g, O_SLOTS: tl.constexpr,
              GROUP_P2: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """The output projection's LoRA shrink over KV head kvh's heads for sequence b: oxa[kvh, b, r] =
    sum over its heads' columns c of a[s, r, c] * o[b, c], o as stored (`out` [GROUP_PAD, BLOCK_D], its
    rows past GROUP not read), for b's slot s (`_o_tile`: s, a, head); nothing stored without a slot. One
    dot of o by the group's A as [D, heads x lanes], whose diagonal blocks (row g, head g's lanes) are the
    sums."""
    if s < O_SLOTS:
        y = mma(out.to(a.dtype), a, IEEE)  # [GROUP_PAD, GROUP_P2 * BLOCK_R]
        y = tl.where(g[:, None] == head[None, :], y, 0.0)
        xa = tl.sum(tl.reshape(tl.sum(y, axis=0), [GROUP_P2, BLOCK_R]), axis=0)
        r = tl.arange(0, BLOCK_R)
        tl.store(oxa_ptr + (kvh * num_seqs + b) * o_rank + r, xa, mask=r < o_rank)


@triton.jit
def _rotated(rows, w_ptr, cos_row, sin_row, d, ok, eps, HEAD_DIM: tl.constexpr, ROT: tl.constexpr,
             NORM: tl.constexpr):  # fmt: skip
    """Head rows [R, BLOCK_D] at rows + d (read where `ok`): with NORM the per-head RMSNorm over the whole
    head (weights at w_ptr; 1: cast to the rows' dtype before the weight, 2: weight first, as `rms_norm`'s
    `weight_first`), then the rotary embedding of the first ROT features (rotate-half: feature i < ROT/2
    pairs with i + ROT/2; cos and sin rows [ROT]), the rest passed through. In the rows' dtype, each
    product rounded where the rotary launch and the norm launch round theirs."""
    partner = tl.where(d < ROT // 2, d + ROT // 2, tl.where(d < ROT, d - ROT // 2, d))
    x = tl.load(rows + d[None, :], mask=ok, other=0.0)
    xp = tl.load(rows + partner[None, :], mask=ok, other=0.0)  # each feature's partner in the rotation
    dt = x.dtype
    f, fp = x.to(tl.float32), xp.to(tl.float32)
    if NORM:
        rstd = tl.rsqrt(tl.sum(f * f, axis=1) / HEAD_DIM + eps)[:, None]
        w = tl.load(w_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
        wp = tl.load(w_ptr + partner, mask=d < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
        if NORM == 1:
            f, fp = (f * rstd).to(dt).to(tl.float32), (fp * rstd).to(dt).to(tl.float32)
        else:
            f, fp = f * rstd, fp * rstd
        f, fp = (w * f).to(dt).to(tl.float32), (wp * fp).to(dt).to(tl.float32)
    r_ok = d < ROT
    c = tl.load(cos_row + d, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_row + d, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    sign = tl.where(d < ROT // 2, -1.0, 1.0)[None, :]
    rotated = (f * c).to(dt).to(tl.float32) + sign * (fp * s).to(dt).to(tl.float32)
    return tl.where(r_ok[None, :], rotated, f).to(dt)


@triton.jit
def _store_new(
    k_ptr, v_ptr, kn_ptr, vn_ptr, kw_ptr, cos_row, sin_row, slot_ptr, b, kvh, d, d_ok, eps, cache_slots,
    sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, skn_t, skn_h, svn_t, svn_h,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, ROT: tl.constexpr, QK_NORM: tl.constexpr,
):  # fmt: skip
    """Sequence b's new key of KV head kvh (normed, rotated: `_rotated`) and its value into the cache row
    of its slot, as the rotary launch stores them (nothing for a slot outside the cache)."""
    slot = tl.load(slot_ptr + b).to(tl.int64)
    inside = (slot >= 0) & (slot < cache_slots)
    slot = tl.where(inside, slot, 0)  # (a slot outside: its row is never written)
    ok = d_ok[None, :] & inside
    h = kvh + tl.arange(0, 1)
    k_rows = kn_ptr + b * skn_t + h[:, None] * skn_h
    key = _rotated(k_rows, kw_ptr, cos_row, sin_row, d, ok, eps, HEAD_DIM, ROT, QK_NORM)
    row, col = (slot // PAGE) * sk_b + (slot % PAGE) * sk_s, h[:, None] * sk_h + d[None, :]
    tl.store(k_ptr + row + col, key.to(k_ptr.dtype.element_ty), mask=ok)
    value = tl.load(vn_ptr + b * svn_t + h[:, None] * svn_h + d[None, :], mask=ok)
    row, col = (slot // PAGE) * sv_b + (slot % PAGE) * sv_s, h[:, None] * sv_h + d[None, :]
    tl.store(v_ptr + row + col, value.to(v_ptr.dtype.element_ty), mask=ok)


@triton.jit
def split_done(acc, m_i, l_i, part_ptrs, so_s, lse_row, count_ptr, out_ptrs, row_ok, col_ok,
               WRITE_LSE: tl.constexpr):  # fmt: skip
    """The end of a split program (program_id(2) of num_programs(2)): its rows' normalised output at
    part_ptrs + split * so_s, and with several splits (WRITE_LSE) their log-sum-exps at lse_row + split.
    An empty split (a short sequence) leaves l_i = 0: zeros and lse -inf, weight 0. Returns (the rows'
    output in out_ptrs' dtype: with one split the result, stored; whether this program finishes the rows:
    the one split, or the last of several to get here (count_ptr), which then merges them: `combine`)."""
    split = tl.program_id(2)
    part = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(part_ptrs + split * so_s, part.to(part_ptrs.dtype.element_ty), mask=mask)
    final = split == 0
    if WRITE_LSE:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_row + split, lse, mask=row_ok)
        final = last_one(count_ptr, tl.num_programs(2))
    return part.to(out_ptrs.dtype.element_ty), final


@triton.jit
def finish_split(
    acc, m_i, l_i, part_ptrs, so_s, lse_row, count_ptr, used, out_ptrs, row_ok, col_ok,
    WRITE_LSE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, PIPELINED: tl.constexpr,
):  # fmt: skip
    """`split_done`, then the last split of the rows to finish merges the `used` splits that hold keys into
    out_ptrs (`combine`, in split order: the result does not depend on timing)."""
    _, final = split_done(acc, m_i, l_i, part_ptrs, so_s, lse_row, count_ptr, out_ptrs, row_ok, col_ok,
                          WRITE_LSE)  # fmt: skip
    if WRITE_LSE:  # noqa: SIM102 (a compile-time test, then a run-time one)
        if final:
            combine(part_ptrs, lse_row, so_s, used, out_ptrs, row_ok, col_ok, ROWS, COLS, PIPELINED)


@triton.jit
def combine(part_ptrs, lse_row, so_s, used, out_ptrs, g_ok, d_ok, GROUP_PAD: tl.constexpr,
             BLOCK_D: tl.constexpr, PIPELINED: tl.constexpr):  # fmt: skip
    """out = sum_s 2^lse[s] * part[s] / sum_s 2^lse[s] over the splits that hold keys (log2 domain), in one
    pass in split order with a running maximum; the empty splits after them have weight 0 and are not
    read (the split count follows the cache's capacity, so most are empty at short lengths). Read past
    L1 (.cg): other programs wrote them."""
    top = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    total = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    mask = g_ok[:, None] & d_ok[None, :]
    if PIPELINED:
        for s0 in range(0, used, _MERGE_UNROLL):
            top, total, acc = _combine_splits(part_ptrs, lse_row, so_s, s0, used, g_ok, mask, top, total, acc)
    else:
        s0 = 0
        while s0 < used:
            top, total, acc = _combine_splits(part_ptrs, lse_row, so_s, s0, used, g_ok, mask, top, total, acc)
            s0 += _MERGE_UNROLL
    out = (acc / tl.where(total > 0, total, 1.0)[:, None]).to(out_ptrs.dtype.element_ty)
    tl.store(out_ptrs, out, mask=mask)
    return out


_MERGE_UNROLL: tl.constexpr = tl.constexpr(4)  # splits whose loads are in flight together in the merge


@triton.jit
def _combine_splits(part_ptrs, lse_row, so_s, s0, used, g_ok, mask, top, total, acc):
    """Add splits s0 .. s0 + _MERGE_UNROLL - 1 below `used`, in order (every split read holds keys: its
    lse is finite; a padded row reads 0; a split at or past `used` has lse -inf and weight 0)."""
    for i in tl.static_range(_MERGE_UNROLL):
        ok = s0 + i < used
        lse = tl.load(lse_row + s0 + i, mask=g_ok & ok, other=0.0, cache_modifier=".cg")
        lse = tl.where(ok, lse, float("-inf"))
        part = tl.load(part_ptrs + (s0 + i) * so_s, mask=mask & ok, other=0.0, cache_modifier=".cg")
        new_top = tl.maximum(top, lse)
        alpha = tl.exp2(top - new_top)  # 0 on the first split (top = -inf)
        w = tl.exp2(lse - new_top)
        top, total, acc = new_top, total * alpha + w, acc * alpha[:, None] + part * w[:, None]
    return top, total, acc


def split_buffers(
    out: torch.Tensor, splits: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(part [B, H, splits, D] fp32, lse [B, H, splits] fp32, counters: one per row group) for a split
    launch writing out [B, H, D] (`finish_split`); with one split the kernel writes `out` directly and
    reads neither lse nor the counters (placeholders then)."""
    batch, heads, dim = out.shape
    if splits == 1:
        return out.unsqueeze(2), out, out
    part = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=out.device)
    lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=out.device)
    return part, lse, launch_counters(out.device, batch * groups)


def num_splits(
    batch: int, kv_heads: int, max_kv_len: int, device: torch.device, tiles: AttnDecodeTiles
) -> int:
    """Splits per (sequence, KV head): enough programs for `tiles.waves` per SM, none under min_chunk, at
    most `tiles.max_splits` (a power of two)."""
    want = triton.cdiv(tiles.waves * num_sms(device), batch * kv_heads)
    cap = min(triton.cdiv(max_kv_len, tiles.min_chunk), tiles.max_splits)
    return triton.next_power_of_2(max(1, min(want, cap)))


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    window: int | None,
    tiles: AttnDecodeTiles | None = None,
    splits: int | None = None,
    sinks: torch.Tensor | None = None,
    rotary: DecodeRotary | None = None,
    o_shrink: GivenShrink | None = None,
) -> torch.Tensor:
    """One query token per sequence over its paged keys and values; CUDA-graph safe.

    q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
    kv_lens [B] int32 on q's device, each >= 1 and <= max_blocks * block_size. -> o [B, Hq, D].
    Semantics: those of `moelora.ops.torch.attention.paged_attention` with every seq_lens[b] = 1.
    `splits` overrides the shape-derived split count (tests, benchmarks); `sinks` [Hq]: GPT-OSS's.
    With `rotary` q is taken before the rotary embedding (and the q/k norm) and this step's keys and
    values are not yet in the cache: the launch first does what the rotary launch with its cache write
    would (partial rotary and zero-centred norms included: what the layer's separate launches do).
    With `o_shrink` (where `o_shrink_fits`) the launch also writes the output projection's LoRA shrink of
    o [B, Hq * D] into its xa [Hkv, B, R], chunk h over KV head h's query heads (`_o_shrink`).
    """
    batch, q_heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    check_cache(q, k_cache, v_cache, block_tables)
    if tuple(kv_lens.shape) != (batch,) or kv_lens.device != q.device:
        raise ValueError(f"paged_decode: kv_lens {tuple(kv_lens.shape)} must be [B={batch}] on {q.device}")
    tiles = TUNED.attn_decode_tiles if tiles is None else tiles
    if splits is None:
        splits = num_splits(batch, kv_heads, block_tables.shape[1] * page, q.device, tiles)
    group = q_heads // kv_heads
    out = torch.empty_like(q)
    part, lse, counts = split_buffers(out, splits, kv_heads)
    sinks_l2 = kv_lens if sinks is None else sinks.float() * LOG2E  # (a placeholder when there are none)
    pdl = dependent_launch(q.device, TUNED.pdl_for("attention"))
    k, v, cos, sin, slots, qw, kw, eps = q, q, q[:, 0], q[:, 0], kv_lens, q, q, 0.0  # unread placeholders
    norm = 0
    if rotary is not None:
        check_rotary(rotary, q)
        k, v, cos, sin, slots = rotary[:5]
        if rotary.q_weight is not None and rotary.k_weight is not None:
            qw, kw, eps = rotary.q_weight.contiguous(), rotary.k_weight.contiguous(), rotary.eps
            norm = 2 if rotary.weight_first else 1
    o_args, o_const = _o_shrink_args(o_shrink, q, kv_heads)
    _decode_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, kv_lens, part, lse, out, counts, sinks_l2, scale * LOG2E,
        window or 0,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        *part.stride()[:3], out.stride(0), out.stride(1),
        k, v, qw, kw, cos, sin, slots, eps, k_cache.shape[0] * page, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), cos.stride(0), sin.stride(0), *o_args,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PAGE=page, BLOCK_N=tiles.block_n,
        WRITE_LSE=splits > 1,
        HAS_WINDOW=window is not None, IEEE=q.dtype == torch.float32, PIPELINED=q.is_cuda,
        HAS_SINKS=sinks is not None, PDL=pdl, ROTATE=rotary is not None,
        QK_NORM=norm, ROT=cos.shape[-1], **o_const,
        num_warps=tiles.warps, num_stages=tiles.stages, launch_pdl=pdl,
    )  # fmt: skip
    return out


def o_shrink_fits(q_heads: int, kv_heads: int, head_dim: int, rank: int) -> bool:
    """Whether the decode launch can compute the output projection's LoRA shrink (`paged_decode`'s
    `o_shrink`): the A block of a KV head's query heads, [D, heads x lanes] as one tile, at most 16k values
    (a [128, 128] tile: 8 heads of 128 features at rank 16)."""
    group = triton.next_power_of_2(q_heads // kv_heads)
    return group * max(16, triton.next_power_of_2(rank)) * max(16, triton.next_power_of_2(head_dim)) <= 16384


def o_shrink_for(
    q: torch.Tensor, kv_heads: int, lora: DenseLora, token_slot: torch.Tensor
) -> GivenShrink | None:
    """`paged_decode`'s `o_shrink` for q [B, Hq, D] over kv_heads KV heads and the output projection's
    adapter slots `lora` (one part), its xa allocated; None where it does not fit (`o_shrink_fits`)."""
    batch, q_heads, head_dim = q.shape
    rank = lora.a.shape[2]
    if not o_shrink_fits(q_heads, kv_heads, head_dim, rank):
        return None
    xa = torch.empty(kv_heads, batch, rank, dtype=torch.float32, device=q.device)
    return GivenShrink(xa, lora, token_slot)


def _o_shrink_args(
    o_shrink: GivenShrink | None, q: torch.Tensor, kv_heads: int
) -> tuple[tuple[object, ...], dict[str, int]]:
    """The decode kernel's o-shrink arguments (placeholders, never read, without one) and constexprs."""
    batch, q_heads, head_dim = q.shape
    if o_shrink is None:
        args: tuple[object, ...] = (q, q, q, q, batch, 1, 0, 0, 0, 0)
        return args, dict(O_SLOTS=0, O_HAS_RANK=False, GROUP_P2=1, BLOCK_R=16, O_LINE=1, O_LINES=16)
    xa, lora, slot = o_shrink
    a, rank_of = lora.a[:, 0], lora.rank[:, 0]
    num_slots, rank = a.shape[0], a.shape[1]
    if (
        lora.a.shape[1] != 1
        or a.shape[2] != q_heads * head_dim
        or a.dtype != q.dtype
        or xa.shape != (kv_heads, batch, rank)
        or xa.dtype != torch.float32
        or not xa.is_contiguous()
        or slot.shape != (batch,)
    ):
        raise ValueError(
            f"paged_decode: o_shrink xa {tuple(xa.shape)} {xa.dtype}, a {tuple(lora.a.shape)} {a.dtype}, "
            f"slots {tuple(slot.shape)}: xa [Hkv={kv_heads}, B={batch}, R] fp32 contiguous, a [S, 1, R, "
            f"Hq * D={q_heads * head_dim}] in q's dtype {q.dtype}, slots [B]"
        )
    if not o_shrink_fits(q_heads, kv_heads, head_dim, rank):
        raise ValueError(
            f"paged_decode: an o_shrink of rank {rank} over these heads does not fit (`o_shrink_fits`)"
        )
    line = max(1, 128 // a.element_size())  # columns a 128-byte cache line holds
    cols = q_heads // kv_heads * head_dim
    args = (a, xa, slot, rank_of, batch, rank, *a.stride(), rank_of.stride(0))
    const = dict(
        O_SLOTS=num_slots, O_HAS_RANK=True, GROUP_P2=triton.next_power_of_2(q_heads // kv_heads),
        BLOCK_R=max(16, triton.next_power_of_2(rank)), O_LINE=line,
        O_LINES=triton.next_power_of_2(rank * triton.cdiv(cols, line)),
    )  # fmt: skip
    return args, const


class DecodeRotary(NamedTuple):
    """What `paged_decode` does first with `rotary`: the step's keys k [B, Hkv, D] and values v (before
    the rotary embedding), cos and sin [B, R] of the first R features (R <= D, even: partial rotary where
    R < D), each sequence's cache slot [B], and a per-head q/k RMSNorm before it (weights [D] and eps;
    None without one; `weight_first` as `rms_norm`'s: zero-centred norms)."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    slot_mapping: torch.Tensor
    q_weight: torch.Tensor | None
    k_weight: torch.Tensor | None
    eps: float
    weight_first: bool = False


def check_rotary(rotary: DecodeRotary, q: torch.Tensor) -> None:
    """The shapes and strides `paged_decode`'s `rotary` takes with q [B, Hq, D]."""
    b, _, d = q.shape
    k, v, cos, sin, slots, qw, kw = rotary[:7]
    rot = cos.shape[-1]
    if k.dim() != 3 or k.shape[0] != b or k.shape[2] != d or v.shape != k.shape or slots.shape != (b,):
        raise ValueError(
            f"paged_decode: rotary k {tuple(k.shape)}, v {tuple(v.shape)}, slots {tuple(slots.shape)} must "
            f"be [B={b}, Hkv, D={d}] twice and [B]"
        )
    if cos.shape != (b, rot) or sin.shape != cos.shape or rot % 2 or not 0 < rot <= d:
        raise ValueError(
            f"paged_decode: rotary cos {tuple(cos.shape)}, sin {tuple(sin.shape)} must be [B={b}, R] with R "
            f"even and at most D={d}"
        )
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("paged_decode: rotary q, k, v, cos and sin need unit stride over their last dim")
    weights = [w for w in (qw, kw) if w is not None]
    if len(weights) == 1 or any(w.shape != (d,) for w in weights):
        raise ValueError(f"paged_decode: the q/k norm needs both weights, each [D={d}]")


def check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor) -> None:
    """The layout the attention kernels assume: unit stride over D, GQA heads dividing evenly."""
    q_heads, head_dim = q.shape[1], q.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"attention: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
            f"[num_blocks, block_size, Hkv, D={head_dim}]"
        )
    if q_heads % k_cache.shape[2]:
        raise ValueError(
            f"attention: {q_heads} query heads are not a multiple of {k_cache.shape[2]} KV heads"
        )
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("attention: q, k_cache and v_cache need unit stride over the head dim")
    if tables.dim() != 2 or tables.dtype != torch.int32 or tables.stride(1) != 1:
        raise ValueError(
            f"attention: block_tables must be [B, max_blocks] int32 with unit stride, got "
            f"{tuple(tables.shape)} {tables.dtype} strides {tables.stride()}"
        )
