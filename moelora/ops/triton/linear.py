"""A linear layer for a few tokens (decode) in one launch: the base GEMV split along the input, the bias,
and the dense multi-LoRA (shrink and expand) together, instead of cuBLAS plus a shrink and an expand per
stacked part.

Programs, in start order (`counters.ticket`): with LoRA, the shrinks first, one per (distinct slot of the
batch, input chunk): xa of the slot's tokens over the chunk, the stacked parts' A at once (x and A read
once). Then one program per (output tile, input split), split 0 of every tile first, each
an fp32 partial of x @ W^T; split 0's also gets the LoRA delta (after the shrinks: lower tickets, so no
deadlock), whose latency then hides behind the other splits' GEMV. The last split of a tile to finish
adds the partials up in split order, then the bias, and stores the tile. A token without an adapter gets
exactly the base sum: a base row does not depend on which adapters share its batch. One token whose
GEMV programs walk few K steps (`KernelPlan.linear_fold_steps`) takes no shrink programs: each GEMV
program computes its input columns' part of x A^T beside the weight's loads and adds b @ that part (the
splits add up as the base's), with no ticket or wait. A launch given its shrink (xa: the input norm's for
q/k/v, the decode attention's for o) runs no shrink programs and does not fold; where the batch's slots
make one expand group, split 0 loads their B tiles before the wait for the previous kernel and xa after it.
`linear_norm_router` runs the RMSNorm and the softmax router that follow the layer (o, then a MoE block) in
the same launch, as the epilogue of each column tile, and never stores the layer's output.

An FP8 weight (`RowScales`) is multiplied by its rows' scales in registers, each K step within one scale
group. With more tokens than the one launch takes, the weight is dequantised into a 16-bit copy for cuBLAS
(or, below `KernelPlan.fp8_copy_tokens`, a grouped-tile GEMM scales its tiles, `fp8_matmul`); the LoRA
kernels follow.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moelora.ops.dense_lora import DenseLora
from moelora.ops.fp8 import RowScales
from moelora.ops.input_norm import InputNorm
from moelora.ops.norm_router import NormRouter
from moelora.ops.plan import TUNED, KernelPlan, LinearTiles
from moelora.ops.triton.common import (
    add_expand,
    add_expand_slots,
    after_previous,
    dependent_launch,
    lanes_in_rank,
    num_sms,
    prefetch_l2,
    slot_group,
    slot_group_b,
    slot_group_dot,
    slot_group_hit,
    stacked_lanes_in_rank,
    valid_slot,
)
from moelora.ops.triton.counters import last_one, launch_counters, signal, ticket, wait_for
from moelora.ops.triton.fp8_linear import check_scales, dequantize, fp8_matmul
from moelora.ops.triton.lora import add_lora, add_lora_parts, stacked_shrink
from moelora.ops.triton.norm import norm_weighted, rms_norm
from moelora.ops.triton.router import ROUTER_TOKENS, route_last, route_tile
from moelora.ops.triton.tiles import dot_precision, expand_mode

_MAX_LANES = 256  # stacked rank lanes (parts x rank) one shrink program holds
_MAX_PARTS = 4  # stacked output parts (q/k/v: 3) a column tile can tell apart

# The launch's counters (`counters.launch_counters`), in order: tickets, shrinks done, programs done, tiles
# done (with the norm and the router), then one per output tile (its splits done).


@triton.jit
def _tile_part(n0, END0: tl.constexpr, END1: tl.constexpr, END2: tl.constexpr):
    """The stacked part (0..3) that output column n0 belongs to (ENDi: where part i + 1 starts)."""
    return (n0 >= END0).to(tl.int32) + (n0 >= END1).to(tl.int32) + (n0 >= END2).to(tl.int32)


@triton.jit
def _input_rstd(x_ptr, r_ptr, s_ptr, store_lo, store_hi, num_tokens, sx_t, sx_k, s_in_t, eps,
                IN_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                HAS_RES: tl.constexpr):  # fmt: skip
    """[BLOCK_M] fp32: each token row's rstd under the input RMSNorm, 1 / sqrt(mean(s^2) + eps) with s = x +
    residual rounded to x's dtype (HAS_RES) or x; with HAS_RES s is stored at s_ptr (rows of IN_DIM) over
    columns [store_lo, store_hi). A row at a time, its loads in CHUNK-column pieces of an unrolled loop
    (issued together: about one trip to memory a row; a loop over K steps would wait for each step's loads
    in turn)."""
    t = tl.arange(0, BLOCK_M)
    k = tl.arange(0, CHUNK)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    i = 0
    while i < num_tokens:  # (a `while`: the interpreter runs no `range` over a run-time bound)
        squares = tl.zeros([CHUNK], dtype=tl.float32)
        for c in tl.static_range(0, IN_DIM, CHUNK):
            ok = c + k < IN_DIM
            xk = tl.load(x_ptr + i * sx_t + (c + k) * sx_k, mask=ok, other=0.0)
            s = _input_sum(xk, r_ptr + i * s_in_t + c + k, ok, HAS_RES)
            if HAS_RES:
                tl.store(s_ptr + i * IN_DIM + c + k, s, mask=ok & (c + k >= store_lo) & (c + k < store_hi))
            sf = s.to(tl.float32)
            squares += sf * sf
        rstd = tl.where(t == i, tl.rsqrt(tl.sum(squares, axis=0) / IN_DIM + eps), rstd)
        i += 1
    return rstd


@triton.jit
def _input_sum(xk, r_ptrs, mask, HAS_RES: tl.constexpr):
    """x + residual at a step's columns in x's dtype (as the twin's `x + residual`), or x."""
    if HAS_RES:
        r = tl.load(r_ptrs, mask=mask, other=0.0)
        return (xk.to(tl.float32) + r.to(tl.float32)).to(xk.dtype)
    return xk


@triton.jit
def _input_normed(xk, r_ptrs, w_ptr, cols, mask, rstd, HAS_RES: tl.constexpr, WEIGHT_FIRST: tl.constexpr):
    """A step's input columns xk [BLOCK_M, BLOCK_K] through the input RMSNorm (`norm.norm_weighted`'s steps,
    in x's dtype), the residual added first where HAS_RES. cols: the columns as [BLOCK_M, BLOCK_K] (every
    row the same), so that the norm weight's load is a tile like x's, which the loop's pipelining issues
    ahead (a [BLOCK_K] load, 2 bytes a thread, would wait each step)."""
    s = _input_sum(xk, r_ptrs, mask, HAS_RES)
    return norm_weighted(s, w_ptr, rstd[:, None], cols, mask, WEIGHT_FIRST).to(xk.dtype)


@triton.jit
def _shrink(
    x_ptr, a_ptr, xa_ptr, slot_ptr, rank_ptr, item, num_tokens, num_slots, lanes, part_rank,
    sx_t, sx_k, sa_s, sa_l, sa_k, s_rs, s_rp, in_res_ptr, in_w_ptr, s_in_t, in_eps,
    IN_DIM: tl.constexpr, CHUNKS: tl.constexpr, CHUNK: tl.constexpr, HAS_RANK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr,
    NORM: tl.constexpr, NORM_RES: tl.constexpr, NORM_WF: tl.constexpr, NORM_CHUNK: tl.constexpr,
):  # fmt: skip
    """Shrink `item` = (j, input chunk c): xa[c, t, l] = a[s, l, cols] @ x[t, cols] over the chunk's
    input columns for the tokens t on s, the batch's j-th distinct slot (rows of other tokens untouched;
    no work if the batch has j slots or fewer); lane l is part l // part_rank's lane l % part_rank. With
    NORM x is the input norm's output (`_input_normed`)."""
    j = item // CHUNKS
    chunk = item % CHUNKS
    t = tl.arange(0, BLOCK_M)
    t_ok = t < num_tokens
    slot = valid_slot(tl.load(slot_ptr + t, mask=t_ok, other=-1), num_slots)
    # The tokens that are the first of their slot, numbered in token order; s is the j-th one's slot.
    earlier = (t[None, :] < t[:, None]) & (slot[None, :] == slot[:, None])
    first = (slot < num_slots) & (tl.sum(earlier.to(tl.int32), axis=1) == 0)
    order = tl.sum(((t[None, :] < t[:, None]) & first[None, :]).to(tl.int32), axis=1)
    s = tl.max(tl.where(first & (order == j), slot, -1))
    sel = slot == s
    if s >= 0:
        lane = tl.arange(0, BLOCK_L)
        l_ok = lane < lanes
        if HAS_RANK:
            l_ok = stacked_lanes_in_rank(lane, l_ok, part_rank, rank_ptr + s * s_rs, s_rp)
        kk = chunk * CHUNK + tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_L], dtype=tl.float32)
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
        if NORM:
            rstd = _input_rstd(x_ptr, in_res_ptr, in_res_ptr, 0, 0, num_tokens, sx_t, sx_k, s_in_t, in_eps,
                               IN_DIM, BLOCK_M, NORM_CHUNK, NORM_RES)  # fmt: skip
        for k0 in range(0, CHUNK, BLOCK_K):
            k_ok = kk + k0 < IN_DIM
            x_mask = sel[:, None] & k_ok[None, :]
            xk = tl.load(x_ptr + t[:, None] * sx_t + (kk + k0)[None, :] * sx_k, mask=x_mask, other=0.0)
            if NORM:
                r_ptrs = in_res_ptr + t[:, None] * s_in_t + (kk + k0)[None, :]
                cols = (kk + k0)[None, :] + 0 * t[:, None]
                xk = _input_normed(xk, r_ptrs, in_w_ptr, cols, x_mask, rstd, NORM_RES, NORM_WF)
            ak = tl.load(
                a_ptr + s.to(tl.int64) * sa_s + lane[None, :] * sa_l + (kk + k0)[:, None] * sa_k,
                mask=k_ok[:, None] & l_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(xk, ak, acc, input_precision=PRECISION)
        dst = xa_ptr + (chunk * num_tokens + t[:, None]) * lanes + lane[None, :]
        tl.store(dst, acc, mask=sel[:, None] & (lane < lanes)[None, :])


@triton.jit
def _xa_of_part(xa_ptr, t, t_on, part, rank, num_tokens, PARTS: tl.constexpr, CHUNKS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """[BLOCK_M, BLOCK_R] fp32: the shrink xa of stacked part `part` for the tokens t where t_on (zeros
    elsewhere), its chunks added up in order."""
    r = tl.arange(0, BLOCK_R)
    lanes = PARTS * rank
    xa_ptrs = xa_ptr + t[:, None] * lanes + (part * rank + r)[None, :]
    xa_mask = t_on[:, None] & (r < rank)[None, :]
    xa = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for c in range(0, CHUNKS):
        xa += tl.load(xa_ptrs + c * num_tokens * lanes, mask=xa_mask, other=0.0, cache_modifier=".cg")
    return xa


@triton.jit
def _expand(
    acc, t, t_ok, n, n_ok, tile, slot_ptr, xa_ptr, b_ptr, rank_ptr, shrunk_ptr, num_tokens, rank,
    sb_s, sb_n, sb_r, s_rs, s_rp,
    NUM_SLOTS: tl.constexpr, SHRINKS: tl.constexpr, CHUNKS: tl.constexpr, PARTS: tl.constexpr,
    END0: tl.constexpr, END1: tl.constexpr, END2: tl.constexpr, HAS_RANK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SLOT_GROUP: tl.constexpr, EXPAND: tl.constexpr,
    PRECISION: tl.constexpr, XA_READY: tl.constexpr,
):  # fmt: skip
    """acc plus each token's b[s][n] @ xa (its part's lanes, the shrink chunks added up in order), once the
    shrinks are done (XA_READY: xa came with the launch); tokens without a slot get nothing added."""
    slot = valid_slot(tl.load(slot_ptr + t, mask=t_ok, other=-1), NUM_SLOTS)
    s = tl.min(slot)
    if s < NUM_SLOTS:
        if not XA_READY:
            wait_for(shrunk_ptr, SHRINKS)
        part = _tile_part(tile * BLOCK_N, END0, END1, END2)
        r = tl.arange(0, BLOCK_R)
        xa = _xa_of_part(xa_ptr, t, slot < NUM_SLOTS, part, rank, num_tokens, PARTS, CHUNKS, BLOCK_M, BLOCK_R)
        b_ptrs = b_ptr + n[None, :] * sb_n + r[:, None] * sb_r
        acc = add_expand_slots(
            acc, xa, slot, b_ptrs, n_ok, r, rank, rank_ptr + part * s_rp, NUM_SLOTS, sb_s, s_rs,
            HAS_RANK, SLOT_GROUP, EXPAND, PRECISION,
        )  # fmt: skip
    return acc


@triton.jit
def _gemv_part(x_ptr, w_ptr, sc_ptr, t_ok, n, n_ok, split, sx_t, sx_k, sw_n, sw_k, ss_n, a_rows, r_ok, sa_k,
               in_res_ptr, in_w_ptr, s_in_t, rstd,
               IN_DIM: tl.constexpr, K_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr, GROUP: tl.constexpr,
               PRECISION: tl.constexpr, FOLD: tl.constexpr, BLOCK_R: tl.constexpr, NORM: tl.constexpr,
               NORM_RES: tl.constexpr, NORM_WF: tl.constexpr):  # fmt: skip
    """(x[:, cols] @ w[n, cols]^T [BLOCK_M, BLOCK_N], xa) in fp32 over this split's input columns; with
    HAS_SCALE w is FP8 times its rows' scales (sc_ptr [n, group]; a step lies in one group: BLOCK_K <=
    GROUP): HAS_SCALE 1 scales the weight tile before the dot (rounded to x's dtype), 2 takes the weights
    as they are (FP8 values are exact in 16 bits) and scales each step's dot (`fp8_linear_scale_dots`).
    With FOLD also xa = x[:, cols] @ a[r, cols]^T [BLOCK_M, BLOCK_R] over the same columns, the LoRA
    shrink's part (a_rows [BLOCK_R]: lane r's row of A, read where r_ok), its loads beside the weight's
    in the same steps; else xa is zeros. With NORM x goes through the input norm first (rows' `rstd`), and
    the residual added first where NORM_RES (`_input_normed`)."""
    t = tl.arange(0, BLOCK_M)
    kk = split * K_CHUNK + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + t[:, None] * sx_t + kk[None, :] * sx_k
    r_ptrs = in_res_ptr + t[:, None] * s_in_t + kk[None, :]  # the residual: rows of unit stride
    w_ptrs = w_ptr + n[None, :].to(tl.int64) * sw_n + kk[:, None] * sw_k
    a_ptrs = a_rows[None, :] + kk[:, None] * sa_k
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    xa = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K_CHUNK, BLOCK_K):
        k_ok = kk + k0 < IN_DIM
        x_mask = t_ok[:, None] & k_ok[None, :]
        xk = tl.load(x_ptrs, mask=x_mask, other=0.0)
        if NORM:
            cols = (kk + k0)[None, :] + 0 * t[:, None]
            xk = _input_normed(xk, r_ptrs, in_w_ptr, cols, x_mask, rstd, NORM_RES, NORM_WF)
            r_ptrs += BLOCK_K
        wk = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_SCALE:
            group = (split * K_CHUNK + k0) // GROUP
            scale = tl.load(sc_ptr + n.to(tl.int64) * ss_n + group, mask=n_ok, other=0.0)
        if HAS_SCALE == 2:
            acc += tl.dot(xk, wk.to(xk.dtype), input_precision=PRECISION) * scale[None, :]
        else:
            if HAS_SCALE:
                wk = (wk.to(tl.float32) * scale[None, :]).to(xk.dtype)
            acc = tl.dot(xk, wk, acc, input_precision=PRECISION)
        if FOLD:
            ak = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            xa = tl.dot(xk, ak, xa, input_precision=PRECISION)
            a_ptrs += BLOCK_K * sa_k
        x_ptrs += BLOCK_K * sx_k
        w_ptrs += BLOCK_K * sw_k
    return acc, xa


@triton.jit
def _prefetch_part(w_ptr, item, n_tiles, out_dim, sw_n, sw_k, IN_DIM: tl.constexpr, K_CHUNK: tl.constexpr,
                   BLOCK_N: tl.constexpr, LINE: tl.constexpr, LINES: tl.constexpr):  # fmt: skip
    """The weight rows and input columns of GEMV item `item` (tile, split) brought into L2, one address a
    cache line of LINE weights: issued before the wait for the previous kernel, they load while it ends."""
    tile = item % n_tiles
    split = item // n_tiles
    n = tl.minimum(tile * BLOCK_N + tl.arange(0, BLOCK_N), out_dim - 1)
    k0 = split * K_CHUNK
    k = tl.minimum(k0 + tl.arange(0, LINES) * LINE, tl.minimum(k0 + K_CHUNK, IN_DIM) - 1)
    prefetch_l2(w_ptr + n[:, None].to(tl.int64) * sw_n + k[None, :] * sw_k)


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, sc_ptr, bias_ptr, y_ptr, part_ptr, slot_ptr, a_ptr, xa_ptr, b_ptr, rank_ptr,
    ticket_ptr, shrunk_ptr, exited_ptr, tile_count_ptr, route_count_ptr,
    res_ptr, nw_ptr, wr_ptr, rp_ptr, rs_ptr, rw_ptr, rid_ptr, rh_ptr, rsum_ptr,
    in_res_ptr, in_w_ptr, in_sum_ptr,
    num_tokens, out_dim, rank, num_experts,
    sx_t, sx_k, sw_n, sw_k, ss_n, sy_t, sy_n, sa_s, sa_l, sa_k, sb_s, sb_n, sb_r, s_rs, s_rp,
    swr_e, swr_k, eps, s_in_t, in_eps,
    IN_DIM: tl.constexpr, HAS_SCALE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_RANK: tl.constexpr,
    NUM_SLOTS: tl.constexpr, SHRINKS: tl.constexpr, SPLITS: tl.constexpr, K_CHUNK: tl.constexpr,
    CHUNKS: tl.constexpr,
    SHRINK_CHUNK: tl.constexpr, PARTS: tl.constexpr, END0: tl.constexpr, END1: tl.constexpr,
    END2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, SLOT_GROUP: tl.constexpr, EXPAND: tl.constexpr,
    PRECISION: tl.constexpr, FOLD: tl.constexpr, XA_READY: tl.constexpr, EARLY: tl.constexpr,
    PDL: tl.constexpr, LINE: tl.constexpr, LINES: tl.constexpr, ROUTE: tl.constexpr, ROUTE_T: tl.constexpr,
    BLOCK_E: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
    WEIGHT_FIRST: tl.constexpr, NORM_K: tl.constexpr, ROUTE_LINES: tl.constexpr, ROUTE_DIM: tl.constexpr,
    ROUTE_TILES: tl.constexpr, NORM: tl.constexpr, NORM_RES: tl.constexpr, NORM_WF: tl.constexpr,
    NORM_CHUNK: tl.constexpr,
):  # fmt: skip
    """NORM: x is the input of the RMSNorm before the layer (with the residual in_res_ptr where NORM_RES, the
    norm's weight in_w_ptr): every program computes its rows' rstd and normalises each step's columns as it
    loads them; the programs of column tile 0 store x + residual (in_sum_ptr) over their split's columns."""
    n_tiles = tl.cdiv(out_dim, BLOCK_N)
    if PDL:  # this program's weights (its GEMV item where start order and tickets agree) while waiting
        guess = tl.maximum(tl.program_id(0) - SHRINKS * HAS_LORA, 0)
        _prefetch_part(w_ptr, guess, n_tiles, out_dim, sw_n, sw_k, IN_DIM, K_CHUNK, BLOCK_N, LINE, LINES)
        if ROUTE:  # and the router's weights for its columns
            r_n = tl.minimum((guess % n_tiles) * BLOCK_N + tl.arange(0, ROUTE_LINES) * LINE, out_dim - 1)
            r_e = tl.minimum(tl.arange(0, BLOCK_E), num_experts - 1)
            prefetch_l2(wr_ptr + r_e[:, None] * swr_e + r_n[None, :] * swr_k)
    if EARLY:
        # xa given and the batch's slots one group: split 0 (the first n_tiles programs, no tickets) loads
        # its slots' B tiles before the wait (slot ids are written by a copy before the step's first
        # kernel, adapter weights by none) and its xa right after it, so that both loads overlap the GEMV;
        # only the expand's dot waits for the GEMV's end. Other splits load nothing.
        e_t = tl.arange(0, BLOCK_M)
        e_tile = tl.program_id(0) % n_tiles
        e_n = e_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        e_r = tl.arange(0, BLOCK_R)
        e_on = (e_t < num_tokens) & (tl.program_id(0) < n_tiles)
        e_slot = valid_slot(tl.load(slot_ptr + e_t, mask=e_on, other=-1), NUM_SLOTS)
        e_part = _tile_part(e_tile * BLOCK_N, END0, END1, END2)
        e_hit = slot_group_hit(e_slot, 0, NUM_SLOTS, SLOT_GROUP)
        e_b = slot_group_b(
            e_hit, 0, b_ptr + e_n[None, :] * sb_n + e_r[:, None] * sb_r, e_n < out_dim, e_r, rank,
            rank_ptr + e_part * s_rp, sb_s, s_rs, HAS_RANK, SLOT_GROUP,
        )  # fmt: skip
    after_previous(PDL)
    if EARLY:
        e_xa = _xa_of_part(xa_ptr, e_t, e_slot < NUM_SLOTS, e_part, rank, num_tokens, PARTS, CHUNKS, BLOCK_M,
                           BLOCK_R)  # fmt: skip
    num_shrinks = 0
    item = tl.program_id(0)
    if HAS_LORA and not FOLD and not XA_READY:
        num_shrinks = SHRINKS
        item = ticket(ticket_ptr)
    if item < num_shrinks:
        _shrink(
            x_ptr, a_ptr, xa_ptr, slot_ptr, rank_ptr, item, num_tokens, NUM_SLOTS, PARTS * rank, rank,
            sx_t, sx_k, sa_s, sa_l, sa_k, s_rs, s_rp, in_res_ptr, in_w_ptr, s_in_t, in_eps,
            IN_DIM, CHUNKS, SHRINK_CHUNK, HAS_RANK, BLOCK_M, BLOCK_K, BLOCK_L, PRECISION, NORM, NORM_RES,
            NORM_WF, NORM_CHUNK,
        )  # fmt: skip
        signal(shrunk_ptr)
    else:
        # Split 0 of every tile first (the lowest tickets): it also adds the LoRA delta, whose latency
        # then overlaps the other splits' GEMV.
        tile = (item - num_shrinks) % n_tiles
        split = (item - num_shrinks) // n_tiles
        t = tl.arange(0, BLOCK_M)
        t_ok = t < num_tokens
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < out_dim
        # With FOLD (one token) the LoRA shrink runs inside the GEMV: lanes of this tile's part of the
        # token's slot, none without one.
        r = tl.arange(0, BLOCK_R)
        s = num_tokens * 0 + NUM_SLOTS
        part = num_tokens * 0
        r_ok = r < 0
        if FOLD:
            s = valid_slot(tl.load(slot_ptr), NUM_SLOTS)
            part = _tile_part(tile * BLOCK_N, END0, END1, END2)
            r_ok = (s < NUM_SLOTS) & lanes_in_rank(r, rank, rank_ptr + part * s_rp, s * s_rs, HAS_RANK)
        a_rows = a_ptr + tl.where(s < NUM_SLOTS, s, 0).to(tl.int64) * sa_s + (part * rank + r) * sa_l
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
        if NORM:
            # x + residual stored here (by tile 0's programs, each over its split's columns), not in the
            # GEMV's loop: with the store there (a branch of tile 0's programs) the launch took 14 us a layer
            # more than the norm's own launch plus q/k/v, and as long as they without a residual (H100,
            # 27th session, `bench/linear.py --norm`'s chain); this form is not yet timed
            lo = tl.where(tile == 0, split * K_CHUNK, 0)
            rstd = _input_rstd(x_ptr, in_res_ptr, in_sum_ptr, lo, tl.where(tile == 0, lo + K_CHUNK, 0),
                               num_tokens, sx_t, sx_k, s_in_t, in_eps, IN_DIM, BLOCK_M, NORM_CHUNK,
                               NORM_RES)  # fmt: skip
        acc, xa = _gemv_part(x_ptr, w_ptr, sc_ptr, t_ok, n, n_ok, split, sx_t, sx_k, sw_n, sw_k, ss_n, a_rows,
                             r_ok, sa_k, in_res_ptr, in_w_ptr, s_in_t, rstd, IN_DIM,
                             K_CHUNK, BLOCK_M, BLOCK_N, BLOCK_K, HAS_SCALE, GROUP, PRECISION, FOLD, BLOCK_R,
                             NORM, NORM_RES, NORM_WF)  # fmt: skip
        if FOLD:
            if s < NUM_SLOTS:  # this split's part of the delta: b[s][n] @ xa (the splits add up below)
                b_ptrs = b_ptr + s.to(tl.int64) * sb_s + n[None, :] * sb_n + r[:, None] * sb_r
                acc = add_expand(acc, xa, b_ptrs, r_ok[:, None] & n_ok[None, :], EXPAND, PRECISION)
        elif EARLY:
            if tl.max(tl.max(e_hit.to(tl.int32), axis=1), axis=0) > 0:
                acc = slot_group_dot(acc, e_xa, e_hit, e_b, EXPAND, PRECISION)
        elif HAS_LORA and split == 0:
            acc = _expand(
                acc, t, t_ok, n, n_ok, tile, slot_ptr, xa_ptr, b_ptr, rank_ptr, shrunk_ptr, num_tokens, rank,
                sb_s, sb_n, sb_r, s_rs, s_rp, NUM_SLOTS, SHRINKS, CHUNKS, PARTS, END0, END1, END2, HAS_RANK,
                BLOCK_M, BLOCK_N, BLOCK_R, SLOT_GROUP, EXPAND, PRECISION, XA_READY,
            )  # fmt: skip
        mask = t_ok[:, None] & n_ok[None, :]
        finish = True
        if SPLITS > 1:
            # Partials of every split; the tile's last split to finish adds them up in split order.
            rows = t[:, None] * out_dim + n[None, :]
            tl.store(part_ptr + split * num_tokens * out_dim + rows, acc, mask=mask)
            finish = last_one(tile_count_ptr + tile, SPLITS)
            if finish:
                acc = tl.load(part_ptr + rows, mask=mask, other=0.0, cache_modifier=".cg")
                for i in range(1, SPLITS):
                    acc += tl.load(part_ptr + i * num_tokens * out_dim + rows, mask=mask, other=0.0,
                                   cache_modifier=".cg")  # fmt: skip
        if finish:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if ROUTE:  # the norm and the router after the layer, in place of storing its output
                route_tile(
                    acc, t, n, mask, tile, res_ptr, nw_ptr, wr_ptr, rp_ptr, rs_ptr, rsum_ptr, num_tokens,
                    num_experts, swr_e, swr_k, ROUTE_DIM, ROUTE_T, BLOCK_E,
                )  # fmt: skip
                if last_one(route_count_ptr, n_tiles):
                    route_last(
                        rp_ptr, rs_ptr, rsum_ptr, nw_ptr, rh_ptr, rw_ptr, rid_ptr, num_tokens, num_experts,
                        eps, ROUTE_DIM, ROUTE_TILES, ROUTE_T, BLOCK_E, TOP_K, K_PAD, RENORMALIZE,
                        WEIGHT_FIRST, NORM_K,
                    )  # fmt: skip
            else:
                y_ptrs = y_ptr + t[:, None] * sy_t + n[None, :] * sy_n
                tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    if HAS_LORA and not FOLD and not XA_READY:
        programs = num_shrinks + n_tiles * SPLITS
        if last_one(exited_ptr, programs):
            tl.atomic_xchg(ticket_ptr, 0)
            tl.atomic_xchg(shrunk_ptr, 0)


