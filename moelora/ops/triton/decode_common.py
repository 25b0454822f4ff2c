"""Pieces shared by the decode-path kernels (one program per (token, choice) pair): the pair's expert and
slot, a GEMV step, and the LoRA expand from split-K partial sums."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fma_step(acc, w_ptrs, w_mask, v):
    """acc [N, K] += w [N, K] * v [K] in fp32: a K loop's products, reduced once after it."""
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    return acc + w.to(tl.float32) * v[None, :]


@triton.jit
def pair_expert(ids_ptr, p, top_k, s_id_t, s_id_k, num_experts):
    """(token, expert id, whether the expert runs here) of pair p."""
    t = p // top_k
    e = tl.load(ids_ptr + t * s_id_t + (p % top_k) * s_id_k)
    return t, e, (e >= 0) & (e < num_experts)


@triton.jit
def pair_slot(slot_ptr, t, num_slots, HAS_LORA: tl.constexpr):
    """(slot of token t, 0 where invalid; whether it is valid). Never valid without LoRA."""
    s = t * 0 - 1
    if HAS_LORA:
        s = tl.load(slot_ptr + t)
    on = (s >= 0) & (s < num_slots)
    return tl.where(on, s, 0).to(tl.int64), on


@triton.jit
def add_partial_expand(acc, u_ptr, u_stride, b_ptrs, n_ok, r, r_ok, SPLITS: tl.constexpr):
    """acc [N] += b [N, R] @ u, u the sum of SPLITS partial shrink vectors (stride u_stride apart); lanes
    r read where r_ok."""
    u = tl.zeros(r.shape, dtype=tl.float32)
    for i in range(0, SPLITS):
        u += tl.load(u_ptr + i * u_stride + r, mask=r_ok, other=0.0)
    b = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    return acc + tl.sum(b.to(tl.float32) * u[None, :], axis=1)
