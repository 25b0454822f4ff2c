"""Gate/up GEMV of the decode path: one program per (pair, output tile) streams its expert's rows, adds the
LoRA expand from the shrink's partial sums, then SiLU(gate) * up."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.triton.common import lanes_in_rank
from moelora.ops.triton.decode_common import add_partial_expand, fma_step, pair_expert, pair_slot
from moelora.ops.triton.tiles import DecodeTiles


@triton.jit
def _decode_gate_up_kernel(
    x_ptr, ids_ptr, w_ptr, h_ptr, slot_ptr, xa_ptr, b_ptr, rank_ptr,
    top_k, inter, num_experts, rank, num_slots, num_pairs,
    sx_t, sx_k, s_id_t, s_id_k, sw_e, sw_n, sw_k, sb_s, sb_e, sb_h, sb_n, sb_r,
    HIDDEN: tl.constexpr, HAS_LORA: tl.constexpr, HAS_RANK: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0)
    t, e, runs = pair_expert(ids_ptr, p, top_k, s_id_t, s_id_k, num_experts)
    if runs:
        e64 = e.to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < inter
        kk = tl.arange(0, BLOCK_K)
        x_row = x_ptr + t.to(tl.int64) * sx_t + kk * sx_k
        g_ptrs = w_ptr + e64 * sw_e + n[:, None] * sw_n + kk[None, :] * sw_k
        u_ptrs = g_ptrs + inter * sw_n
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, HIDDEN, BLOCK_K):
            k_ok = kk < HIDDEN - k0
            xk = tl.load(x_row, mask=k_ok, other=0.0).to(tl.float32)
            w_mask = n_ok[:, None] & k_ok[None, :]
            acc_g = fma_step(acc_g, g_ptrs, w_mask, xk)
            acc_u = fma_step(acc_u, u_ptrs, w_mask, xk)
            x_row += BLOCK_K * sx_k
            g_ptrs += BLOCK_K * sw_k
            u_ptrs += BLOCK_K * sw_k
        g = tl.sum(acc_g, axis=1)
        u = tl.sum(acc_u, axis=1)
        if HAS_LORA:
            s, on = pair_slot(slot_ptr, t, num_slots, HAS_LORA)
            r = tl.arange(0, BLOCK_R)
            r_ok = lanes_in_rank(r, rank, rank_ptr, s, HAS_RANK) & on
            bg_ptrs = b_ptr + s * sb_s + e64 * sb_e + n[:, None] * sb_n + r[None, :] * sb_r
            xa_row = xa_ptr + p.to(tl.int64) * (2 * rank)
            g = add_partial_expand(g, xa_row, num_pairs * 2 * rank, bg_ptrs, n_ok, r, r_ok, SPLITS)
            u = add_partial_expand(
                u, xa_row + rank, num_pairs * 2 * rank, bg_ptrs + sb_h, n_ok, r, r_ok, SPLITS
            )
        h = g / (1.0 + tl.exp(-g)) * u
        tl.store(h_ptr + p.to(tl.int64) * inter + n, h.to(h_ptr.dtype.element_ty), mask=n_ok)


def decode_gate_up(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    local_ids: torch.Tensor,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    tiles: DecodeTiles,
) -> torch.Tensor:
    """-> h [T * k, I_loc] in x's dtype: silu(gate) * up of each pair whose expert runs here (other rows
    unset). x [T, H]; w_gate_up [E_loc, 2 * I_loc, H]; local_ids [T, k]; lora = (token_slot [T],
    xa [splits, T * k, 2R] fp32 partial sums from `decode_shrink`, b_gu [S, E_loc, 2, I_loc, R],
    slot_rank [S] or None: B's columns at or above it are padding, not read)."""
    num_tokens, hidden = x.shape
    top_k = local_ids.shape[1]
    num_experts, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    num_pairs = num_tokens * top_k
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    slot_rank = None
    if lora is None:  # placeholders, never read (HAS_LORA is off)
        slot, xa, b = local_ids, h, w_gate_up.unsqueeze(0).unsqueeze(2)
        num_slots, rank, splits = 0, 1, 1
    else:
        slot, xa, b, slot_rank = lora
        num_slots, rank, splits = b.shape[0], b.shape[-1], xa.shape[0]
    _decode_gate_up_kernel[(num_pairs, triton.cdiv(inter, tiles.block_n))](
        x, local_ids, w_gate_up, h, slot, xa, b, slot if slot_rank is None else slot_rank,
        top_k, inter, num_experts, rank, num_slots, num_pairs,
        *x.stride(), *local_ids.stride(), *w_gate_up.stride(), *b.stride(),
        HIDDEN=hidden, HAS_LORA=lora is not None, HAS_RANK=slot_rank is not None, SPLITS=splits,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_R=max(16, triton.next_power_of_2(rank)),
        num_warps=tiles.warps,
    )  # fmt: skip
    return h
