"""Merges the per-split partial outputs of split-KV decode attention by their log-sum-exps."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine_kernel(
    part_ptr, lse_ptr, o_ptr, splits, sp_b, sp_h, sp_s, so_b, so_h,
    HEADS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < splits
    d_ok = d < HEAD_DIM
    # log2 domain; -inf for empty splits
    lse = tl.load(lse_ptr + (b * HEADS + h) * splits + s, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    part = tl.load(
        part_ptr + b * sp_b + h * sp_h + s[:, None] * sp_s + d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(o_ptr + b * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty), mask=d_ok)


def combine_splits(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
    """out[b, h] = sum_s 2^lse[b, h, s] * part[b, h, s] / sum_s 2^lse[b, h, s].

    part [B, H, S, D] fp32 (each split's normalised output), lse [B, H, S] fp32 contiguous (log2 of each
    split's softmax denominator, scores in log2 units; -inf for a split without keys), out [B, H, D].
    """
    batch, heads, splits, head_dim = part.shape
    if tuple(lse.shape) != (batch, heads, splits) or not lse.is_contiguous() or part.stride(3) != 1:
        raise ValueError(f"combine_splits: lse {tuple(lse.shape)} must be contiguous [B, H, S] of part's")
    _combine_kernel[(batch, heads)](
        part, lse, out, splits, *part.stride()[:3], out.stride(0), out.stride(1),
        HEADS=heads, BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip
