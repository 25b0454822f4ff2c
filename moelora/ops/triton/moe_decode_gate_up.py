"""Gate/up GEMV of the decode path, with the LoRA shrinks of both projections in the same launch.

One program per (pair, output tile) streams its expert's rows, then SiLU(gate) * up. With LoRA the launch
also runs the gate/up shrink: its first programs (by start order: `counters.ticket`) each take one
pair's A over one chunk of the input and write fp32 partial sums; the GEMV programs wait for them before
their epilogue adds the expand. Each GEMV program then multiplies its h tile by its columns of the down
projection's A; the down launch adds those partials up (in tile order, so the result does not depend on
timing) and expands them. A program loads its LoRA tiles before its GEMV, so their latency overlaps it.
Two launches in all, as without LoRA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.expert_extras import ExpertExtras
from moelora.ops.triton.common import (
    after_previous,
    dependent_launch,
    extras_args,
    glu,
    lanes_in_rank,
    scale_args,
)
from moelora.ops.triton.counters import last_one, launch_counters, signal, ticket, wait_for
from moelora.ops.triton.decode_common import (
    PARTIAL_ROWS,
    ahead_mode,
    fma_step,
    fp8_step,
    gemv_acc,
    gemv_sum,
    pair_expert,
    pair_slot,
    step_products,
    step_tiles,
    sum_mode,
    sum_partials,
    weight_step,
)
from moelora.ops.triton.tiles import DecodeTiles

_SHRINK_K = 64  # input columns per step of a shrink program

# The launch's counters (`counters.launch_counters`), in order: tickets, shrink parts done, programs done.


@triton.jit
def _shrink_part(
    x_ptr, ids_ptr, slot_ptr, a_ptr, xa_ptr, rank_ptr, item, top_k, num_experts, rank, num_slots, num_pairs,
    sx_t, sx_k, s_id_t, s_id_k, sa_s, sa_e, sa_h, sa_r, sa_k,
    HIDDEN: tl.constexpr, SPLITS: tl.constexpr, HAS_RANK: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R2: tl.constexpr,
):  # fmt: skip
    # xa[split, p, j] = part of a[s, e, j // rank, j % rank] @ x[t] over this split's input columns.
    p = item // SPLITS
    split = item % SPLITS
    t, e, runs = pair_expert(ids_ptr, p, top_k, s_id_t, s_id_k, num_experts)
    s, on = pair_slot(slot_ptr, t, num_slots, True)
    j = tl.arange(0, BLOCK_R2)
    j_ok = (j < 2 * rank) & lanes_in_rank(j % rank, rank, rank_ptr, s, HAS_RANK) & on & runs
    kk = split * CHUNK + tl.arange(0, BLOCK_K)
    e64 = tl.where(runs, e, 0).to(tl.int64)
    a_rows = a_ptr + s * sa_s + e64 * sa_e + (j // rank) * sa_h + (j % rank) * sa_r
    a_ptrs = a_rows[:, None] + kk[None, :] * sa_k
    x_row = x_ptr + t.to(tl.int64) * sx_t + kk * sx_k
    acc = tl.zeros([BLOCK_R2, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, CHUNK, BLOCK_K):
        k_ok = kk + k0 < HIDDEN
        v = tl.load(x_row + k0 * sx_k, mask=k_ok & on & runs, other=0.0).to(tl.float32)
        acc = fma_step(acc, a_ptrs + k0 * sa_k, j_ok[:, None] & k_ok[None, :], v)
    dst = xa_ptr + (split * num_pairs + p).to(tl.int64) * (2 * rank) + j
    tl.store(dst, tl.sum(acc, axis=1), mask=j < 2 * rank)


@triton.jit
def _gemv_gate_up(x_ptr, w_ptr, sc_ptr, t, e64, n, n_ok, inter, sx_t, sx_k, sw_e, sw_n, sw_k, ss_e, ss_n,
                  HIDDEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  HAS_SCALE: tl.constexpr, GROUP: tl.constexpr, STEP_SUM: tl.constexpr,
                  AHEAD: tl.constexpr):  # fmt: skip
    """(gate, up) [BLOCK_N] fp32 of expert e64's rows n for token t (FP8 rows times their scales with
    HAS_SCALE: `weight_step`; AHEAD: each step's loads a step ahead, `decode_common.ahead_mode`)."""
    kk = tl.arange(0, BLOCK_K)
    x_row = x_ptr + t.to(tl.int64) * sx_t + kk * sx_k
    g_ptrs = w_ptr + e64 * sw_e + n[:, None] * sw_n + kk[None, :] * sw_k
    u_ptrs = g_ptrs + inter * sw_n
    sg_ptrs = sc_ptr + e64 * ss_e + n * ss_n
    su_ptrs = sg_ptrs + inter * ss_n
    acc_g = gemv_acc(BLOCK_N, BLOCK_K, STEP_SUM)
    acc_u = gemv_acc(BLOCK_N, BLOCK_K, STEP_SUM)
    if AHEAD:  # two steps' loads in flight: the next step's before this step's products (`ahead_mode`)
        wg, sg = step_tiles(g_ptrs, sw_k, sg_ptrs, n_ok, kk, 0, HIDDEN, HAS_SCALE, GROUP, BLOCK_K)
        wu, su = step_tiles(u_ptrs, sw_k, su_ptrs, n_ok, kk, 0, HIDDEN, HAS_SCALE, GROUP, BLOCK_K)
        xk = tl.load(x_row, mask=kk < HIDDEN, other=0.0)
        for k0 in range(BLOCK_K, HIDDEN + BLOCK_K, BLOCK_K):  # the step past the end loads nothing
            wg_next, sg_next = step_tiles(
                g_ptrs, sw_k, sg_ptrs, n_ok, kk, k0, HIDDEN, HAS_SCALE, GROUP, BLOCK_K
            )
            wu_next, su_next = step_tiles(
                u_ptrs, sw_k, su_ptrs, n_ok, kk, k0, HIDDEN, HAS_SCALE, GROUP, BLOCK_K
            )
            x_next = tl.load(x_row + k0 * sx_k, mask=kk < HIDDEN - k0, other=0.0)
            xf = xk.to(tl.float32)
            acc_g = step_products(acc_g, wg, sg, xf, HAS_SCALE, GROUP, BLOCK_K, STEP_SUM)
            acc_u = step_products(acc_u, wu, su, xf, HAS_SCALE, GROUP, BLOCK_K, STEP_SUM)
            wg, sg, wu, su, xk = wg_next, sg_next, wu_next, su_next, x_next
    else:
        for k0 in range(0, HIDDEN, BLOCK_K):
            k_ok = kk < HIDDEN - k0
            xf = tl.load(x_row, mask=k_ok, other=0.0).to(tl.float32)
            w_mask = n_ok[:, None] & k_ok[None, :]
            acc_g = weight_step(
                acc_g, g_ptrs, w_mask, xf, sg_ptrs, n_ok, k0, HIDDEN, HAS_SCALE, GROUP, BLOCK_K, STEP_SUM
            )
            acc_u = weight_step(
                acc_u, u_ptrs, w_mask, xf, su_ptrs, n_ok, k0, HIDDEN, HAS_SCALE, GROUP, BLOCK_K, STEP_SUM
            )
            x_row += BLOCK_K * sx_k
            g_ptrs += BLOCK_K * sw_k
            u_ptrs += BLOCK_K * sw_k
    return gemv_sum(acc_g, STEP_SUM), gemv_sum(acc_u, STEP_SUM)


