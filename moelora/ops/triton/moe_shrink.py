"""LoRA shrink over aligned rows: out[row, half] = A[s, e, half] @ in[row] for each row's slot s.

One program per (expert, slot) bucket of the alignment: it streams that bucket's A once, whatever the
number of rows, and runs no pass over rows of other slots (a row block holding many adapters would run
one pass per adapter, each a full-height dot)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.triton.common import bucket_of_program, lanes_in_rank
from moelora.ops.triton.tiles import dot_precision


@triton.jit
def _shrink_kernel(
    in_ptr, a_ptr, out_ptr, sorted_ptr, start_ptr, count_ptr, rank_ptr,
    top_k, rank, num_slots,
    s_in_row, s_in_k, sa_s, sa_e, sa_h, sa_r, sa_k,
    IN_DIM: tl.constexpr, HALVES: tl.constexpr, GATHER: tl.constexpr, HAS_RANK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    e, s, start, count = bucket_of_program(start_ptr, count_ptr, num_slots)
    if count == 0:
        return
    # Output column j: half j // rank, rank lane j % rank; both halves read each input row once.
    j = tl.arange(0, BLOCK_R)
    j_ok = j < HALVES * rank
    lane_ok = j_ok & lanes_in_rank(j % rank, rank, rank_ptr, s, HAS_RANK)
    a_ptrs = a_ptr + s.to(tl.int64) * sa_s + e.to(tl.int64) * sa_e + ((j // rank) * sa_h + (j % rank) * sa_r)
    kk = tl.arange(0, BLOCK_K)
    m0 = 0
    while m0 < count:
        i = m0 + tl.arange(0, BLOCK_M)
        ok = i < count
        rows = start + i
        # x of the pair's token, or the aligned row itself (h of the pair).
        in_row = tl.load(sorted_ptr + rows, mask=ok, other=0) // top_k if GATHER else rows
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, IN_DIM, BLOCK_K):
            k_ok = kk < IN_DIM - k0
            xk = tl.load(
                in_ptr + in_row[:, None].to(tl.int64) * s_in_row + (k0 + kk)[None, :] * s_in_k,
                mask=ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            ak = tl.load(
                a_ptrs[None, :] + (k0 + kk)[:, None] * sa_k, mask=k_ok[:, None] & lane_ok[None, :], other=0.0
            )
            acc = tl.dot(xk, ak, acc, input_precision=PRECISION)
        dst = out_ptr + rows[:, None].to(tl.int64) * (HALVES * rank) + j[None, :]
        tl.store(dst, acc, mask=ok[:, None] & j_ok[None, :])
        m0 += BLOCK_M


def moe_lora_shrink(
    inp: torch.Tensor,
    a: torch.Tensor,
    sorted_pairs: torch.Tensor,
    bucket_start: torch.Tensor,
    bucket_count: torch.Tensor,
    top_k: int,
    gather: bool,
    block_m: int,
    slot_rank: torch.Tensor | None = None,
) -> torch.Tensor:
    """-> out [rows, halves, R] fp32: out[row, h] = a[s, e, h] @ inp[src] for each aligned row whose
    pair (t, j) has a slot s in [0, S) (other rows are not written).

    a [S, E_loc, halves, R, K] (gate/up) or [S, E_loc, R, K] (down, one half); src = t if `gather`
    (inp [T, K]) else the aligned row (inp [rows, K]); bucket_start / bucket_count from
    `align.moe_align_buckets`; block_m rows per step (`tiles.shrink_rows`). slot_rank [S] or None: A's
    rank lanes at or above it are padding, not read.
    """
    a5 = a if a.dim() == 5 else a.unsqueeze(2)
    num_slots, num_experts, halves, rank, in_dim = a5.shape
    out = torch.empty(sorted_pairs.numel(), halves, rank, dtype=torch.float32, device=inp.device)
    if num_slots == 0:
        return out
    ranks = sorted_pairs if slot_rank is None else slot_rank
    _shrink_kernel[(num_experts * num_slots,)](
        inp, a5, out, sorted_pairs, bucket_start, bucket_count, ranks,
        top_k, rank, num_slots,
        inp.stride(0), inp.stride(1), *a5.stride(),
        IN_DIM=in_dim, HALVES=halves, GATHER=gather, HAS_RANK=slot_rank is not None,
        BLOCK_M=block_m, BLOCK_K=128, BLOCK_R=max(16, triton.next_power_of_2(halves * rank)),
        PRECISION=dot_precision(inp.dtype),
    )  # fmt: skip
    return out
