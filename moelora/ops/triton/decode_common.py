"""Pieces shared by the decode-path kernels (one program per (token, choice) pair and output tile): the
pair's expert and slot, a GEMV step, sums of split partials, the LoRA expand of a GEMV tile."""

from __future__ import annotations

import triton
import triton.language as tl

from moelora.ops.triton.common import valid_slot


@triton.jit
def fma_step(acc, w_ptrs, w_mask, v):
    """acc [N, K] += w [N, K] * v [K] in fp32: a K loop's products, reduced once after it."""
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    return acc + w.to(tl.float32) * v[None, :]


@triton.jit
def weight_step(acc, w_ptrs, w_mask, v, s_ptrs, s_mask, k0, HAS_SCALE: tl.constexpr, GROUP: tl.constexpr):
    """`fma_step` over the K step from column k0; with HAS_SCALE the weights are FP8 times their rows'
    scales (groups of GROUP columns at s_ptrs [N]; the step lies in one group: BLOCK_K <= GROUP)."""
    if HAS_SCALE:
        w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
        scale = tl.load(s_ptrs + k0 // GROUP, mask=s_mask, other=0.0)
        return acc + w * scale[:, None] * v[None, :]
    return fma_step(acc, w_ptrs, w_mask, v)


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
    s = valid_slot(s, num_slots)
    on = s < num_slots
    return tl.where(on, s, 0).to(tl.int64), on


@triton.jit
def sum_partials(ptr, stride, lanes, lanes_ok, COUNT: tl.constexpr, ROWS: tl.constexpr):
    """sum over i < COUNT of ptr[i * stride + lanes] (fp32; lanes read where lanes_ok), ROWS partials a
    load. Read past L1 (.cg): other programs of the same launch wrote them."""
    acc = tl.zeros(lanes.shape, dtype=tl.float32)
    i = tl.arange(0, ROWS)
    for i0 in range(0, COUNT, ROWS):
        mask = (i0 + i < COUNT)[:, None] & lanes_ok[None, :]
        ptrs = ptr + (i0 + i)[:, None] * stride + lanes[None, :]
        acc += tl.sum(tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
    return acc


@triton.jit
def expand_fma(acc, u, b_ptrs, n_ok, r_ok):
    """acc [N] += b [N, R] @ u [R] in fp32; b's lanes read where r_ok."""
    b = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    return acc + tl.sum(b.to(tl.float32) * u[None, :], axis=1)