@triton.jit
def _lora_tiles(
    b_ptr, a_dn_ptr, s, e64, n, n_ok, r, r_ok, sb_s, sb_e, sb_h, sb_n, sb_r, sd_s, sd_e, sd_r, sd_k
):
    """The LoRA weights a GEMV program of pair (slot s, expert e64) and rows n uses: b_gu's gate and up
    tiles [N, R] and a_dn's columns n [R, N], loaded before the GEMV so that their latency overlaps it."""
    b_ptrs = b_ptr + s * sb_s + e64 * sb_e + n[:, None] * sb_n + r[None, :] * sb_r
    b_mask = n_ok[:, None] & r_ok[None, :]
    bg = tl.load(b_ptrs, mask=b_mask, other=0.0)
    bu = tl.load(b_ptrs + sb_h, mask=b_mask, other=0.0)
    a_dn = tl.load(a_dn_ptr + s * sd_s + e64 * sd_e + r[:, None] * sd_r + n[None, :] * sd_k,
                   mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # fmt: skip
    return bg, bu, a_dn


@triton.jit
def _decode_gate_up_kernel(
    x_ptr, ids_ptr, w_ptr, h_ptr, slot_ptr, a_ptr, xa_ptr, b_ptr, a_dn_ptr, hp_ptr, rank_ptr,
    ticket_ptr, shrunk_ptr, exited_ptr, bias_ptr, sc_ptr,
    top_k, inter, num_experts, rank, num_slots, num_pairs,
    sx_t, sx_k, s_id_t, s_id_k, sw_e, sw_n, sw_k, sa_s, sa_e, sa_h, sa_r, sa_k,
    sb_s, sb_e, sb_h, sb_n, sb_r, sd_s, sd_e, sd_r, sd_k, s_bias_e, ss_e, ss_n, limit, alpha,
    HIDDEN: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr, HAS_LORA: tl.constexpr,
    HAS_RANK: tl.constexpr, SPLITS: tl.constexpr, HAS_SCALE: tl.constexpr, GROUP: tl.constexpr,
    CHUNK: tl.constexpr, SHRINK_K: tl.constexpr, N_TILES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, STEP_SUM: tl.constexpr,
    PDL: tl.constexpr, AHEAD: tl.constexpr,
):  # fmt: skip
    after_previous(PDL)
    # Programs, in start order: num_pairs * SPLITS shrink parts (with LoRA), then the GEMV tiles.
    num_shrink = 0
    item = tl.program_id(0)
    if HAS_LORA:
        num_shrink = num_pairs * SPLITS
        item = ticket(ticket_ptr)
    if item < num_shrink:
        _shrink_part(
            x_ptr, ids_ptr, slot_ptr, a_ptr, xa_ptr, rank_ptr, item, top_k, num_experts, rank, num_slots,
            num_pairs, sx_t, sx_k, s_id_t, s_id_k, sa_s, sa_e, sa_h, sa_r, sa_k,
            HIDDEN, SPLITS, HAS_RANK, CHUNK, SHRINK_K, 2 * BLOCK_R,
        )  # fmt: skip
        signal(shrunk_ptr)
    else:
        p = (item - num_shrink) // N_TILES
        tile = (item - num_shrink) % N_TILES
        t, e, runs = pair_expert(ids_ptr, p, top_k, s_id_t, s_id_k, num_experts)
        e64 = tl.where(runs, e, 0).to(tl.int64)
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < inter
        g = tl.zeros([BLOCK_N], dtype=tl.float32)
        u = tl.zeros([BLOCK_N], dtype=tl.float32)
        s, on = pair_slot(slot_ptr, t, num_slots, HAS_LORA)
        r = tl.arange(0, BLOCK_R)
        r_ok = lanes_in_rank(r, rank, rank_ptr, s, HAS_RANK) & on & runs
        if HAS_LORA and not AHEAD:  # loaded before the GEMV, their latency behind it
            bg, bu, a_dn = _lora_tiles(b_ptr, a_dn_ptr, s, e64, n, n_ok, r, r_ok, sb_s, sb_e, sb_h, sb_n,
                                       sb_r, sd_s, sd_e, sd_r, sd_k)  # fmt: skip
        if runs:
            g, u = _gemv_gate_up(x_ptr, w_ptr, sc_ptr, t, e64, n, n_ok, inter, sx_t, sx_k, sw_e, sw_n, sw_k,
                                 ss_e, ss_n, HIDDEN, BLOCK_N, BLOCK_K, HAS_SCALE, GROUP,
                                 STEP_SUM, AHEAD)  # fmt: skip
        if HAS_LORA:
            if AHEAD:  # a step ahead holds two steps' tiles: the LoRA tiles load after it, beside the wait
                bg, bu, a_dn = _lora_tiles(b_ptr, a_dn_ptr, s, e64, n, n_ok, r, r_ok, sb_s, sb_e, sb_h, sb_n,
                                           sb_r, sd_s, sd_e, sd_r, sd_k)  # fmt: skip
            xa_row = xa_ptr + p.to(tl.int64) * (2 * rank)
            if on & runs:
                wait_for(shrunk_ptr, num_shrink)
                xg = sum_partials(xa_row, num_pairs * 2 * rank, r, r_ok, SPLITS, PARTIAL_ROWS)
                xu = sum_partials(xa_row + rank, num_pairs * 2 * rank, r, r_ok, SPLITS, PARTIAL_ROWS)
                g += tl.sum(bg.to(tl.float32) * xg[None, :], axis=1)
                u += tl.sum(bu.to(tl.float32) * xu[None, :], axis=1)
        h = glu(g, u, bias_ptr + e64 * s_bias_e, n, n_ok, inter, limit, alpha, HAS_BIAS, CLAMPED)
        h = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + p.to(tl.int64) * inter + n, h, mask=n_ok & runs)
        if HAS_LORA:  # this tile's part of the down shrink, a_dn[s, e][:, n] @ h; the down launch adds them
            part = tl.sum(a_dn.to(tl.float32) * h.to(tl.float32)[None, :], axis=1)
            tl.store(hp_ptr + (tile * num_pairs + p).to(tl.int64) * rank + r, part, mask=r < rank)
    if HAS_LORA:
        programs = num_shrink + num_pairs * N_TILES
        if last_one(exited_ptr, programs):
            tl.atomic_xchg(ticket_ptr, 0)
            tl.atomic_xchg(shrunk_ptr, 0)


