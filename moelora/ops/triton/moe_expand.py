"""Down-projection LoRA expand over the alignment's (expert, slot) buckets, added to the down GEMM's output.

In the down GEMM's epilogue a row block holding n distinct adapters runs n full-height dots, one after
another, each waiting on its B tile; with 16 adapters that cost more than the base GEMM itself. Here each
program holds one bucket's B tile and its rows, so each (adapter, expert) B tile is read once per step of
rows and the dots cover only the bucket's rows; the price is one read and write of those rows of d."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.triton.common import add_expand, busy_bucket, lanes_in_rank, sum_parts
from moelora.ops.triton.tiles import TUNED, KernelPlan, dot_precision, expand_mode


@triton.jit
def _expand_kernel(
    d_ptr, ha_ptr, b_ptr, sorted_ptr, start_ptr, count_ptr, busy_ptr, rank_ptr,
    rank, num_slots, part_stride, sb_s, sb_e, sb_n, sb_r,
    HIDDEN: tl.constexpr, TILES: tl.constexpr, PARTS: tl.constexpr, HAS_RANK: tl.constexpr,
    EXPAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    e, s, start, count = busy_bucket(busy_ptr, tl.program_id(0), start_ptr, count_ptr, num_slots)
    if count == 0:
        return
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rank
    lanes = lanes_in_rank(r, rank, rank_ptr, s, HAS_RANK)
    b_bucket = b_ptr + s.to(tl.int64) * sb_s + e.to(tl.int64) * sb_e + r[:, None] * sb_r
    m0 = 0
    while m0 < count:
        i = m0 + tl.arange(0, BLOCK_M)
        ok = i < count
        rows = start + i
        pair = tl.load(sorted_ptr + rows, mask=ok, other=0)
        ha_ptrs = ha_ptr + rows[:, None].to(tl.int64) * rank + r[None, :]
        ha = sum_parts(ha_ptrs, part_stride, ok[:, None] & r_ok[None, :], PARTS)
        d_rows = d_ptr + pair[:, None].to(tl.int64) * HIDDEN
        # This program's column tiles of these rows in turn: the rows' intermediates stay in registers.
        for t in range(0, TILES):
            n = (tl.program_id(1) + t * tl.num_programs(1)) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < HIDDEN
            b_mask = lanes[:, None] & n_ok[None, :]
            delta = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            delta = add_expand(delta, ha, b_bucket + n[None, :] * sb_n, b_mask, EXPAND, PRECISION)
            d_mask = ok[:, None] & n_ok[None, :]
            d = tl.load(d_rows + n[None, :], mask=d_mask, other=0.0).to(tl.float32)
            tl.store(d_rows + n[None, :], (d + delta).to(d_ptr.dtype.element_ty), mask=d_mask)
        m0 += BLOCK_M


def moe_lora_expand(
    d: torch.Tensor,
    ha: torch.Tensor,
    b: torch.Tensor,
    sorted_pairs: torch.Tensor,
    bucket_start: torch.Tensor,
    bucket_count: torch.Tensor,
    busy: torch.Tensor,
    block_m: int,
    slot_rank: torch.Tensor | None = None,
    plan: KernelPlan = TUNED,
) -> None:
    """d[p] += b[s, e] @ sum_q ha[q, row] for each aligned row of a pair p with a slot s in [0, S) (in
    place).

    d [P, H] (the down GEMM's output, by pair); ha [Q, rows, R] fp32 from the shrink (Q input splits);
    b [S, E_loc, H, R]; bucket_start / bucket_count / busy from `align.moe_align_buckets`; block_m rows per
    step. slot_rank [S] or None: B's columns at or above it are padding, not read.
    """
    num_slots, _, hidden, rank = b.shape
    if num_slots == 0:
        return
    # Column tiles split over enough programs to fill the GPU when the buckets are few (8 experts); with
    # many buckets one program takes all of a bucket's columns (no empty programs per column tile).
    block_n = plan.expand_n
    col_tiles = triton.cdiv(hidden, block_n)
    splits = min(col_tiles, triton.cdiv(plan.expand_programs, busy.numel()))
    ranks = bucket_count if slot_rank is None else slot_rank
    _expand_kernel[(busy.numel(), splits)](
        d, ha, b, sorted_pairs, bucket_start, bucket_count, busy, ranks,
        rank, num_slots, ha[0].numel(), *b.stride(),
        HIDDEN=hidden, TILES=triton.cdiv(col_tiles, splits), PARTS=ha.shape[0],
        HAS_RANK=slot_rank is not None, EXPAND=expand_mode(d.dtype, plan), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), PRECISION=dot_precision(d.dtype),
    )  # fmt: skip
