"""Pieces shared by the decode-path kernels (one program per (token, choice) pair and output tile): the
pair's expert and slot, a GEMV step, sums of partials written by other programs."""

from __future__ import annotations

import triton
import triton.language as tl

from moelora.ops.plan import DecodeTiles
from moelora.ops.triton.common import valid_slot

PARTIAL_ROWS = tl.constexpr(16)  # partial sums a load where `sum_partials` adds them up


def fp8_step(block_k: int, group: int, tiles: DecodeTiles, in_dim: int) -> int:
    """The K step of a decode GEMV over FP8 weights of scale group `group`: `block_k` (at most one group),
    or the tiles' `fp8_block_k` where that is a multiple of the group (steps over whole groups), at most
    the input rounded up to a power of two."""
    step = tiles.fp8_block_k
    if not step or step % group or step & (step - 1):
        return block_k
    return max(block_k, min(step, triton.next_power_of_2(in_dim)))


def sum_mode(tiles: DecodeTiles, fp8: bool) -> int:
    """A decode GEMV's STEP_SUM: 0 products kept as a tile and summed after the K loop, 1 summed every step,
    2 (FP8 steps over several scale groups) summed a group at a time, then scaled (`weight_step`)."""
    if not fp8:
        return int(tiles.step_sum)
    return 0 if not tiles.fp8_step_sum else 2 if tiles.fp8_group_sums else 1


@triton.jit
def fma_step(acc, w_ptrs, w_mask, v, STEP_SUM: tl.constexpr = False):
    """acc [N, K] += w [N, K] * v [K] in fp32: a K loop's products, reduced once after it; with STEP_SUM
    acc [N] += the step's products summed over K (one fp32 a row held across the loop instead of a tile:
    fewer registers a thread, so more programs an SM)."""
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    return _add(acc, w.to(tl.float32) * v[None, :], STEP_SUM)


@triton.jit
def _add(acc, products, STEP_SUM: tl.constexpr):
    """acc + products [N, K], or with STEP_SUM acc [N] + their sums over K."""
    return acc + tl.sum(products, axis=1) if STEP_SUM else acc + products


@triton.jit
def gemv_acc(BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STEP_SUM: tl.constexpr):
    """A GEMV's zero accumulator: [BLOCK_N, BLOCK_K] products reduced after the loop, or with STEP_SUM
    [BLOCK_N] sums of each step (`fma_step`)."""
    if STEP_SUM:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    return acc


@triton.jit
def gemv_sum(acc, STEP_SUM: tl.constexpr):
    """The row sums of a GEMV's accumulator (`gemv_acc`)."""
    return acc if STEP_SUM else tl.sum(acc, axis=1)