def _column_tile(sizes: tuple[int, ...], tiles: LinearTiles) -> int:
    """The widest column tile (at most the plan's) that no part boundary cuts; 0 if there is none."""
    block_n = tiles.block_n
    while block_n >= 16:
        if all(s % block_n == 0 for s in sizes[:-1]):
            return block_n
        block_n //= 2
    return 0


def fits(
    x: torch.Tensor, lora_lanes: int, sizes: tuple[int, ...], plan: KernelPlan = TUNED, fp8: bool = False
) -> bool:
    """Whether `linear` runs this layer in one launch: few enough tokens (`linear_tokens`, with an `fp8`
    weight `fp8_linear_tokens`), stacked rank lanes and parts, and a column tile that no part boundary
    cuts."""
    return (
        x.shape[0] <= (plan.fp8_linear_tokens if fp8 else plan.linear_tokens)
        and lora_lanes <= _MAX_LANES
        and len(sizes) <= _MAX_PARTS
        and _column_tile(sizes, _tiles(plan, fp8)) > 0
    )


def _tiles(plan: KernelPlan, fp8: bool) -> LinearTiles:
    """The one launch's tiles: the plan's `fp8_linear_tiles` for an FP8 weight where it has them."""
    return plan.fp8_linear_tiles if fp8 and plan.fp8_linear_tiles is not None else plan.linear_tiles