def decode_gate_up(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    local_ids: torch.Tensor,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    tiles: DecodeTiles,
    extras: ExpertExtras | None = None,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (h [T * k, I_loc] in x's dtype: silu(gate) * up of each pair whose expert runs here (with
    `extras` its gate/up biases and activation), other rows unset; hp [I_loc tiles, T * k, R] fp32:
    a_dn[s, e][:, tile] @ h[tile] of each pair and tile of `tiles.block_n` columns (0 without a valid
    slot; the down shrink is their sum over tiles, `decode_down` adds them), or None without LoRA).
    x [T, H]; w_gate_up [E_loc, 2 * I_loc, H]; local_ids [T, k]; lora = (token_slot [T],
    a_gu [S, E_loc, 2, R, H], b_gu [S, E_loc, 2, I_loc, R], a_dn [S, E_loc, R, I_loc], slot_rank [S] or
    None: A's and B's lanes at or above it are padding, not read). Launches on one device run one after
    another (they share `counters.launch_counters`), as on one stream."""
    num_tokens, hidden = x.shape
    top_k = local_ids.shape[1]
    num_experts, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    num_pairs = num_tokens * top_k
    n_tiles = triton.cdiv(inter, tiles.block_n)
    shrink_k = min(_SHRINK_K, triton.next_power_of_2(hidden))
    chunk = splits = 1
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    if lora is None:  # placeholders, never read (HAS_LORA is off)
        slot, a, a_dn, rank_of = local_ids, w_gate_up[None, :, None], w_gate_up[None], None
        b = a
        xa = hp = h
        sync = h.view(-1)
        num_slots, rank = 0, 1
    else:
        slot, a, b, a_dn, rank_of = lora
        num_slots, rank = a.shape[0], a.shape[3]
        chunk = triton.cdiv(min(tiles.shrink_chunk, hidden), shrink_k) * shrink_k  # whole steps per program
        splits = triton.cdiv(hidden, chunk)
        xa = torch.empty(splits, num_pairs, 2 * rank, dtype=torch.float32, device=x.device)
        hp = torch.empty(n_tiles, num_pairs, rank, dtype=torch.float32, device=x.device)
        sync = launch_counters(x.device, 3)
    programs = num_pairs * (n_tiles + (splits if lora is not None else 0))
    bias, s_bias, limit, alpha = extras_args(extras, x)
    scales, block_k = scale_args(extras, x, "gate_up", tiles.block_k)
    block_k = fp8_step(block_k, scales.group, tiles, hidden) if scales.on else block_k
    step_sum = sum_mode(tiles, scales.on)
    ahead = ahead_mode(tiles, scales.on, scales.group, block_k, step_sum, lora is not None)
    cap = (tiles.lora_ahead_regs if ahead else tiles.lora_regs) if lora is not None else 0
    regs = {"maxnreg": cap} if cap else {}
    pdl = dependent_launch(x.device, pdl)
    _decode_gate_up_kernel[(programs,)](
        x, local_ids, w_gate_up, h, slot, a, xa, b, a_dn, hp, slot if rank_of is None else rank_of,
        sync, sync[1:], sync[2:], bias, scales.table,
        top_k, inter, num_experts, rank, num_slots, num_pairs,
        *x.stride(), *local_ids.stride(), *w_gate_up.stride(), *a.stride(), *b.stride(), *a_dn.stride(),
        s_bias, *scales.strides, limit, alpha,
        HIDDEN=hidden, HAS_BIAS=bias is not x, CLAMPED=extras is not None and extras.swiglu is not None,
        HAS_LORA=lora is not None, HAS_RANK=rank_of is not None, SPLITS=splits, HAS_SCALE=scales.on,
        GROUP=scales.group, CHUNK=chunk, SHRINK_K=shrink_k, N_TILES=n_tiles, BLOCK_N=tiles.block_n,
        BLOCK_K=block_k,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), STEP_SUM=step_sum, PDL=pdl,
        AHEAD=ahead, num_warps=tiles.warps, launch_pdl=pdl, **regs,
    )  # fmt: skip
    return h, (hp if lora is not None else None)
