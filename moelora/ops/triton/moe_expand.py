"""Down-projection LoRA expand over the alignment's (expert, slot) buckets, added to the down GEMM's output.

In the down GEMM's epilogue a row block holding n distinct adapters runs n full-height dots, one after
another, each waiting on its B tile; with 16 adapters that cost more than the base GEMM itself. Here each
program holds one bucket's B tile and its rows, so each (adapter, expert) B tile is read once per column
tile and the dots cover only the bucket's rows; the price is one read and write of those rows of d."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.triton.common import add_expand, lanes_in_rank
from moelora.ops.triton.tiles import dot_precision, expand_mode


@triton.jit
def _expand_kernel(
    d_ptr, ha_ptr, b_ptr, sorted_ptr, start_ptr, count_ptr, rank_ptr,
    hidden, rank, num_slots, sb_s, sb_e, sb_n, sb_r,
    HAS_RANK: tl.constexpr, EXPAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0) // num_slots
    s = tl.program_id(0) % num_slots
    bucket = e * (num_slots + 1) + s  # the alignment's (expert, slot class) index
    count = tl.load(count_ptr + bucket)
    if count == 0:
        return
    start = tl.load(start_ptr + bucket)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < hidden
    r = tl.arange(0, BLOCK_R)
    b_ptrs = b_ptr + s.to(tl.int64) * sb_s + e.to(tl.int64) * sb_e + n[None, :] * sb_n + r[:, None] * sb_r
    b_mask = lanes_in_rank(r, rank, rank_ptr, s, HAS_RANK)[:, None] & n_ok[None, :]
    m0 = 0
    while m0 < count:
        i = m0 + tl.arange(0, BLOCK_M)
        ok = i < count
        rows = start + i
        pair = tl.load(sorted_ptr + rows, mask=ok, other=0)
        ha_ptrs = ha_ptr + rows[:, None].to(tl.int64) * rank + r[None, :]
        ha = tl.load(ha_ptrs, mask=ok[:, None] & (r < rank)[None, :], other=0.0)
        delta = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        delta = add_expand(delta, ha, b_ptrs, b_mask, EXPAND, PRECISION)
        dst = d_ptr + pair[:, None].to(tl.int64) * hidden + n[None, :]
        d_mask = ok[:, None] & n_ok[None, :]
        d = tl.load(dst, mask=d_mask, other=0.0).to(tl.float32)
        tl.store(dst, (d + delta).to(d_ptr.dtype.element_ty), mask=d_mask)
        m0 += BLOCK_M


def moe_lora_expand(
    d: torch.Tensor,
    ha: torch.Tensor,
    b: torch.Tensor,
    sorted_pairs: torch.Tensor,
    bucket_start: torch.Tensor,
    bucket_count: torch.Tensor,
    block_m: int,
    slot_rank: torch.Tensor | None = None,
) -> None:
    """d[p] += b[s, e] @ ha[row] for each aligned row of a pair p with a slot s in [0, S) (in place).

    d [P, H] (the down GEMM's output, by pair); ha [rows, 1, R] fp32 from the shrink; b [S, E_loc, H, R];
    bucket_start / bucket_count from `align.moe_align_buckets`; block_m rows per step. slot_rank [S] or
    None: B's columns at or above it are padding, not read.
    """
    num_slots, num_experts, hidden, rank = b.shape
    if num_slots == 0:
        return
    block_n = 128
    ranks = bucket_count if slot_rank is None else slot_rank
    _expand_kernel[(num_experts * num_slots, triton.cdiv(hidden, block_n))](
        d, ha, b, sorted_pairs, bucket_start, bucket_count, ranks,
        hidden, rank, num_slots, *b.stride(),
        HAS_RANK=slot_rank is not None, EXPAND=expand_mode(d.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(rank)),
        PRECISION=dot_precision(d.dtype),
    )  # fmt: skip
