"""Grouped gate/up GEMM over aligned rows (gate and up columns interleaved in one dot), LoRA expand fused,
then SiLU(gate) * up."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.expert_extras import ExpertExtras
from moelora.ops.triton.common import (
    add_expand,
    extras_args,
    glu,
    grouped_pid,
    lanes_in_rank,
    num_blocks_grid,
    scale_args,
    sum_parts,
    valid_slot,
)
from moelora.ops.triton.fp8_act import quantize_activations
from moelora.ops.triton.tiles import TUNED, KernelPlan, Tiles, dot_precision, expand_mode


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, sorted_ptr, block_expert_ptr, slot_ptr, xa_ptr, b_ptr, rank_ptr, ad_ptr, ha_ptr,
    bias_ptr, sc_ptr, xs_ptr, num_pairs, top_k, inter, rank, num_slots, num_blocks, part_stride, num_rows,
    sx_t, sx_k, sw_e, sw_n, sw_k, sb_s, sb_e, sb_h, sb_n, sb_r, sd_s, sd_e, sd_r, sd_k, s_bias_e,
    ss_e, ss_n, sxs_t, limit, alpha,
    HIDDEN: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr, HAS_LORA: tl.constexpr,
    HAS_SCALE: tl.constexpr, GROUP: tl.constexpr, ACT_FP8: tl.constexpr,
    PARTS: tl.constexpr, DOWN_SHRINK: tl.constexpr,
    HAS_RANK: tl.constexpr, EXPAND: tl.constexpr, IL_EXPAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_pid(tl.program_id(0), num_blocks, tl.cdiv(inter, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    row_ok = pair < num_pairs
    tok = tl.where(row_ok, pair // top_k, 0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < inter
    kk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None].to(tl.int64) * sx_t + kk[None, :] * sx_k
    # One dot over 2 * BLOCK_N interleaved columns, gate (even) and up (odd) of column n0 + j // 2: one
    # wide MMA reads the x tile once (H200, Qwen3 shape, base: 774 against 793 us at M = 8192, 298 against
    # 309 at 2048, for a dot per half), and the halves split apart in registers.
    j = tl.arange(0, 2 * BLOCK_N)
    col = pid_n * BLOCK_N + j // 2
    w_ptrs = w_ptr + e * sw_e + ((j % 2) * inter + col)[None, :] * sw_n + kk[:, None] * sw_k
    col_ok = col < inter
    s_ptrs = sc_ptr + e * ss_e + ((j % 2) * inter + col) * ss_n
    acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        k_ok = kk < HIDDEN - k0
        xk = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wk = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_SCALE:  # FP8 columns times their scales (BLOCK_K <= GROUP: one a column)
            scale = tl.load(s_ptrs + k0 // GROUP, mask=col_ok, other=0.0)
            if ACT_FP8:  # x in FP8 too (`quantize_activations`), a scale a row a step (BLOCK_K == GROUP)
                x_scale = tl.load(xs_ptr + tok * sxs_t + k0 // GROUP, mask=row_ok, other=0.0)
                acc += tl.dot(xk, wk) * (x_scale[:, None] * scale[None, :])
            else:  # the weight tile in x's dtype
                wk = (wk.to(tl.float32) * scale[None, :]).to(xk.dtype)
                acc = tl.dot(xk, wk, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(xk, wk, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * sx_k
        w_ptrs += BLOCK_K * sw_k
    if HAS_LORA:
        slot = tl.load(slot_ptr + tok, mask=row_ok, other=-1)
        slot = valid_slot(slot, num_slots)
        r = tl.arange(0, BLOCK_R)
        r_ok = r < rank
        xa_mask = (row_ok & (slot < num_slots))[:, None] & r_ok[None, :]
    if HAS_LORA and IL_EXPAND:
        # The expand on the interleaved tile: lanes q < BLOCK_R are the gate's rank lanes, the rest the up's;
        # a B column takes only its own half's lanes. Twice the expand's MMA of a dot per half, but no
        # layout change of the accumulator (rank 16, 4 adapters, M = 8192: 832 against 867 us; rank 64,
        # 16 adapters: 1488 against 1185, so past rank 16 the halves split first).
        q = tl.arange(0, 2 * BLOCK_R)
        half = q // BLOCK_R
        lane = q % BLOCK_R
        xq_rows = xa_ptr + rows[:, None].to(tl.int64) * (2 * rank) + (half * rank + lane)[None, :]
        xq_mask = (row_ok & (slot < num_slots))[:, None] & (lane < rank)[None, :]
        xq = sum_parts(xq_rows, part_stride, xq_mask, PARTS)
        s = tl.min(slot)
        while s < num_slots:
            sel = (slot == s)[:, None]
            b_base = b_ptr + s.to(tl.int64) * sb_s + e * sb_e + half[:, None] * sb_h + col[None, :] * sb_n
            b_base += lane[:, None] * sb_r
            b_mask = lanes_in_rank(lane, rank, rank_ptr, s, HAS_RANK)[:, None] & col_ok[None, :]
            b_mask = b_mask & (half[:, None] == (j % 2)[None, :])
            acc = add_expand(acc, tl.where(sel, xq, 0.0), b_base, b_mask, EXPAND, PRECISION)
            s = tl.min(tl.where(slot > s, slot, num_slots))
    acc_g, acc_u = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
    if HAS_LORA and not IL_EXPAND:
        xa_rows = xa_ptr + rows[:, None].to(tl.int64) * (2 * rank) + r[None, :]
        xa_g = sum_parts(xa_rows, part_stride, xa_mask, PARTS)
        xa_u = sum_parts(xa_rows + rank, part_stride, xa_mask, PARTS)
        # Rows are slot-sorted within the expert: one expand per distinct slot of this block.
        s = tl.min(slot)
        while s < num_slots:
            sel = (slot == s)[:, None]
            b_base = b_ptr + s.to(tl.int64) * sb_s + e * sb_e + n[None, :] * sb_n + r[:, None] * sb_r
            b_mask = lanes_in_rank(r, rank, rank_ptr, s, HAS_RANK)[:, None] & n_ok[None, :]
            acc_g = add_expand(acc_g, tl.where(sel, xa_g, 0.0), b_base, b_mask, EXPAND, PRECISION)
            acc_u = add_expand(acc_u, tl.where(sel, xa_u, 0.0), b_base + sb_h, b_mask, EXPAND, PRECISION)
            s = tl.min(tl.where(slot > s, slot, num_slots))
    h = glu(acc_g, acc_u, bias_ptr + e * s_bias_e, n, n_ok, inter, limit, alpha, HAS_BIAS, CLAMPED)
    h = h.to(h_ptr.dtype.element_ty)
    dst = h_ptr + rows[:, None].to(tl.int64) * inter + n[None, :]
    tl.store(dst, h, mask=row_ok[:, None] & n_ok[None, :])
    if DOWN_SHRINK:
        # This column tile's part of the down shrink, a_dn[s, e][:, n] @ h[row, n] for each row's slot s:
        # part pid_n of ha, which the down GEMM adds up (no shrink launch of its own).
        ha = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        s = tl.min(slot)
        while s < num_slots:
            lanes = lanes_in_rank(r, rank, rank_ptr, s, HAS_RANK)
            ad_ptrs = ad_ptr + s.to(tl.int64) * sd_s + e * sd_e + r[None, :] * sd_r + n[:, None] * sd_k
            ad = tl.load(ad_ptrs, mask=n_ok[:, None] & lanes[None, :], other=0.0)
            ha = tl.dot(tl.where((slot == s)[:, None], h, 0.0), ad, ha, input_precision=PRECISION)
            s = tl.min(tl.where(slot > s, slot, num_slots))
        ha_dst = ha_ptr + (pid_n * num_rows + rows[:, None]).to(tl.int64) * rank + r[None, :]
        tl.store(ha_dst, ha, mask=xa_mask)


def moe_gate_up(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    sorted_pairs: torch.Tensor,
    block_expert: torch.Tensor,
    top_k: int,
    tiles: Tiles,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    a_dn: torch.Tensor | None = None,
    plan: KernelPlan = TUNED,
    extras: ExpertExtras | None = None,
    w8a8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (h, ha): h [rows, I_loc] in x's dtype, silu(gate) * up of each aligned row's pair (padding rows
    unset; with `extras` its gate/up biases and activation, FP8 weights times their scales, with `w8a8`
    by x's rows in FP8 per scale group, quantised first: `tiles.fp8_activations`); ha None, or with a_dn
    the down projection's LoRA shrink in parts.

    x [T, H]; w_gate_up [E_loc, 2 * I_loc, H]; lora = (token_slot [T], xa [P, rows, 2, R] fp32 from the
    shrink (P input splits), b_gu [S, E_loc, 2, I_loc, R], slot_rank [S] or None) adds
    b_gu[s, e, half] @ sum_p xa[p, row, half] before the activation (B's columns at or above the slot's
    rank are padding, not read). a_dn [S, E_loc, R, I_loc] (with lora): ha [Q, rows, R] fp32,
    Q = cdiv(I_loc, tiles.block_n), part q of a row of slot s holding a_dn[s, e][:, cols] @ h[row, cols]
    over the q-th block_n columns, so that sum_q ha[q, row] is the down shrink (rows without a slot in
    [0, S) are not written).
    """
    num_tokens, hidden = x.shape
    inter = w_gate_up.shape[1] // 2
    rows, blocks = sorted_pairs.numel(), block_expert.numel()
    h = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    slot_rank, parts, ha, ad = None, 1, None, x
    if lora is None:
        slot, xa, b, rank, num_slots = sorted_pairs, x, w_gate_up.unsqueeze(0).unsqueeze(0), 1, 0
    else:
        slot, xa, b, slot_rank = lora
        num_slots, rank, parts = b.shape[0], b.shape[-1], xa.shape[0]
        if a_dn is not None:
            ad = a_dn
            num_parts = triton.cdiv(inter, tiles.block_n)
            ha = torch.empty(num_parts, rows, rank, dtype=torch.float32, device=x.device)
    bias, s_bias, limit, alpha = extras_args(extras, x)
    scales, block_k = scale_args(extras, x, "gate_up", tiles.block_k, w8a8)
    act_fp8 = w8a8 and scales.on
    xq, xs = quantize_activations(x, scales.group) if act_fp8 else (x, scales.table)
    _gate_up_kernel[num_blocks_grid(blocks, inter, tiles.block_n)](
        xq, w_gate_up, h, sorted_pairs, block_expert, slot, xa, b, slot if slot_rank is None else slot_rank,
        ad, x if ha is None else ha, bias, scales.table, xs,
        num_tokens * top_k, top_k, inter, rank, num_slots, blocks, rows * 2 * rank, rows,
        xq.stride(0), xq.stride(1), *w_gate_up.stride(), *b.stride(),
        *(ad.stride() if ha is not None else (0, 0, 0, 0)), s_bias, *scales.strides, xs.stride(0),
        limit, alpha,
        HIDDEN=hidden, HAS_BIAS=bias is not x, CLAMPED=extras is not None and extras.swiglu is not None,
        HAS_LORA=lora is not None, HAS_SCALE=scales.on, GROUP=scales.group,
        ACT_FP8=act_fp8, PARTS=parts,
        DOWN_SHRINK=ha is not None, HAS_RANK=slot_rank is not None, EXPAND=expand_mode(x.dtype, plan),
        IL_EXPAND=rank <= 16, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=block_k,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), GROUP_M=tiles.group_m,
        PRECISION=dot_precision(x.dtype), num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return h, ha
