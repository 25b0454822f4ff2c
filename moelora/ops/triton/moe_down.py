"""Grouped down GEMM over aligned rows, LoRA expand fused; writes each pair's unweighted output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.triton.common import add_expand, grouped_pid, lanes_in_rank, num_blocks_grid, sum_parts
from moelora.ops.triton.tiles import Tiles, dot_precision, expand_mode


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, d_ptr, sorted_ptr, block_expert_ptr, slot_ptr, ha_ptr, b_ptr, rank_ptr,
    num_pairs, top_k, hidden, rank, num_slots, num_blocks, part_stride,
    sw_e, sw_n, sw_k, sb_s, sb_e, sb_n, sb_r,
    INTER: tl.constexpr, HAS_LORA: tl.constexpr, PARTS: tl.constexpr, HAS_RANK: tl.constexpr,
    EXPAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_pid(tl.program_id(0), num_blocks, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    row_ok = pair < num_pairs
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < hidden
    kk = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * INTER + kk[None, :]
    w_ptrs = w_ptr + e * sw_e + n[None, :] * sw_n + kk[:, None] * sw_k
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        k_ok = kk < INTER - k0
        hk = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wk = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(hk, wk, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * sw_k
    if HAS_LORA:
        tok = tl.where(row_ok, pair // top_k, 0)
        slot = tl.load(slot_ptr + tok, mask=row_ok, other=-1)
        slot = tl.where((slot >= 0) & (slot < num_slots), slot, num_slots).to(tl.int32)
        r = tl.arange(0, BLOCK_R)
        r_ok = r < rank
        ha_rows = ha_ptr + rows[:, None].to(tl.int64) * rank + r[None, :]
        ha_mask = (row_ok & (slot < num_slots))[:, None] & r_ok[None, :]
        ha = sum_parts(ha_rows, part_stride, ha_mask, PARTS)
        # Rows are slot-sorted within the expert: one expand per distinct slot of this block.
        s = tl.min(slot)
        while s < num_slots:
            sel = (slot == s)[:, None]
            b_ptrs = b_ptr + s.to(tl.int64) * sb_s + e * sb_e + n[None, :] * sb_n + r[:, None] * sb_r
            b_mask = lanes_in_rank(r, rank, rank_ptr, s, HAS_RANK)[:, None] & n_ok[None, :]
            acc = add_expand(acc, tl.where(sel, ha, 0.0), b_ptrs, b_mask, EXPAND, PRECISION)
            s = tl.min(tl.where(slot > s, slot, num_slots))
    dst = d_ptr + pair[:, None].to(tl.int64) * hidden + n[None, :]
    tl.store(dst, acc.to(d_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def moe_down(
    h: torch.Tensor,
    w_down: torch.Tensor,
    sorted_pairs: torch.Tensor,
    block_expert: torch.Tensor,
    num_tokens: int,
    top_k: int,
    tiles: Tiles,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
) -> torch.Tensor:
    """-> d [T * k, H] in h's dtype: w_down[e] @ h of each pair that runs (rows of other pairs unset).

    h [rows, I_loc] aligned rows; w_down [E_loc, H, I_loc]; lora = (token_slot [T], ha [P, rows, R] fp32,
    b_dn [S, E_loc, H, R], slot_rank [S] or None) adds b_dn[s, e] @ sum_p ha[p, row] (B's columns at or
    above the slot's rank are padding, not read); P input splits of the shrink.
    """
    hidden, inter = w_down.shape[1], w_down.shape[2]
    num_pairs = num_tokens * top_k
    d = torch.empty(num_pairs, hidden, dtype=h.dtype, device=h.device)
    slot_rank, parts = None, 1
    if lora is None:
        slot, ha, b, rank, num_slots = sorted_pairs, h, w_down.unsqueeze(0), 1, 0
    else:
        slot, ha, b, slot_rank = lora
        num_slots, rank, parts = b.shape[0], b.shape[-1], ha.shape[0]
        if tuple(ha.shape[1:]) != (sorted_pairs.numel(), rank) or not ha.is_contiguous():
            raise ValueError(f"ha {tuple(ha.shape)}: expected contiguous [P, {sorted_pairs.numel()}, {rank}]")
    blocks = block_expert.numel()
    _down_kernel[num_blocks_grid(blocks, hidden, tiles.block_n)](
        h, w_down, d, sorted_pairs, block_expert, slot, ha, b, slot if slot_rank is None else slot_rank,
        num_pairs, top_k, hidden, rank, num_slots, blocks, sorted_pairs.numel() * rank,
        *w_down.stride(), *b.stride(),
        INTER=inter, HAS_LORA=lora is not None, PARTS=parts, HAS_RANK=slot_rank is not None,
        EXPAND=expand_mode(h.dtype),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), GROUP_M=tiles.group_m,
        PRECISION=dot_precision(h.dtype), num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return d
