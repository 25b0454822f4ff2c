"""LoRA shrink over aligned rows: out[row, half] = A[s, e, half] @ in[row] for each row's slot s.

One program per busy (expert, slot) bucket of the alignment and split of the input: it streams that
bucket's A once over its input columns, whatever the number of rows, and runs no pass over rows of other
slots (a row block holding many adapters would run one pass per adapter, each a full-height dot). With few
rows (small batches) the input is split, so that a bucket's A streams from several SMs at once: a program
then waits on a couple of loads, not on a chain of 16, and the GEMM that takes the result adds the splits
up in its epilogue (in split order, so the sum does not depend on timing)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.triton.common import busy_bucket, lanes_in_rank
from moelora.ops.triton.tiles import TUNED, KernelPlan, dot_precision


@triton.jit
def _shrink_kernel(
    in_ptr, a_ptr, out_ptr, sorted_ptr, start_ptr, count_ptr, busy_ptr, rank_ptr,
    top_k, rank, num_slots, num_busy, num_rows,
    s_in_row, s_in_k, sa_s, sa_e, sa_h, sa_r, sa_k,
    IN_DIM: tl.constexpr, CHUNK: tl.constexpr, HALVES: tl.constexpr, GATHER: tl.constexpr,
    HAS_RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0) // num_busy
    e, s, start, count = busy_bucket(busy_ptr, tl.program_id(0) % num_busy, start_ptr, count_ptr, num_slots)
    if count == 0:
        return
    # Output column j: half j // rank, rank lane j % rank; both halves read each input row once.
    j = tl.arange(0, BLOCK_R)
    j_ok = j < HALVES * rank
    lane_ok = j_ok & lanes_in_rank(j % rank, rank, rank_ptr, s, HAS_RANK)
    a_ptrs = a_ptr + s.to(tl.int64) * sa_s + e.to(tl.int64) * sa_e + ((j // rank) * sa_h + (j % rank) * sa_r)
    kk = split * CHUNK + tl.arange(0, BLOCK_K)
    m0 = 0
    while m0 < count:
        i = m0 + tl.arange(0, BLOCK_M)
        ok = i < count
        rows = start + i
        # x of the pair's token, or the aligned row itself (h of the pair).
        in_row = tl.load(sorted_ptr + rows, mask=ok, other=0) // top_k if GATHER else rows
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, CHUNK, BLOCK_K):
            k_ok = kk + k0 < IN_DIM
            xk = tl.load(
                in_ptr + in_row[:, None].to(tl.int64) * s_in_row + (k0 + kk)[None, :] * s_in_k,
                mask=ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            ak = tl.load(
                a_ptrs[None, :] + (k0 + kk)[:, None] * sa_k, mask=k_ok[:, None] & lane_ok[None, :], other=0.0
            )
            acc = tl.dot(xk, ak, acc, input_precision=PRECISION)
        dst = out_ptr + (split * num_rows + rows)[:, None].to(tl.int64) * (HALVES * rank) + j[None, :]
        tl.store(dst, acc, mask=ok[:, None] & j_ok[None, :])
        m0 += BLOCK_M


def moe_lora_shrink(
    inp: torch.Tensor,
    a: torch.Tensor,
    sorted_pairs: torch.Tensor,
    bucket_start: torch.Tensor,
    bucket_count: torch.Tensor,
    busy: torch.Tensor,
    top_k: int,
    gather: bool,
    block_m: int,
    splits: int = 1,
    slot_rank: torch.Tensor | None = None,
    plan: KernelPlan = TUNED,
) -> torch.Tensor:
    """-> out [P, rows, halves, R] fp32 whose sum over P is a[s, e, h] @ inp[src] for each aligned row
    whose pair (t, j) has a slot s in [0, S) (other rows are not written).

    a [S, E_loc, halves, R, K] (gate/up) or [S, E_loc, R, K] (down, one half); src = t if `gather`
    (inp [T, K]) else the aligned row (inp [rows, K]); bucket_start / bucket_count / busy from
    `align.moe_align_buckets`; block_m rows per step (`tiles.shrink_rows`); the input split in P parts
    of whole `plan.shrink_k`-column steps, P <= `splits`. slot_rank [S] or None: A's rank lanes at or
    above it are padding, not read.
    """
    a5 = a if a.dim() == 5 else a.unsqueeze(2)
    num_slots, _, halves, rank, in_dim = a5.shape
    block_k = plan.shrink_k
    chunk = triton.cdiv(triton.cdiv(in_dim, max(1, splits)), block_k) * block_k
    parts = triton.cdiv(in_dim, chunk)
    rows = sorted_pairs.numel()
    out = torch.empty(parts, rows, halves, rank, dtype=torch.float32, device=inp.device)
    if num_slots == 0:
        return out
    ranks = sorted_pairs if slot_rank is None else slot_rank
    _shrink_kernel[(busy.numel() * parts,)](
        inp, a5, out, sorted_pairs, bucket_start, bucket_count, busy, ranks,
        top_k, rank, num_slots, busy.numel(), rows,
        inp.stride(0), inp.stride(1), *a5.stride(),
        IN_DIM=in_dim, CHUNK=chunk, HALVES=halves, GATHER=gather, HAS_RANK=slot_rank is not None,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=max(16, triton.next_power_of_2(halves * rank)),
        PRECISION=dot_precision(inp.dtype),
    )  # fmt: skip
    return out
