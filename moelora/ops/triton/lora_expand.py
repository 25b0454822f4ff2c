"""Dense multi-LoRA expand, added in place: y[t] += B[s] @ xa[t] (a block's slots a group at a time,
`common.add_expand_slots`); a layer with stacked output parts (q/k/v) in one launch, each column tile
taking its part's lanes of xa."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.triton.common import add_expand_slots, slot_group, valid_slot
from moelora.ops.triton.tiles import TUNED, KernelPlan, LoraTiles, dot_precision, expand_mode


@triton.jit
def _lora_expand_kernel(
    xa_ptr, b_ptr, y_ptr, slot_ptr, rank_ptr, num_tokens, out_dim, rank, num_slots,
    sxa_s, sxa_t, sb_s, sb_n, sb_r, sy_t, sy_n, s_rs, s_rp,
    SPLITS: tl.constexpr, HAS_RANK: tl.constexpr, END0: tl.constexpr, END1: tl.constexpr, END2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SLOT_GROUP: tl.constexpr,
    EXPAND: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = tl.program_id(1) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    # The stacked part of this column tile (ENDi: where part i + 1 starts; no tile crosses one).
    part = (n0 >= END0).to(tl.int32) + (n0 >= END1).to(tl.int32) + (n0 >= END2).to(tl.int32)
    t_ok = t < num_tokens
    n_ok = n < out_dim
    slot = tl.load(slot_ptr + t, mask=t_ok, other=-1)
    slot = valid_slot(slot, num_slots)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rank
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    s = tl.min(slot)
    if s < num_slots:
        # xa of every token with a slot: the shrink's partial sums added up.
        xa_ptrs = xa_ptr + t[:, None].to(tl.int64) * sxa_t + (part * rank + r)[None, :]
        xa_mask = (slot < num_slots)[:, None] & r_ok[None, :]
        xa = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for i in range(0, SPLITS):
            xa += tl.load(xa_ptrs + i * sxa_s, mask=xa_mask, other=0.0)
        b_ptrs = b_ptr + n[None, :] * sb_n + r[:, None] * sb_r
        acc = add_expand_slots(
            acc, xa, slot, b_ptrs, n_ok, r, rank, rank_ptr + part * s_rp, num_slots, sb_s, s_rs,
            HAS_RANK, SLOT_GROUP, EXPAND, PRECISION,
        )  # fmt: skip
        # Only tokens with a slot are read and written: base tokens keep y untouched.
        y_ptrs = y_ptr + t[:, None].to(tl.int64) * sy_t + n[None, :] * sy_n
        mask = (slot < num_slots)[:, None] & n_ok[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


def lora_expand(
    y: torch.Tensor,
    xa: torch.Tensor,
    b: torch.Tensor,
    token_slot: torch.Tensor,
    tiles: LoraTiles,
    slot_rank: torch.Tensor | None = None,
    plan: KernelPlan = TUNED,
    sizes: tuple[int, ...] | None = None,
) -> None:
    """y[t] += b[s] @ sum(xa[:, t]) in place for s = token_slot[t] in [0, S); y [T, out] (any strides),
    xa [splits, T, R] fp32 partial sums from `lora_shrink` (its last dimension contiguous: a column slice
    of a stacked shrink's output is fine), b [S, out, R] (any strides); slot_rank None or [S] int (any
    stride): B's columns at or above a slot's rank are padding, not read.

    With `sizes` (stacked parts, at most 4, each but the last a multiple of `tiles.expand_n`): xa is
    [splits, T, P * R], part p's lanes p * R .. (p + 1) * R expand into its columns, and slot_rank is
    [S, P] or None."""
    num_tokens, out_dim = y.shape
    num_slots, rank = b.shape[0], b.shape[2]
    grid = (triton.cdiv(num_tokens, tiles.block_m), triton.cdiv(out_dim, tiles.expand_n))
    block_r = max(16, triton.next_power_of_2(rank))
    ranks = token_slot if slot_rank is None else slot_rank  # a placeholder when there is none
    ends = [] if sizes is None else [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
    ends += [1 << 30] * (3 - len(ends))
    _lora_expand_kernel[grid](
        xa, b, y, token_slot, ranks, num_tokens, out_dim, rank, num_slots, xa.stride(0), xa.stride(1),
        *b.stride(), *y.stride(), ranks.stride(0), ranks.stride(-1) if ranks.dim() > 1 else 0,
        SPLITS=xa.shape[0], HAS_RANK=slot_rank is not None, END0=ends[0], END1=ends[1], END2=ends[2],
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.expand_n, BLOCK_R=block_r,
        SLOT_GROUP=slot_group(num_slots, block_r), EXPAND=expand_mode(b.dtype, plan),
        PRECISION=dot_precision(y.dtype), num_warps=tiles.warps,
    )  # fmt: skip
