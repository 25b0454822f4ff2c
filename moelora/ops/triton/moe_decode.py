"""Routed experts for a handful of (token, choice) pairs, without the alignment: one program per pair and
output tile streams its expert's weight rows (a GEMV); the LoRA shrink runs once per pair, split along
its input into partial sums that the GEMVs' epilogues add up with the expand; then the weighted sum. Used
where pairs rarely share an expert (`tiles.use_decode_path`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.triton import tiles as tile_table
from moelora.ops.triton.moe_sum import moe_sum

LoraBuffers = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
_SHRINK_CHUNK = 256  # input columns per shrink program
_SHRINK_K = 64


@triton.jit
def _fma_step(acc, w_ptrs, w_mask, v):
    """acc [N, K] += w [N, K] * v [K] in fp32: a K loop's products, reduced once after it."""
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    return acc + w.to(tl.float32) * v[None, :]


@triton.jit
def _pair_expert(ids_ptr, p, top_k, s_id_t, s_id_k, num_experts):
    """(token, expert id, whether the expert runs here) of pair p."""
    t = p // top_k
    e = tl.load(ids_ptr + t * s_id_t + (p % top_k) * s_id_k)
    return t, e, (e >= 0) & (e < num_experts)


@triton.jit
def _pair_slot(slot_ptr, t, num_slots, HAS_LORA: tl.constexpr):
    """(slot of token t, 0 where invalid; whether it is valid). Never valid without LoRA."""
    s = t * 0 - 1
    if HAS_LORA:
        s = tl.load(slot_ptr + t)
    on = (s >= 0) & (s < num_slots)
    return tl.where(on, s, 0).to(tl.int64), on


@triton.jit
def _add_expand(acc, u_ptr, u_stride, b_ptrs, n_ok, r, rank, on, SPLITS: tl.constexpr):
    """acc [N] += b [N, R] @ u, u the sum of SPLITS partial shrink vectors (stride u_stride apart)."""
    r_ok = (r < rank) & on
    u = tl.zeros(r.shape, dtype=tl.float32)
    for i in range(0, SPLITS):
        u += tl.load(u_ptr + i * u_stride + r, mask=r_ok, other=0.0)
    b = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    return acc + tl.sum(b.to(tl.float32) * u[None, :], axis=1)