def _geometry(in_dim: int, sizes: tuple[int, ...], tiles: LinearTiles, group: int | None,
              device: torch.device) -> tuple[int, int, int, int]:  # fmt: skip
    """(block_n, block_k, column tiles, k_chunk) of a launch: input splits of about tiles.programs_per_sm
    programs per SM in all, each a whole number of block_k steps (`group`: an FP8 weight's scale group,
    which a step must not cross). The same with or without adapters: the splits set the order of a row's
    sum, and a base row must not depend on its neighbours' slots."""
    block_n = _column_tile(sizes, tiles)
    block_k = min(tiles.block_k, max(16, triton.next_power_of_2(in_dim)))
    if group is not None:
        block_k = min(block_k, group)
    n_tiles = triton.cdiv(sum(sizes), block_n)
    want = max(1, min(tiles.programs_per_sm * num_sms(device) // n_tiles, triton.cdiv(in_dim, block_k)))
    return block_n, block_k, n_tiles, triton.cdiv(triton.cdiv(in_dim, want), block_k) * block_k


def _folds(num_tokens: int, block_k: int, k_chunk: int, plan: KernelPlan) -> bool:
    """Whether a launch with adapters computes its LoRA shrink inside the GEMV (one token, few K steps)."""
    return num_tokens == 1 and k_chunk // block_k <= plan.linear_fold_steps


def shrink_chunk(
    x: torch.Tensor,
    lora: DenseLora,
    sizes: tuple[int, ...],
    one_launch: bool,
    plan: KernelPlan = TUNED,
    group: int | None = None,
) -> int:
    """Input columns a part of this layer's LoRA shrink sums where `linear_layer` may take the shrink
    computed by the norm before it (`norm.add_norm_shrink`, its xa), else 0: at most the plan's
    `norm_shrink_tokens`; in one launch (`one_launch` and `fits`) where the launch does not fold it, past
    the one launch where `lora.add_lora_parts` expands the stacked parts from one shrink. A power of 2,
    below `tiles.shrink_chunk` where the stacked lanes are many (the norm's program holds the chunk's A).
    group: an FP8 weight's scale group (None for a 16-bit weight), as `linear` takes it from its scales."""
    in_dim, lanes = x.shape[-1], lora.a.shape[1] * lora.a.shape[2]
    if x.dim() != 2 or x.shape[0] > plan.norm_shrink_tokens:
        return 0
    fp8 = group is not None
    tiles = _tiles(plan, fp8)
    if one_launch and fits(x, lanes, sizes, plan, fp8):
        _, block_k, _, k_chunk = _geometry(in_dim, sizes, tiles, group, x.device)
        if _folds(x.shape[0], block_k, k_chunk, plan):
            return 0
    elif len(sizes) < 2 or not stacked_shrink(len(sizes), lora.a.shape[2]):
        return 0
    cap = max(16, 16384 // max(16, triton.next_power_of_2(lanes)))
    return min(triton.next_power_of_2(min(tiles.shrink_chunk, in_dim)), cap)


def takes_shrink(
    x: torch.Tensor, lanes: int, sizes: tuple[int, ...], one_launch: bool, plan: KernelPlan, fp8: bool
) -> bool:
    """Whether `linear_layer` on input x with `lanes` stacked LoRA lanes can take a LoRA shrink computed
    before it (`ops.decode_o_shrink`) in place of its own: in its one launch (which then does not fold the
    shrink into its GEMV), or past it where the dense LoRA expands the parts from one shrink (`one_launch`
    and `fp8` as `linear_layer` takes them)."""
    if one_launch and fits(x, lanes, sizes, plan, fp8):
        return True
    return stacked_shrink(len(sizes), lanes // len(sizes))


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor] | None,
    sizes: tuple[int, ...],
    plan: KernelPlan = TUNED,
    scales: RowScales | None = None,
    xa: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ weight^T + bias, plus each token's adapter delta, in one launch (the caller checks `fits`).

    x [T, in]; weight [out, in] (FP8 with `scales`); bias [out] or None; sizes: the stacked parts' output
    sizes (sum = out); lora None or (a [S, P, R, in], b [S, out, R], slot_rank [S, P] or None, token_slot
    [T]), as `ops.linear`; xa None, or the LoRA shrink already computed ([chunks, T, P * R] fp32, the
    chunks added up in order: `norm.add_norm_shrink` where `shrink_chunk` allows it, the decode
    attention's `o_shrink` where `takes_shrink` does), so the launch has no shrink programs and does not
    fold the shrink into its GEMV. Launches on one device run one after another (they share
    `counters.launch_counters`)."""
    y = _launch(x, weight, bias, lora, sizes, plan, scales, xa, None)
    assert isinstance(y, torch.Tensor)
    return y


def norms_input(x: torch.Tensor, norm: InputNorm, lanes: int, sizes: tuple[int, ...], one_launch: bool,
                plan: KernelPlan = TUNED, fp8: bool = False) -> bool:  # fmt: skip
    """Whether `norm_linear_layer` runs the norm inside the layer's one launch: the launch `fits`, at most
    `KernelPlan.norm_linear_tokens` tokens, the norm's output in x's dtype, a residual like x with rows of
    unit stride. It does not depend on the batch's slots, so a base row gets the same bits in any batch."""
    res = norm.residual
    h_dtype = x.dtype if norm.weight_first else torch.promote_types(norm.weight.dtype, x.dtype)
    return (
        one_launch
        and x.dim() == 2
        and x.shape[0] <= plan.norm_linear_tokens
        and fits(x, lanes, sizes, plan, fp8)
        and h_dtype == x.dtype
        and norm.weight.shape == (x.shape[1],)
        and (res is None or (res.shape == x.shape and res.dtype == x.dtype and res.stride(1) == 1))
    )


def norm_linear(
    x: torch.Tensor,
    norm: InputNorm,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor] | None,
    sizes: tuple[int, ...],
    plan: KernelPlan = TUNED,
    scales: RowScales | None = None,
    xa: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm, then `linear` of its output, in the layer's one launch (the caller checks `norms_input`)
    -> (y, s): s = x + residual (x itself without a residual), stored by the programs of column tile 0
    over their input columns. Every program computes its rows' rstd from the whole rows and normalises
    each K step's columns as it loads them (its shrink programs too), so the norm's output is never
    stored; its bits follow this launch's reduction, not `rms_norm`'s. xa: as `linear`'s (the adapters'
    shrink of the norm's output, `norm.norm_shrink`)."""
    summed = x if norm.residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = _launch(x, weight, bias, lora, sizes, plan, scales, xa, None, norm, summed)
    assert isinstance(y, torch.Tensor)
    return y, summed


def routes(x: torch.Tensor, weight: torch.Tensor, sizes: tuple[int, ...], route: NormRouter,
           plan: KernelPlan = TUNED) -> bool:  # fmt: skip
    """Whether `linear_norm_router` runs the norm and the router inside the layer's one launch (the caller
    checks `fits`): at most `KernelPlan.o_router_tokens` tokens and those the one-launch router takes, one
    output part as wide as the router's input, a contiguous residual in x's dtype, h in x's dtype."""
    res, norm_weight = route.residual, route.norm_weight
    h_dtype = x.dtype if route.weight_first else torch.promote_types(norm_weight.dtype, x.dtype)
    return (
        x.shape[0] <= min(plan.o_router_tokens, ROUTER_TOKENS)
        and len(sizes) == 1
        and route.weight.dtype == x.dtype
        and route.weight.shape[0] <= 256
        and route.weight.shape[1] == weight.shape[0]
        and res.shape == (x.shape[0], weight.shape[0])
        and res.dtype == x.dtype
        and res.is_contiguous()
        and norm_weight.shape == (weight.shape[0],)
        and h_dtype == x.dtype
        and 0 < route.top_k <= route.weight.shape[0]
    )


def linear_norm_router(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor] | None,
    sizes: tuple[int, ...],
    route: NormRouter,
    plan: KernelPlan = TUNED,
    scales: RowScales | None = None,
    xa: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`linear`, then the norm and the router after it, in its one launch (the caller checks `fits` and
    `routes`) -> (weights, ids, h, s), as `moelora.ops.torch.router.linear_norm_router`. The program that
    finishes a column tile adds the residual to it (s, stored) and stores the tile's partials of the rows'
    sums of squares and of their logits (`router.route_tile`); the last tile to finish adds them up and
    takes the top-k, then stores h (`router.route_last`). The layer's output itself is never stored."""
    out = _launch(x, weight, bias, lora, sizes, plan, scales, xa, route)
    assert isinstance(out, tuple)
    return out


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor] | None,
    sizes: tuple[int, ...],
    plan: KernelPlan,
    scales: RowScales | None,
    xa: torch.Tensor | None,
    route: NormRouter | None,
    norm: InputNorm | None = None,
    summed: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one launch of `linear` (route None: -> y) or `linear_norm_router` (-> weights, ids, h, s); with
    `norm` (`norm_linear`), x goes through it first and x + residual is stored in `summed`."""
    num_tokens, in_dim = x.shape
    out_dim = weight.shape[0]
    xa_ready = xa is not None
    tiles = _tiles(plan, scales is not None)
    if scales is not None:
        check_scales(weight, scales)
    group = None if scales is None else scales.group
    block_n, block_k, n_tiles, k_chunk = _geometry(in_dim, sizes, tiles, group, x.device)
    splits = triton.cdiv(in_dim, k_chunk)
    y = torch.empty(num_tokens if route is None else 1, out_dim, dtype=x.dtype, device=x.device)
    part = y  # a placeholder, never read with one split
    if splits > 1:
        part = torch.empty(splits, num_tokens, out_dim, dtype=torch.float32, device=x.device)
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
    ends += [1 << 30] * (3 - len(ends))
    # One token: its LoRA shrink inside every GEMV program of a few K steps (`KernelPlan.linear_fold_steps`),
    # unless it came with the launch
    fold = lora is not None and xa is None and _folds(num_tokens, block_k, k_chunk, plan)
    lanes = 0 if lora is None else lora[0].shape[1] * lora[0].shape[2]
    if xa is not None and (
        lora is None
        or xa.shape[1:] != (num_tokens, lanes)
        or xa.dtype != torch.float32
        or not xa.is_contiguous()
    ):
        raise ValueError(
            f"linear: a shrink xa {tuple(xa.shape)} {xa.dtype} for this launch: [chunks, T, P * R] fp32, "
            "contiguous, where `shrink_chunk` or `takes_shrink` says"
        )
    if lora is None:  # placeholders, never read (HAS_LORA is off)
        # of x's dtype: the shrink's dot is still traced, and an FP8 weight there would not compile
        slot, a, b, rank_of = x, x[None, :, None], x[None, :, :, None], None
        xa, num_slots, rank, parts, chunks, shrink_cols = part, 0, 1, 1, 0, 1
        a_strides: tuple[int, ...] = (0, 0, 0)
    else:
        a4, b, rank_of, slot = lora
        num_slots, parts, rank = a4.shape[0], a4.shape[1], a4.shape[2]
        a = a4.reshape(num_slots, parts * rank, in_dim)
        a_strides = a.stride()
        shrink_cols = triton.cdiv(min(tiles.shrink_chunk, in_dim), block_k) * block_k
        chunks = triton.cdiv(in_dim, shrink_cols)
        if xa is not None:
            chunks = xa.shape[0]
        elif fold:
            xa = part  # a placeholder, never read when folded
        else:
            xa = torch.empty(chunks, num_tokens, parts * rank, dtype=torch.float32, device=x.device)
    sync = launch_counters(x.device, 4 + n_tiles)
    # the norm and the router after the layer (placeholders, never read, without them), their outputs
    rt = route if route is not None else NormRouter(x, x, 0.0, False, x, 1, False, False)
    r = _route_outputs(x, out_dim, n_tiles, route)
    ranks = slot if rank_of is None else rank_of  # a placeholder when there is none
    block_m = max(16, triton.next_power_of_2(num_tokens))
    block_r = max(16, triton.next_power_of_2(rank))
    # one per (distinct slot, chunk) at most, none where folded or given
    shrinks = 0 if fold or xa_ready else min(num_tokens, num_slots) * chunks
    table = x if scales is None else scales.table  # a placeholder, never read, without scales
    # the norm before the layer (placeholders, never read, without it)
    xn = norm if norm is not None else InputNorm(None, x, 0.0, False)
    xr = xn.residual if xn.residual is not None else x
    xs = summed if summed is not None else x
    launch = "norm_linear" if norm is not None else "linear_router" if route is not None else "linear"
    pdl = dependent_launch(x.device, plan.pdl_for(launch))
    line = max(1, 128 // weight.element_size())  # weights a 128-byte cache line holds
    _linear_kernel[(shrinks + n_tiles * splits,)](
        x, weight, table, weight if bias is None else bias, y, part, slot, a, xa, b, ranks,
        sync, sync[1:], sync[2:], sync[4:], sync[3:],
        rt.residual, rt.norm_weight, rt.weight, r.logits, r.squares, r.weights, r.ids, r.h, r.s,
        xr, xn.weight, xs, num_tokens, out_dim, rank, rt.weight.shape[0],
        *x.stride(), *weight.stride(), table.stride(0), *y.stride(), *a_strides, b.stride(0), b.stride(1),
        b.stride(-1), ranks.stride(0), ranks.stride(-1) if ranks.dim() > 1 else 0,
        *rt.weight.stride(), rt.eps, xr.stride(0), xn.eps,
        IN_DIM=in_dim, HAS_SCALE=0 if scales is None else 2 if plan.fp8_linear_scale_dots else 1,
        GROUP=1 if scales is None else scales.group,
        HAS_BIAS=bias is not None, HAS_LORA=lora is not None, HAS_RANK=rank_of is not None,
        NUM_SLOTS=num_slots, SHRINKS=shrinks, SPLITS=splits, K_CHUNK=k_chunk, CHUNKS=chunks,
        SHRINK_CHUNK=shrink_cols,
        PARTS=parts, END0=ends[0], END1=ends[1], END2=ends[2],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
        BLOCK_L=max(16, triton.next_power_of_2(parts * rank)), SLOT_GROUP=slot_group(num_slots, block_r),
        EXPAND=expand_mode(b.dtype, plan), PRECISION=dot_precision(x.dtype), FOLD=fold, XA_READY=xa_ready,
        EARLY=xa_ready and plan.linear_expand_early and num_slots <= slot_group(num_slots, block_r),
        PDL=pdl, LINE=line,
        LINES=triton.next_power_of_2(triton.cdiv(k_chunk, line)), ROUTE=route is not None, ROUTE_T=r.rows,
        BLOCK_E=r.block_e, TOP_K=rt.top_k, K_PAD=triton.next_power_of_2(rt.top_k), RENORMALIZE=rt.renormalize,
        WEIGHT_FIRST=rt.weight_first, NORM_K=min(triton.next_power_of_2(out_dim), max(16, 8192 // r.rows)),
        ROUTE_LINES=triton.next_power_of_2(triton.cdiv(block_n, line)), ROUTE_DIM=out_dim,
        ROUTE_TILES=n_tiles if route is not None else 1, NORM=norm is not None,
        NORM_RES=xn.residual is not None, NORM_WF=xn.weight_first,
        NORM_CHUNK=min(triton.next_power_of_2(in_dim), 2048),
        num_warps=tiles.warps, num_stages=tiles.stages, launch_pdl=pdl,
    )  # fmt: skip
    if route is None:
        return y
    return r.weights, r.ids, r.h, r.s


class _RouteOutputs(NamedTuple):
    """What a launch's norm and router write (placeholders without them, never written)."""

    logits: torch.Tensor  # partials [tiles, rows, block_e] fp32
    squares: torch.Tensor  # partials [tiles, rows] fp32
    weights: torch.Tensor
    ids: torch.Tensor
    h: torch.Tensor
    s: torch.Tensor
    rows: int  # the partials' rows: the tokens, to a power of two
    block_e: int


def _route_outputs(x: torch.Tensor, out_dim: int, n_tiles: int, route: NormRouter | None) -> _RouteOutputs:
    """A launch's norm and router outputs allocated (x's rows; h and s [T, out]) and partial sums."""
    if route is None:
        return _RouteOutputs(x, x, x, x, x, x, 1, 16)
    num_tokens, dev = x.shape[0], x.device
    rows, block_e = triton.next_power_of_2(num_tokens), max(16, triton.next_power_of_2(route.weight.shape[0]))
    w_dtype = torch.float32 if route.fp32_weights else x.dtype
    return _RouteOutputs(
        torch.empty(n_tiles, rows, block_e, dtype=torch.float32, device=dev),
        torch.empty(n_tiles, rows, dtype=torch.float32, device=dev),
        torch.empty(num_tokens, route.top_k, dtype=w_dtype, device=dev),
        torch.empty(num_tokens, route.top_k, dtype=torch.int32, device=dev),
        torch.empty(num_tokens, out_dim, dtype=x.dtype, device=dev),
        torch.empty(num_tokens, out_dim, dtype=x.dtype, device=dev), rows, block_e,
    )  # fmt: skip


def linear_layer(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: DenseLora | None,
    token_slot: torch.Tensor | None,
    sizes: tuple[int, ...],
    one_launch: bool,
    plan: KernelPlan = TUNED,
    scales: RowScales | None = None,
    xa: torch.Tensor | None = None,
) -> torch.Tensor:
    """`ops.linear` (xa: the LoRA shrink computed before, where `shrink_chunk` or `takes_shrink` allowed it):
    one launch (`linear`) where allowed (`one_launch`: 16-bit tensors, or the interpreter) and it `fits`,
    whether or not the layer has slots or the batch adapters, so that a base row gets the same bits in any
    batch and on a server without adapters; otherwise cuBLAS (an FP8 weight: the FP8 GEMM below
    `fp8_copy_tokens`, a 16-bit copy for cuBLAS from there) and the dense LoRA kernels (the expand alone
    from a given xa)."""
    lanes = 0 if lora is None else lora.a.shape[1] * lora.a.shape[2]
    if one_launch and fits(x, lanes, sizes, plan, scales is not None):
        args = None if lora is None or token_slot is None else (lora.a, lora.b, lora.rank, token_slot)
        return linear(x, weight, bias, args, sizes, plan, scales, xa if args is not None else None)
    if scales is None:
        y = F.linear(x, weight, bias)
    elif x.shape[0] < plan.fp8_copy_tokens:
        y = fp8_matmul(x, weight, scales, bias, plan)
    else:
        y = F.linear(x, dequantize(weight, scales, x.dtype), bias)
    if lora is not None and token_slot is not None:
        if len(sizes) == 1 and xa is None:
            add_lora(y, x, lora.a[:, 0], lora.b, token_slot, lora.rank[:, 0], plan)
        else:
            add_lora_parts(y, x, lora.a, lora.b, token_slot, sizes, lora.rank, plan, xa)
    return y


def norm_linear_layer(
    x: torch.Tensor,
    norm: InputNorm,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: DenseLora | None,
    token_slot: torch.Tensor | None,
    sizes: tuple[int, ...],
    one_launch: bool,
    plan: KernelPlan = TUNED,
    scales: RowScales | None = None,
    xa: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.norm_linear`: the norm inside the layer's one launch where `norms_input` says (`norm_linear`),
    else `rms_norm`, then `linear_layer`."""
    lanes = 0 if lora is None else lora.a.shape[1] * lora.a.shape[2]
    if norms_input(x, norm, lanes, sizes, one_launch, plan, scales is not None):
        args = None if lora is None or token_slot is None else (lora.a, lora.b, lora.rank, token_slot)
        return norm_linear(x, norm, weight, bias, args, sizes, plan, scales, xa if args is not None else None)
    out = rms_norm(x, norm.weight, norm.eps, norm.residual, norm.weight_first)
    h, s = (out, x) if isinstance(out, torch.Tensor) else out
    return linear_layer(h, weight, bias, lora, token_slot, sizes, one_launch, plan, scales, xa), s