@triton.jit
def weight_step(acc, w_ptrs, w_mask, v, s_ptrs, s_mask, k0, IN_DIM: tl.constexpr, HAS_SCALE: tl.constexpr,
                GROUP: tl.constexpr, BLOCK_K: tl.constexpr, STEP_SUM: tl.constexpr):  # fmt: skip
    """`fma_step` over the K step of BLOCK_K columns from column k0 (of IN_DIM); with HAS_SCALE the weights
    are FP8 times their rows' scales (groups of GROUP columns at s_ptrs [N]). The step lies in one group
    (BLOCK_K <= GROUP) or spans whole groups (a multiple of GROUP): then each column takes the scale of
    its group, one load of a row's scale per group and a select, not a gather per column; with STEP_SUM 2
    (`DecodeTiles.fp8_group_sums`) each group's products are summed first and the sums scaled, no select."""
    if HAS_SCALE and BLOCK_K > GROUP and STEP_SUM != 2:
        w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
        group = tl.arange(0, BLOCK_K)[None, :] // GROUP
        scale = tl.zeros_like(w)
        for j in tl.static_range(BLOCK_K // GROUP):  # groups past IN_DIM: not read (their columns are 0)
            j_ok = k0 + j * GROUP < IN_DIM
            s_j = tl.load(s_ptrs + k0 // GROUP + j, mask=s_mask & j_ok, other=0.0)
            scale = tl.where(group == j, s_j[:, None], scale)
        out = _add(acc, w * scale * v[None, :], STEP_SUM)
    else:
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        scale = _step_scales(s_ptrs, s_mask, k0, w.shape[0], IN_DIM, HAS_SCALE, GROUP, BLOCK_K)
        out = step_products(acc, w, scale, v, HAS_SCALE, GROUP, BLOCK_K, STEP_SUM)
    return out


def ahead_mode(tiles: DecodeTiles, scaled: bool, group: int, block_k: int, step_sum: int, lora: bool) -> bool:
    """Whether a decode GEMV launch loads each K step's tiles while the step before is multiplied
    (`step_tiles`, `step_products`): where the tiles ask for it (`ahead`, FP8: `fp8_ahead`; with LoRA
    also `lora_ahead`) and the step's scales are one load (one group a step, or each group summed apart)."""
    on = tiles.fp8_ahead if scaled else tiles.ahead
    if lora:
        on = on and tiles.lora_ahead
    return on and (not scaled or block_k <= group or step_sum == 2)


@triton.jit
def step_tiles(w_ptrs, sw_k, s_ptrs, n_ok, kk, k0, IN_DIM: tl.constexpr, HAS_SCALE: tl.constexpr,
               GROUP: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The loads of the K step from column k0 (w_ptrs and s_ptrs at the first step): the weights [N, BLOCK_K]
    as stored (a step at or past IN_DIM loads nothing) and with HAS_SCALE their rows' scales: [N] (a step
    in one group) or [N, BLOCK_K // GROUP] (a step over whole groups), else placeholder zeros."""
    k_ok = kk < IN_DIM - k0
    w = tl.load(w_ptrs + k0 * sw_k, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    return w, _step_scales(s_ptrs, n_ok & (k0 < IN_DIM), k0, w.shape[0], IN_DIM, HAS_SCALE, GROUP, BLOCK_K)


@triton.jit
def _step_scales(s_ptrs, s_mask, k0, N: tl.constexpr, IN_DIM: tl.constexpr, HAS_SCALE: tl.constexpr,
                 GROUP: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """A step's scales for `step_products`: [N, 1] in one group, [N, BLOCK_K // GROUP] over whole groups
    (groups past IN_DIM read as 0), zeros [N, 1] without HAS_SCALE (not used)."""
    if not HAS_SCALE:
        scale = tl.zeros([N, 1], dtype=tl.float32)
    elif BLOCK_K <= GROUP:
        scale = tl.load(s_ptrs + k0 // GROUP, mask=s_mask, other=0.0)[:, None]
    else:
        j = tl.arange(0, BLOCK_K // GROUP)
        j_ok = k0 + j * GROUP < IN_DIM
        scale = tl.load(s_ptrs[:, None] + k0 // GROUP + j[None, :], mask=s_mask[:, None] & j_ok[None, :],
                        other=0.0)  # fmt: skip
    return scale


@triton.jit
def step_products(acc, w, scale, v, HAS_SCALE: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                  STEP_SUM: tl.constexpr):  # fmt: skip
    """acc plus a step's products from `step_tiles`' loads and the input v [BLOCK_K] fp32, as `weight_step`
    computes them (the same operations, so the same bits)."""
    wf = w.to(tl.float32)
    if not HAS_SCALE:
        out = _add(acc, wf * v[None, :], STEP_SUM)
    elif BLOCK_K <= GROUP:
        out = _add(acc, wf * scale * v[None, :], STEP_SUM)
    else:
        groups = tl.reshape(wf * v[None, :], (wf.shape[0], BLOCK_K // GROUP, GROUP))
        out = acc + tl.sum(tl.sum(groups, axis=2) * scale, axis=1)
    return out


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