@triton.jit
def _decode_shrink_kernel(
    in_ptr, ids_ptr, slot_ptr, a_ptr, out_ptr,
    top_k, num_experts, rank, num_slots, num_pairs,
    s_in_row, s_in_k, s_id_t, s_id_k, sa_s, sa_e, sa_h, sa_r, sa_k,
    IN_DIM: tl.constexpr, HALVES: tl.constexpr, GATHER: tl.constexpr, K_CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # out[split, p, j] = part of a[s, e, j // rank, j % rank] @ in[row] over this split's columns.
    p = tl.program_id(0)
    split = tl.program_id(1)
    t, e, runs = _pair_expert(ids_ptr, p, top_k, s_id_t, s_id_k, num_experts)
    s, on = _pair_slot(slot_ptr, t, num_slots, True)
    e64 = tl.where(runs, e, 0).to(tl.int64)
    j = tl.arange(0, BLOCK_R)
    j_ok = (j < HALVES * rank) & on & runs
    row = t if GATHER else p
    kk = split * K_CHUNK + tl.arange(0, BLOCK_K)
    a_ptrs = (
        a_ptr + s * sa_s + e64 * sa_e + ((j // rank) * sa_h + (j % rank) * sa_r)[:, None] + kk[None, :] * sa_k
    )
    in_ptrs = in_ptr + row.to(tl.int64) * s_in_row + kk * s_in_k
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K_CHUNK, BLOCK_K):
        k_ok = kk + k0 < IN_DIM
        v = tl.load(in_ptrs + k0 * s_in_k, mask=k_ok & on & runs, other=0.0).to(tl.float32)
        acc = _fma_step(acc, a_ptrs + k0 * sa_k, j_ok[:, None] & k_ok[None, :], v)
    dst = out_ptr + (split * num_pairs + p).to(tl.int64) * (HALVES * rank) + j
    tl.store(dst, tl.sum(acc, axis=1), mask=j < HALVES * rank)


@triton.jit
def _decode_gate_up_kernel(
    x_ptr, ids_ptr, w_ptr, h_ptr, slot_ptr, xa_ptr, b_ptr,
    top_k, inter, num_experts, rank, num_slots, num_pairs,
    sx_t, sx_k, s_id_t, s_id_k, sw_e, sw_n, sw_k, sb_s, sb_e, sb_h, sb_n, sb_r,
    HIDDEN: tl.constexpr, HAS_LORA: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0)
    t, e, runs = _pair_expert(ids_ptr, p, top_k, s_id_t, s_id_k, num_experts)
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
            acc_g = _fma_step(acc_g, g_ptrs, w_mask, xk)
            acc_u = _fma_step(acc_u, u_ptrs, w_mask, xk)
            x_row += BLOCK_K * sx_k
            g_ptrs += BLOCK_K * sw_k
            u_ptrs += BLOCK_K * sw_k
        g = tl.sum(acc_g, axis=1)
        u = tl.sum(acc_u, axis=1)
        if HAS_LORA:
            s, on = _pair_slot(slot_ptr, t, num_slots, HAS_LORA)
            r = tl.arange(0, BLOCK_R)
            bg_ptrs = b_ptr + s * sb_s + e64 * sb_e + n[:, None] * sb_n + r[None, :] * sb_r
            xa_row = xa_ptr + p.to(tl.int64) * (2 * rank)
            g = _add_expand(g, xa_row, num_pairs * 2 * rank, bg_ptrs, n_ok, r, rank, on, SPLITS)
            u = _add_expand(u, xa_row + rank, num_pairs * 2 * rank, bg_ptrs + sb_h, n_ok, r, rank, on, SPLITS)
        h = g / (1.0 + tl.exp(-g)) * u
        tl.store(h_ptr + p.to(tl.int64) * inter + n, h.to(h_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _decode_down_kernel(
    h_ptr, ids_ptr, w_ptr, d_ptr, slot_ptr, ha_ptr, b_ptr,
    top_k, hidden, num_experts, rank, num_slots, num_pairs,
    s_id_t, s_id_k, sw_e, sw_n, sw_k, sb_s, sb_e, sb_n, sb_r,
    INTER: tl.constexpr, HAS_LORA: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0)
    t, e, runs = _pair_expert(ids_ptr, p, top_k, s_id_t, s_id_k, num_experts)
    if runs:
        e64 = e.to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        kk = tl.arange(0, BLOCK_K)
        h_row = h_ptr + p.to(tl.int64) * INTER + kk
        w_ptrs = w_ptr + e64 * sw_e + n[:, None] * sw_n + kk[None, :] * sw_k
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, INTER, BLOCK_K):
            k_ok = kk < INTER - k0
            hk = tl.load(h_row, mask=k_ok, other=0.0).to(tl.float32)
            acc = _fma_step(acc, w_ptrs, n_ok[:, None] & k_ok[None, :], hk)
            h_row += BLOCK_K
            w_ptrs += BLOCK_K * sw_k
        d = tl.sum(acc, axis=1)
        if HAS_LORA:
            s, on = _pair_slot(slot_ptr, t, num_slots, HAS_LORA)
            r = tl.arange(0, BLOCK_R)
            b_ptrs = b_ptr + s * sb_s + e64 * sb_e + n[:, None] * sb_n + r[None, :] * sb_r
            ha_row = ha_ptr + p.to(tl.int64) * rank
            d = _add_expand(d, ha_row, num_pairs * rank, b_ptrs, n_ok, r, rank, on, SPLITS)
        tl.store(d_ptr + p.to(tl.int64) * hidden + n, d.to(d_ptr.dtype.element_ty), mask=n_ok)


def _decode_shrink(
    inp: torch.Tensor, local_ids: torch.Tensor, slot: torch.Tensor, a: torch.Tensor, gather: bool
) -> torch.Tensor:
    """-> [splits, pairs, halves * R] fp32 partial sums of a[s, e, half] @ inp[row] (row: the pair's token
    if `gather`, else the pair itself); zeros for pairs without a valid slot or expert."""
    a5 = a if a.dim() == 5 else a.unsqueeze(2)
    num_slots, num_experts, halves, rank, in_dim = a5.shape
    num_pairs = local_ids.numel()
    block_k = min(_SHRINK_K, triton.next_power_of_2(in_dim))
    chunk = triton.cdiv(min(_SHRINK_CHUNK, in_dim), block_k) * block_k  # whole steps per program
    splits = triton.cdiv(in_dim, chunk)
    out = torch.empty(splits, num_pairs, halves * rank, dtype=torch.float32, device=inp.device)
    _decode_shrink_kernel[(num_pairs, splits)](
        inp, local_ids, slot, a5, out,
        local_ids.shape[1], num_experts, rank, num_slots, num_pairs,
        *inp.stride(), *local_ids.stride(), *a5.stride(),
        IN_DIM=in_dim, HALVES=halves, GATHER=gather, K_CHUNK=chunk,
        BLOCK_K=block_k, BLOCK_R=max(16, triton.next_power_of_2(halves * rank)),
    )  # fmt: skip
    return out


def decode_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    lora: LoraBuffers | None,
) -> torch.Tensor:
    """`fused_moe` (lora None) or `fused_moe_lora` (lora = (token_slot, a_gu, b_gu, a_dn, b_dn)) for few
    pairs: three launches (five with LoRA), no alignment, every size from the shapes (CUDA-graph safe)."""
    num_tokens, top_k = local_ids.shape
    num_experts, hidden, inter = w_down.shape
    num_pairs = num_tokens * top_k
    ids = local_ids
    tiles = tile_table.DECODE_TILES
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    d = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    if lora is None:  # placeholders, never read (HAS_LORA is off)
        slot, rank, num_slots = ids, 1, 0
        xa = ha = torch.empty(1, 1, 1, dtype=torch.float32, device=x.device)
        b_gu, b_dn = w_gate_up.unsqueeze(0).unsqueeze(2), w_down.unsqueeze(0)
    else:
        slot, a_gu, b_gu, a_dn, b_dn = lora
        num_slots, rank = a_gu.shape[0], a_gu.shape[3]
        xa = _decode_shrink(x, ids, slot, a_gu, gather=True)
    block_r = max(16, triton.next_power_of_2(rank))
    _decode_gate_up_kernel[(num_pairs, triton.cdiv(inter, tiles.block_n))](
        x, ids, w_gate_up, h, slot, xa, b_gu,
        top_k, inter, num_experts, rank, num_slots, num_pairs,
        *x.stride(), *ids.stride(), *w_gate_up.stride(), *b_gu.stride(),
        HIDDEN=hidden, HAS_LORA=lora is not None, SPLITS=xa.shape[0],
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_R=block_r, num_warps=tiles.warps,
    )  # fmt: skip
    if lora is not None:
        ha = _decode_shrink(h, ids, slot, a_dn, gather=False)
    _decode_down_kernel[(num_pairs, triton.cdiv(hidden, tiles.block_n))](
        h, ids, w_down, d, slot, ha, b_dn,
        top_k, hidden, num_experts, rank, num_slots, num_pairs,
        *ids.stride(), *w_down.stride(), *b_dn.stride(),
        INTER=inter, HAS_LORA=lora is not None, SPLITS=ha.shape[0],
        BLOCK_N=tiles.block_n, BLOCK_K=min(tiles.block_k, triton.next_power_of_2(inter)),
        BLOCK_R=block_r, num_warps=tiles.warps,
    )  # fmt: skip
    return moe_sum(d, local_ids, weights, num_experts)
