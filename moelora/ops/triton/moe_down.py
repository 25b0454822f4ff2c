"""Grouped down GEMM over aligned rows, LoRA expand fused; writes each pair's unweighted output. Large
batches read h and the weights through TMA, and without LoRA one program per SM runs the tiles in turn."""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moelora.ops.expert_extras import ExpertExtras
from moelora.ops.triton.common import (
    add_expand,
    grouped_pid,
    lanes_in_rank,
    num_sms,
    scale_args,
    sum_parts,
    tma_ok,
    valid_slot,
)
from moelora.ops.triton.fp8_act import quantize_activations
from moelora.ops.triton.tiles import TUNED, KernelPlan, Tiles, dot_precision, expand_mode


@triton.jit
def _down_tile(
    pid_m, pid_n, e, h_ptr, h_desc, w_ptr, w_desc, d_ptr, sorted_ptr, slot_ptr, ha_ptr, b_ptr, rank_ptr,
    sc_ptr, hs_ptr, num_pairs, top_k, hidden, rank, num_slots, part_stride, sw_e, sw_n, sw_k, sb_s, sb_e,
    sb_n, sb_r, ss_e, ss_n, s_hs,
    INTER: tl.constexpr, HAS_LORA: tl.constexpr, PARTS: tl.constexpr, HAS_RANK: tl.constexpr,
    EXPAND: tl.constexpr, TMA: tl.constexpr, HAS_SCALE: tl.constexpr, GROUP: tl.constexpr,
    ACT_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One output tile: rows pid_m * BLOCK_M.. (expert e) by columns pid_n * BLOCK_N..; with ACT_FP8 the
    FP8 weights multiply h in FP8 (`quantize_activations`: hs_ptr its scales, one a row a group; BLOCK_K
    == GROUP)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    row_ok = pair < num_pairs
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < hidden
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    s_ptrs = sc_ptr + e * ss_e + n * ss_n  # FP8 rows' scales (HAS_SCALE; BLOCK_K <= GROUP: one a step)
    if TMA:
        # Boxes past I read zeros; weight rows past the expert's H feed only columns not stored. Padding
        # rows of h are unset (anything, NaN included) and feed only their own rows, not stored either.
        w_row = (e * hidden + pid_n * BLOCK_N).to(tl.int32)
        for k0 in range(0, INTER, BLOCK_K):
            hk = h_desc.load([pid_m * BLOCK_M, k0])
            wk = w_desc.load([w_row, k0])
            if HAS_SCALE:
                scale = tl.load(s_ptrs + k0 // GROUP, mask=n_ok, other=0.0)
                if ACT_FP8:  # h in FP8 too, a scale a row a step (padding rows: scale 0, not stored)
                    h_scale = tl.load(hs_ptr + rows.to(tl.int64) * s_hs + k0 // GROUP, mask=row_ok, other=0.0)
                    acc += tl.dot(hk, wk.T) * (h_scale[:, None] * scale[None, :])
                else:
                    wk = (wk.to(tl.float32) * scale[:, None]).to(hk.dtype)
                    acc = tl.dot(hk, wk.T, acc, input_precision=PRECISION)
            else:
                acc = tl.dot(hk, wk.T, acc, input_precision=PRECISION)
    else:
        kk = tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * INTER + kk[None, :]
        w_ptrs = w_ptr + e * sw_e + n[None, :] * sw_n + kk[:, None] * sw_k
        for k0 in range(0, INTER, BLOCK_K):
            k_ok = kk < INTER - k0
            hk = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wk = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if HAS_SCALE:
                scale = tl.load(s_ptrs + k0 // GROUP, mask=n_ok, other=0.0)
                if ACT_FP8:
                    h_scale = tl.load(hs_ptr + rows.to(tl.int64) * s_hs + k0 // GROUP, mask=row_ok, other=0.0)
                    acc += tl.dot(hk, wk) * (h_scale[:, None] * scale[None, :])
                else:
                    wk = (wk.to(tl.float32) * scale[None, :]).to(hk.dtype)
                    acc = tl.dot(hk, wk, acc, input_precision=PRECISION)
            else:
                acc = tl.dot(hk, wk, acc, input_precision=PRECISION)
            h_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * sw_k
    if HAS_LORA:
        tok = tl.where(row_ok, pair // top_k, 0)
        slot = tl.load(slot_ptr + tok, mask=row_ok, other=-1)
        slot = valid_slot(slot, num_slots)
        r = tl.arange(0, BLOCK_R)
        ha_rows = ha_ptr + rows[:, None].to(tl.int64) * rank + r[None, :]
        ha_mask = (row_ok & (slot < num_slots))[:, None] & (r < rank)[None, :]
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


@triton.jit
def _down_kernel(
    h_ptr, h_desc, w_ptr, w_desc, d_ptr, sorted_ptr, block_expert_ptr, slot_ptr, ha_ptr, b_ptr, rank_ptr,
    sc_ptr, hs_ptr, num_pairs, top_k, hidden, rank, num_slots, num_blocks, part_stride,
    sw_e, sw_n, sw_k, sb_s, sb_e, sb_n, sb_r, ss_e, ss_n, s_hs,
    INTER: tl.constexpr, HAS_LORA: tl.constexpr, PARTS: tl.constexpr, HAS_RANK: tl.constexpr,
    EXPAND: tl.constexpr, TMA: tl.constexpr, HAS_SCALE: tl.constexpr, GROUP: tl.constexpr,
    ACT_FP8: tl.constexpr, PERSISTENT: tl.constexpr, PIPELINED: tl.constexpr,
    BLOCKS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    num_n = tl.cdiv(hidden, BLOCK_N)
    if PERSISTENT:
        # The alignment's used row blocks come first (-1 after them): each program takes every
        # num_programs-th tile of theirs, so one tile's epilogue overlaps the next one's loads.
        b = tl.arange(0, BLOCKS_PAD)
        experts = tl.load(block_expert_ptr + b, mask=b < num_blocks, other=-1)
        used = tl.sum((experts >= 0).to(tl.int32))
        # The interpreter cannot run `range` over loaded bounds; on GPU the `for` is software-pipelined.
        if PIPELINED:
            for tile in tl.range(tl.program_id(0), used * num_n, tl.num_programs(0), flatten=True):
                pid_m, pid_n = grouped_pid(tile, used, num_n, GROUP_M)
                e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
                _down_tile(
                    pid_m, pid_n, e, h_ptr, h_desc, w_ptr, w_desc, d_ptr, sorted_ptr, slot_ptr, ha_ptr, b_ptr,
                    rank_ptr, sc_ptr, hs_ptr, num_pairs, top_k, hidden, rank, num_slots, part_stride,
                    sw_e, sw_n, sw_k, sb_s, sb_e, sb_n, sb_r, ss_e, ss_n, s_hs,
                    INTER, HAS_LORA, PARTS, HAS_RANK, EXPAND, TMA, HAS_SCALE, GROUP, ACT_FP8,
                    BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION,
                )  # fmt: skip
        else:
            tile = tl.program_id(0)
            while tile < used * num_n:
                pid_m, pid_n = grouped_pid(tile, used, num_n, GROUP_M)
                e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
                _down_tile(
                    pid_m, pid_n, e, h_ptr, h_desc, w_ptr, w_desc, d_ptr, sorted_ptr, slot_ptr, ha_ptr, b_ptr,
                    rank_ptr, sc_ptr, hs_ptr, num_pairs, top_k, hidden, rank, num_slots, part_stride,
                    sw_e, sw_n, sw_k, sb_s, sb_e, sb_n, sb_r, ss_e, ss_n, s_hs,
                    INTER, HAS_LORA, PARTS, HAS_RANK, EXPAND, TMA, HAS_SCALE, GROUP, ACT_FP8,
                    BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION,
                )  # fmt: skip
                tile += tl.num_programs(0)
    else:
        pid_m, pid_n = grouped_pid(tl.program_id(0), num_blocks, num_n, GROUP_M)
        e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if e >= 0:
            _down_tile(
                pid_m, pid_n, e, h_ptr, h_desc, w_ptr, w_desc, d_ptr, sorted_ptr, slot_ptr, ha_ptr, b_ptr,
                rank_ptr, sc_ptr, hs_ptr, num_pairs, top_k, hidden, rank, num_slots, part_stride,
                sw_e, sw_n, sw_k, sb_s, sb_e, sb_n, sb_r, ss_e, ss_n, s_hs,
                INTER, HAS_LORA, PARTS, HAS_RANK, EXPAND, TMA, HAS_SCALE, GROUP, ACT_FP8,
                BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION,
            )  # fmt: skip


def moe_down(
    h: torch.Tensor,
    w_down: torch.Tensor,
    sorted_pairs: torch.Tensor,
    block_expert: torch.Tensor,
    num_tokens: int,
    top_k: int,
    tiles: Tiles,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    plan: KernelPlan = TUNED,
    extras: ExpertExtras | None = None,
    w8a8: bool = False,
) -> torch.Tensor:
    """-> d [T * k, H] in h's dtype: w_down[e] @ h of each pair that runs (rows of other pairs unset; FP8
    w_down times `extras.scales.down`, with `w8a8` by h's rows in FP8 per scale group).

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
    block_r = max(16, triton.next_power_of_2(rank))
    t = tiles.for_down(0 if lora is None else block_r)
    scales, block_k = scale_args(extras, h, "down", t.block_k, w8a8)
    act_fp8 = w8a8 and scales.on
    # h in FP8 for the product (the LoRA shrink, apart, reads it in its own dtype)
    hq, hs = quantize_activations(h, scales.group) if act_fp8 else (h, scales.table)
    if block_k > t.block_k:  # W8A8's K step of a whole group: 4 stages of the wider tiles overflow
        t = dataclasses.replace(t, stages=min(t.stages, 3))
    t = dataclasses.replace(t, block_k=block_k)
    num_n = triton.cdiv(hidden, t.block_n)
    use_tma = t.tma_down and w_down.is_contiguous() and tma_ok(hq, w_down.view(-1, inter))
    # Persistent only without LoRA: the expand's loop over a block's slots inside the flattened loop of
    # tiles stops the pipelining (qwen3 M = 8192, 4 adapters of rank 16: 527 against 464 us one program
    # per tile; 16 of rank 64: 2602 against 757).
    persistent = t.tma_down and lora is None
    h_desc, w_desc = hq, w_down
    if use_tma:
        h_desc = TensorDescriptor.from_tensor(hq, [t.block_m, t.block_k])
        w_desc = TensorDescriptor.from_tensor(w_down.view(-1, inter), [t.block_n, t.block_k])
    programs = blocks * num_n
    if persistent:
        programs = min(programs, plan.persistent_programs or num_sms(h.device))
    _down_kernel[(programs,)](
        hq, h_desc, w_down, w_desc, d, sorted_pairs, block_expert, slot, ha, b,
        slot if slot_rank is None else slot_rank, scales.table, hs,
        num_pairs, top_k, hidden, rank, num_slots, blocks, sorted_pairs.numel() * rank,
        *w_down.stride(), *b.stride(), *scales.strides, hs.stride(0),
        INTER=inter, HAS_LORA=lora is not None, PARTS=parts, HAS_RANK=slot_rank is not None,
        EXPAND=expand_mode(h.dtype, plan), TMA=use_tma, HAS_SCALE=scales.on, GROUP=scales.group,
        ACT_FP8=act_fp8, PERSISTENT=persistent, PIPELINED=h.is_cuda,
        BLOCKS_PAD=triton.next_power_of_2(blocks) if persistent else 1,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        BLOCK_R=block_r, GROUP_M=t.group_m,
        PRECISION=dot_precision(h.dtype), num_warps=t.warps, num_stages=t.stages,
    )  # fmt: skip
    return d
