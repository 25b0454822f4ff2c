"""Down GEMV of the decode path and the weighted sum: one program per (pair, output tile), the LoRA expand of
the shrink that `decode_gate_up` computed; each pair's unweighted output d, and the last of a token's
pairs to finish a tile adds the token's d rows up with their router weights (in choice order, as
`moe_sum`: the result does not depend on timing)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.expert_extras import ExpertExtras
from moelora.ops.triton.common import after_previous, dependent_launch, lanes_in_rank, prefetch_l2, scale_args
from moelora.ops.triton.counters import last_one, launch_counters
from moelora.ops.triton.decode_common import (
    PARTIAL_ROWS,
    ahead_mode,
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


@triton.jit
def _decode_down_kernel(
    h_ptr, ids_ptr, w_ptr, d_ptr, slot_ptr, hp_ptr, b_ptr, rank_ptr, rw_ptr, y_ptr, count_ptr, bias_ptr,
    sc_ptr, hidden, num_experts, rank, num_slots, num_pairs,
    s_id_t, s_id_k, sw_e, sw_n, sw_k, sb_s, sb_e, sb_n, sb_r, s_rw_t, s_rw_k, s_bias_e, ss_e, ss_n,
    INTER: tl.constexpr, HAS_BIAS: tl.constexpr, TOP_K: tl.constexpr, HAS_LORA: tl.constexpr,
    HAS_RANK: tl.constexpr, HAS_SCALE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, STEP_SUM: tl.constexpr,
    PDL: tl.constexpr, LINE: tl.constexpr, LINES: tl.constexpr, SHRINK_PARTS: tl.constexpr,
    AHEAD: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < hidden
    if PDL:
        # While the gate/up GEMV ends: this tile's rows of the pair's expert into L2. The ids came from a
        # kernel before the gate/up one (which waited for it), so they are most likely current; read
        # again after the wait for the work, as a stale id only costs a wasted hint here.
        _, e_early, runs_early = pair_expert(ids_ptr, p, TOP_K, s_id_t, s_id_k, num_experts)
        k = tl.arange(0, LINES) * LINE
        rows = tl.minimum(n, hidden - 1).to(tl.int64) * sw_n
        e_hint = tl.where(runs_early, e_early, 0).to(tl.int64)
        prefetch_l2(w_ptr + e_hint * sw_e + rows[:, None] + tl.minimum(k, INTER - 1)[None, :] * sw_k)
    after_previous(PDL)
    t, e, runs = pair_expert(ids_ptr, p, TOP_K, s_id_t, s_id_k, num_experts)
    if runs:
        e64 = e.to(tl.int64)
        if HAS_LORA:  # loaded before the GEMV, so that their latency overlaps it
            s, on = pair_slot(slot_ptr, t, num_slots, HAS_LORA)
            r = tl.arange(0, BLOCK_R)
            r_ok = lanes_in_rank(r, rank, rank_ptr, s, HAS_RANK) & on
            b_ptrs = b_ptr + s * sb_s + e64 * sb_e + n[:, None] * sb_n + r[None, :] * sb_r
            b = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            # the down shrink: the sum of the gate/up launch's partials, one a tile of h, in tile order
            hp_row = hp_ptr + p.to(tl.int64) * rank
            ha = sum_partials(hp_row, num_pairs * rank, r, r_ok, SHRINK_PARTS, PARTIAL_ROWS)
        kk = tl.arange(0, BLOCK_K)
        h_row = h_ptr + p.to(tl.int64) * INTER + kk
        w_ptrs = w_ptr + e64 * sw_e + n[:, None] * sw_n + kk[None, :] * sw_k
        s_ptrs = sc_ptr + e64 * ss_e + n * ss_n
        acc = gemv_acc(BLOCK_N, BLOCK_K, STEP_SUM)
        if AHEAD:  # the next step's loads before this step's products (`decode_common.ahead_mode`)
            w, sc = step_tiles(w_ptrs, sw_k, s_ptrs, n_ok, kk, 0, INTER, HAS_SCALE, GROUP, BLOCK_K)
            hk = tl.load(h_row, mask=kk < INTER, other=0.0)
            for k0 in range(BLOCK_K, INTER + BLOCK_K, BLOCK_K):  # the step past the end loads nothing
                w_next, sc_next = step_tiles(
                    w_ptrs, sw_k, s_ptrs, n_ok, kk, k0, INTER, HAS_SCALE, GROUP, BLOCK_K
                )
                h_next = tl.load(h_row + k0, mask=kk < INTER - k0, other=0.0)
                acc = step_products(acc, w, sc, hk.to(tl.float32), HAS_SCALE, GROUP, BLOCK_K, STEP_SUM)
                w, sc, hk = w_next, sc_next, h_next
        else:
            for k0 in range(0, INTER, BLOCK_K):
                k_ok = kk < INTER - k0
                hf = tl.load(h_row, mask=k_ok, other=0.0).to(tl.float32)
                w_mask = n_ok[:, None] & k_ok[None, :]
                acc = weight_step(
                    acc, w_ptrs, w_mask, hf, s_ptrs, n_ok, k0, INTER, HAS_SCALE, GROUP, BLOCK_K, STEP_SUM
                )
                h_row += BLOCK_K
                w_ptrs += BLOCK_K * sw_k
        d = gemv_sum(acc, STEP_SUM)
        if HAS_LORA:
            d += tl.sum(b.to(tl.float32) * ha[None, :], axis=1)
        if HAS_BIAS:
            d += tl.load(bias_ptr + e64 * s_bias_e + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(d_ptr + p.to(tl.int64) * hidden + n, d.to(d_ptr.dtype.element_ty), mask=n_ok)
    # Every pair counts in, whether its expert runs here or not; the token's last adds the rows up.
    n_tiles = tl.num_programs(1)
    if last_one(count_ptr + t * n_tiles + tl.program_id(1), TOP_K):
        t64 = t.to(tl.int64)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in range(0, TOP_K):
            ej = tl.load(ids_ptr + t64 * s_id_t + j * s_id_k)
            ok = (ej >= 0) & (ej < num_experts)
            wj = tl.where(ok, tl.load(rw_ptr + t64 * s_rw_t + j * s_rw_k).to(tl.float32), 0.0)
            row = d_ptr + (t64 * TOP_K + j) * hidden + n
            acc += tl.load(row, mask=n_ok & ok, other=0.0, cache_modifier=".cg").to(tl.float32) * wj
        tl.store(y_ptr + t64 * hidden + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


def decode_down(
    h: torch.Tensor,
    w_down: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    tiles: DecodeTiles,
    extras: ExpertExtras | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """-> y [T, H] in h's dtype: y[t] = sum_j weights[t, j] * d[t * k + j] (fp32, choices in order) over the
    choices whose expert runs here, d = w_down[e] @ h (+ `extras.b_down[e]`; FP8 w_down times
    `extras.scales.down`) of the pair rounded to h's dtype (as `moe_sum`).
    h [T * k, I_loc]; w_down [E_loc, H, I_loc]; local_ids [T, k]; weights [T, k]; lora = (token_slot [T],
    hp [gate/up tiles, T * k, R] fp32 from `decode_gate_up` (the down shrink's parts, added up here),
    b_dn [S, E_loc, H, R], slot_rank [S] or None: B's columns at or above it are padding, not read).
    Launches on one device run one after another (they share `counters.launch_counters`)."""
    num_pairs, inter = h.shape
    num_tokens, top_k = local_ids.shape
    num_experts, hidden = w_down.shape[0], w_down.shape[1]
    d = torch.empty(num_pairs, hidden, dtype=h.dtype, device=h.device)
    y = torch.empty(num_tokens, hidden, dtype=h.dtype, device=h.device)
    n_tiles = triton.cdiv(hidden, tiles.block_n)
    counts = launch_counters(h.device, num_tokens * n_tiles)
    slot_rank = None
    if lora is None:  # placeholders, never read (HAS_LORA is off)
        slot, hp, b = local_ids, h, w_down.unsqueeze(0)
        num_slots, rank, shrink_parts = 0, 1, 1
    else:
        slot, hp, b, slot_rank = lora
        num_slots, rank, shrink_parts = b.shape[0], b.shape[-1], hp.shape[0]
    b_down = extras.b_down if extras is not None else None
    scales, block_k = scale_args(extras, h, "down", min(tiles.block_k, triton.next_power_of_2(inter)))
    block_k = fp8_step(block_k, scales.group, tiles, inter) if scales.on else block_k
    step_sum = sum_mode(tiles, scales.on)
    pdl = dependent_launch(h.device, pdl)
    line = max(1, 128 // w_down.element_size())  # weights a 128-byte cache line holds
    _decode_down_kernel[(num_pairs, n_tiles)](
        h, local_ids, w_down, d, slot, hp, b, slot if slot_rank is None else slot_rank, weights, y, counts,
        h if b_down is None else b_down, scales.table, hidden, num_experts, rank, num_slots, num_pairs,
        *local_ids.stride(), *w_down.stride(), *b.stride(), *weights.stride(),
        0 if b_down is None else b_down.stride(0), *scales.strides,
        INTER=inter, HAS_BIAS=b_down is not None, TOP_K=top_k, HAS_LORA=lora is not None,
        HAS_RANK=slot_rank is not None, HAS_SCALE=scales.on, GROUP=scales.group,
        BLOCK_N=tiles.block_n, BLOCK_K=block_k,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), STEP_SUM=step_sum, PDL=pdl, LINE=line,
        LINES=triton.next_power_of_2(triton.cdiv(inter, line)), SHRINK_PARTS=shrink_parts,
        AHEAD=ahead_mode(tiles, scales.on, scales.group, block_k, step_sum, lora is not None),
        num_warps=tiles.warps, launch_pdl=pdl,
    )  # fmt: skip
    return y
