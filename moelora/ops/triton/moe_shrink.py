"""LoRA shrink over aligned rows: out[row, half] = A[s, e, half] @ in[row] for each row's slot s."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.triton.common import lanes_in_rank
from moelora.ops.triton.tiles import dot_precision

_SUB_M = 32


@triton.jit
def _shrink_kernel(
    in_ptr, a_ptr, out_ptr, sorted_ptr, block_expert_ptr, slot_ptr, rank_ptr,
    num_pairs, top_k, rank, num_slots,
    s_in_row, s_in_k, sa_s, sa_e, sa_h, sa_r, sa_k,
    IN_DIM: tl.constexpr, HALVES: tl.constexpr, GATHER: tl.constexpr, ALIGN_M: tl.constexpr,
    HAS_RANK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m * BLOCK_M // ALIGN_M).to(tl.int64)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    row_ok = pair < num_pairs
    tok = tl.where(row_ok, pair // top_k, 0)
    slot = tl.load(slot_ptr + tok, mask=row_ok, other=-1)
    slot = tl.where((slot >= 0) & (slot < num_slots), slot, num_slots).to(tl.int32)
    # A gathered row (x of the pair's token) or the aligned row itself (h of the pair).
    in_row = tok if GATHER else rows
    # Output column j: half j // rank, rank lane j % rank; both halves read each input row once.
    j = tl.arange(0, BLOCK_R)
    j_ok = j < HALVES * rank
    a_col = (j // rank) * sa_h + (j % rank) * sa_r
    kk = tl.arange(0, BLOCK_K)
    out = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    # Rows are slot-sorted within the expert: one pass per distinct slot of this block.
    s = tl.min(slot)
    while s < num_slots:
        sel = slot == s
        a_base = a_ptr + s.to(tl.int64) * sa_s + e * sa_e
        lane_ok = j_ok & lanes_in_rank(j % rank, rank, rank_ptr, s, HAS_RANK)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, IN_DIM, BLOCK_K):
            k_ok = kk < IN_DIM - k0
            xk = tl.load(
                in_ptr + in_row[:, None].to(tl.int64) * s_in_row + (k0 + kk)[None, :] * s_in_k,
                mask=sel[:, None] & k_ok[None, :],
                other=0.0,
            )
            ak = tl.load(
                a_base + a_col[None, :] + (k0 + kk)[:, None] * sa_k,
                mask=k_ok[:, None] & lane_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(xk, ak, acc, input_precision=PRECISION)
        out += acc
        s = tl.min(tl.where(slot > s, slot, num_slots))
    dst = out_ptr + rows[:, None].to(tl.int64) * (HALVES * rank) + j[None, :]
    tl.store(dst, out, mask=row_ok[:, None] & j_ok[None, :])


def moe_lora_shrink(
    inp: torch.Tensor,
    a: torch.Tensor,
    sorted_pairs: torch.Tensor,
    block_expert: torch.Tensor,
    token_slot: torch.Tensor,
    top_k: int,
    gather: bool,
    block_m: int,
    slot_rank: torch.Tensor | None = None,
) -> torch.Tensor:
    """-> out [rows, halves, R] fp32: out[row, h] = a[s, e, h] @ inp[src] for the row's pair (t, j).

    a [S, E_loc, halves, R, K] (gate/up) or [S, E_loc, R, K] (down, one half); src = t if `gather`
    (inp [T, K]) else the aligned row (inp [rows, K]). Rows whose slot is outside [0, S) hold zeros,
    padding rows are not written. slot_rank [S] or None: A's rank lanes at or above it are padding, not
    read.
    """
    a5 = a if a.dim() == 5 else a.unsqueeze(2)
    num_slots, _, halves, rank, in_dim = a5.shape
    rows, blocks = sorted_pairs.numel(), block_expert.numel()
    out = torch.empty(rows, halves, rank, dtype=torch.float32, device=inp.device)
    num_pairs = token_slot.numel() * top_k
    # Sub-blocks of the alignment's row blocks: each pass over a slot's rows computes all of the
    # sub-block's rows, so fewer rows per program waste less where a block holds several slots.
    sub_m = min(block_m, _SUB_M)
    _shrink_kernel[(blocks * (block_m // sub_m),)](
        inp, a5, out, sorted_pairs, block_expert, token_slot, token_slot if slot_rank is None else slot_rank,
        num_pairs, top_k, rank, num_slots,
        inp.stride(0), inp.stride(1), *a5.stride(),
        IN_DIM=in_dim, HALVES=halves, GATHER=gather, ALIGN_M=block_m, HAS_RANK=slot_rank is not None,
        BLOCK_M=sub_m, BLOCK_K=128, BLOCK_R=max(16, triton.next_power_of_2(halves * rank)),
        PRECISION=dot_precision(inp.dtype),
    )  # fmt: skip
    return out
