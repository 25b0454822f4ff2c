"""The router's top-k in one launch: softmax over the experts in fp32, k rounds of argmax, renormalise; for
a few tokens the router's linear layer and its top-k in one launch (`router`); and DeepSeek's and GLM's
group-limited choices after their fp32 linear layer in one launch (`grouped_router`,
`softmax_grouped_router`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moelora.ops.plan import TUNED
from moelora.ops.triton.common import after_previous, dependent_launch, prefetch_l2
from moelora.ops.triton.counters import last_one, launch_counters
from moelora.ops.triton.norm import rms_norm


@triton.jit
def _top_k(x, t, t_ok, e, e_ok, w_ptr, ids_ptr,
           TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr):  # fmt: skip
    """Store the top-k of softmax(x) of rows t (x [BLOCK_T, BLOCK_E] logits in their dtype, e_ok [1, E]):
    weights (renormalised if asked) and ids, choices in decreasing weight."""
    x = tl.where(e_ok, x.to(tl.float32), float("-inf"))  # lanes past the experts never win
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    # k rounds: the largest remaining probability (the lowest id among equals), then take it out. A
    # probability's bits (>= 0: ordered as integers) above its lane's reversed id make one key, so one
    # max a round finds both (a max and an argmax are three reductions across the program's threads).
    lanes = x.shape[1]
    key = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (lanes - 1 - e)[None, :].to(tl.int64)
    kk = tl.arange(0, K_PAD)
    weights = tl.zeros([x.shape[0], K_PAD], dtype=tl.float32)
    ids = tl.zeros([x.shape[0], K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        top = tl.max(key, axis=1)
        best = (top >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        arg = lanes - 1 - (top & 0xFFFFFFFF).to(tl.int32)
        weights = tl.where(kk[None, :] == j, best[:, None], weights)
        ids = tl.where(kk[None, :] == j, arg[:, None], ids)
        key = tl.where(e[None, :] == arg[:, None], -1, key)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=1)[:, None]
    out = t[:, None].to(tl.int64) * TOP_K + kk[None, :]
    out_mask = t_ok[:, None] & (kk < TOP_K)[None, :]
    tl.store(w_ptr + out, weights.to(w_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out, ids, mask=out_mask)


@triton.jit
def _route_kernel(
    logits_ptr, w_ptr, ids_ptr, num_tokens, num_experts, s_t,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    e = tl.arange(0, BLOCK_E)
    e_ok = (e < num_experts)[None, :]
    x = tl.load(logits_ptr + t[:, None].to(tl.int64) * s_t + e[None, :], mask=t_ok[:, None] & e_ok, other=0.0)
    _top_k(x, t, t_ok, e, e_ok, w_ptr, ids_ptr, TOP_K, K_PAD, RENORMALIZE)


@triton.jit
def _row_sums(x_ptr, r_ptr, t, cols, mask, sx_t, sx_k, sr_t):
    """s = x + residual of rows t over `cols`, rounded to x's dtype (as `rms_norm`'s add)."""
    x = tl.load(x_ptr + t[:, None] * sx_t + cols[None, :] * sx_k, mask=mask, other=0.0)
    r = tl.load(r_ptr + t[:, None] * sr_t + cols[None, :], mask=mask, other=0.0)
    return (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)


@triton.jit
def _row_rstd(x_ptr, r_ptr, t, t_ok, sx_t, sx_k, sr_t, eps, IN_DIM: tl.constexpr, NORM_K: tl.constexpr):
    """rsqrt(mean(s^2) + eps) [BLOCK_T] of rows t's whole sums s = x + residual (fp32)."""
    sum_sq = tl.zeros(t.shape, dtype=tl.float32)
    for c0 in range(0, IN_DIM, NORM_K):
        cols = c0 + tl.arange(0, NORM_K)
        sf = _row_sums(x_ptr, r_ptr, t, cols, t_ok[:, None] & (cols < IN_DIM)[None, :], sx_t, sx_k, sr_t)
        sf = sf.to(tl.float32)
        sum_sq += tl.sum(sf * sf, axis=1)
    return tl.rsqrt(sum_sq / IN_DIM + eps)


@triton.jit
def _normed_step(x_ptr, r_ptr, nw_ptr, h_ptr, s_ptr, t, cols, mask, rstd, sx_t, sx_k, sr_t,
                 IN_DIM: tl.constexpr, WEIGHT_FIRST: tl.constexpr):  # fmt: skip
    """h = RMSNorm(x + residual) of rows t over `cols` in x's dtype, as `rms_norm` computes it (the cast
    to x's dtype before the weight unless WEIGHT_FIRST); h and the sums stored (h and s: [T, IN_DIM])."""
    s = _row_sums(x_ptr, r_ptr, t, cols, mask, sx_t, sx_k, sr_t)
    out = t[:, None].to(tl.int64) * IN_DIM + cols[None, :]
    tl.store(s_ptr + out, s, mask=mask)
    h = _normed(s, rstd, nw_ptr, cols, IN_DIM, WEIGHT_FIRST)
    tl.store(h_ptr + out, h, mask=mask)
    return h


@triton.jit
def _normed(s, rstd, nw_ptr, cols, IN_DIM: tl.constexpr, WEIGHT_FIRST: tl.constexpr):
    """RMSNorm of the sums s [T, cols] given their rows' scale rstd [T], in s's dtype, as `rms_norm`
    computes it (the cast to s's dtype before the weight unless WEIGHT_FIRST)."""
    normed = s.to(tl.float32) * rstd[:, None]
    if not WEIGHT_FIRST:
        normed = normed.to(s.dtype).to(tl.float32)
    w = tl.load(nw_ptr + cols, mask=cols < IN_DIM, other=0.0).to(tl.float32)
    return (w[None, :] * normed).to(s.dtype)


@triton.jit
def _router_kernel(
    x_ptr, wr_ptr, part_ptr, w_ptr, ids_ptr, count_ptr, r_ptr, nw_ptr, h_ptr, s_ptr, num_tokens, num_experts,
    sx_t, sx_k, swr_e, swr_k, sr_t, eps,
    IN_DIM: tl.constexpr, SPLITS: tl.constexpr, K_CHUNK: tl.constexpr, TOP_K: tl.constexpr,
    K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, NORM: tl.constexpr,
    WEIGHT_FIRST: tl.constexpr, NORM_K: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr,
    LINES: tl.constexpr,
):  # fmt: skip
    """Program `split`: the logits' fp32 partial over its K_CHUNK input columns (a tensor-core dot for 16
    token rows, or products summed in registers for one token); the last to finish adds the partials up
    in split order (their loads all in flight at once), rounds the logits to x's dtype (as the linear
    layer's output) and takes the top-k.
    With NORM the router's input is RMSNorm(x + residual) (`_normed_step`): every program finds the rows'
    scale from their whole sums (rows of [IN_DIM] 16-bit values: a few KB each from L2), then normalises
    only its own columns and stores them, and their sums s, into h and s (the MoE's input, the next
    residual)."""
    split = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    e = tl.arange(0, BLOCK_E)
    e_ok = (e < num_experts)[None, :]
    kk = split * K_CHUNK + tl.arange(0, BLOCK_K)
    if PDL:  # while the previous kernel ends: this program's columns of the router's weights into L2
        cols = tl.minimum(split * K_CHUNK + tl.arange(0, LINES) * LINE, IN_DIM - 1)  # one a cache line
        prefetch_l2(wr_ptr + tl.minimum(e, num_experts - 1)[:, None] * swr_e + cols[None, :] * swr_k)
    after_previous(PDL)
    rstd = tl.zeros([BLOCK_T], dtype=tl.float32)
    if NORM:
        rstd = _row_rstd(x_ptr, r_ptr, t, t_ok, sx_t, sx_k, sr_t, eps, IN_DIM, NORM_K)
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for k0 in range(0, K_CHUNK, BLOCK_K):
        k_ok = kk + k0 < IN_DIM
        x_mask = t_ok[:, None] & k_ok[None, :]
        if NORM:
            xk = _normed_step(
                x_ptr, r_ptr, nw_ptr, h_ptr, s_ptr, t, kk + k0, x_mask, rstd, sx_t, sx_k, sr_t, IN_DIM,
                WEIGHT_FIRST,
            )  # fmt: skip
        else:
            xk = tl.load(x_ptr + t[:, None] * sx_t + (kk + k0)[None, :] * sx_k, mask=x_mask, other=0.0)
        if DOT:
            w_mask = k_ok[:, None] & e_ok
            wk = tl.load(wr_ptr + e[None, :] * swr_e + (kk + k0)[:, None] * swr_k, mask=w_mask, other=0.0)
            acc = tl.dot(xk, wk, acc, input_precision=PRECISION)
        else:  # wk [E, K]: products summed in registers
            w_mask = (e < num_experts)[:, None] & k_ok[None, :]
            wk = tl.load(wr_ptr + e[:, None] * swr_e + (kk + k0)[None, :] * swr_k, mask=w_mask, other=0.0)
            acc += tl.sum(xk.to(tl.float32)[:, None, :] * wk.to(tl.float32)[None, :, :], axis=2)
    rows = t[:, None] * BLOCK_E + e[None, :]
    tl.store(part_ptr + split * BLOCK_T * BLOCK_E + rows, acc)
    if last_one(count_ptr, SPLITS):
        logits = tl.load(part_ptr + rows, cache_modifier=".cg")
        for i in tl.static_range(1, SPLITS):
            logits += tl.load(part_ptr + i * BLOCK_T * BLOCK_E + rows, cache_modifier=".cg")
        logits = logits.to(x_ptr.dtype.element_ty)
        _top_k(logits, t, t_ok, e, e_ok, w_ptr, ids_ptr, TOP_K, K_PAD, RENORMALIZE)


@triton.jit
def route_tile(acc, t, n, mask, tile, res_ptr, nw_ptr, wr_ptr, rp_ptr, rs_ptr, s_ptr, num_tokens, num_experts,
               swr_e, swr_k, IN_DIM: tl.constexpr, ROUTE_T: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
    """A column tile's part of the norm and the router after a linear layer (`linear.linear_norm_router`):
    acc [BLOCK_M, BLOCK_N] fp32, the layer's output at rows t and columns n (mask: both in range). Stores
    the sums s = output (rounded to the residual's dtype) + residual, and this tile's fp32 partials of
    the rows' sums of squares (rs [tiles, ROUTE_T]) and of their logits before the norm's scale,
    sum over n of router weight[e, n] * norm weight[n] * s[n] (rp [tiles, ROUTE_T, BLOCK_E]): logits are
    linear in the normed input, so the scale, known once every tile is in, multiplies their sum."""
    out = t[:, None].to(tl.int64) * IN_DIM + n[None, :]
    n_ok = n < IN_DIM
    r = tl.load(res_ptr + out, mask=mask, other=0.0)
    e = tl.arange(0, BLOCK_E)
    wr = tl.load(wr_ptr + e[None, :] * swr_e + n[:, None] * swr_k,
                 mask=n_ok[:, None] & (e < num_experts)[None, :], other=0.0)  # fmt: skip
    g = tl.load(nw_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    s = (acc.to(r.dtype).to(tl.float32) + r.to(tl.float32)).to(r.dtype)
    tl.store(s_ptr + out, s, mask=mask)
    sf = tl.where(mask, s.to(tl.float32), 0.0)
    part = tl.dot(sf * g[None, :], wr.to(tl.float32), input_precision="tf32")
    t_ok = t < num_tokens
    tl.store(rs_ptr + tile * ROUTE_T + t, tl.sum(sf * sf, axis=1), mask=t_ok)
    rows = (tile * ROUTE_T + t[:, None]) * BLOCK_E + e[None, :]
    tl.store(rp_ptr + rows, part, mask=t_ok[:, None])


@triton.jit
def route_last(rp_ptr, rs_ptr, s_ptr, nw_ptr, h_ptr, w_ptr, ids_ptr, num_tokens, num_experts, eps,
               IN_DIM: tl.constexpr, TILES: tl.constexpr, ROUTE_T: tl.constexpr, BLOCK_E: tl.constexpr,
               TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
               WEIGHT_FIRST: tl.constexpr, NORM_K: tl.constexpr):  # fmt: skip
    """The last tile of `route_tile`'s launch to finish: the partials added up in tile order (their loads
    all in flight at once), the rows' norm scale, the logits (rounded to the sums' dtype, as the router
    layer's output) and their top-k; then the normed input h from the stored sums, as `rms_norm`."""
    t = tl.arange(0, ROUTE_T)
    t_ok = t < num_tokens
    e = tl.arange(0, BLOCK_E)
    rows = t[:, None] * BLOCK_E + e[None, :]
    logits = tl.load(rp_ptr + rows, mask=t_ok[:, None], other=0.0, cache_modifier=".cg")
    sum_sq = tl.load(rs_ptr + t, mask=t_ok, other=0.0, cache_modifier=".cg")
    for i in tl.static_range(1, TILES):
        logits += tl.load(rp_ptr + i * ROUTE_T * BLOCK_E + rows, mask=t_ok[:, None], other=0.0,
                          cache_modifier=".cg")  # fmt: skip
        sum_sq += tl.load(rs_ptr + i * ROUTE_T + t, mask=t_ok, other=0.0, cache_modifier=".cg")
    rstd = tl.rsqrt(sum_sq / IN_DIM + eps)
    logits = (logits * rstd[:, None]).to(s_ptr.dtype.element_ty)
    _top_k(logits, t, t_ok, e, (e < num_experts)[None, :], w_ptr, ids_ptr, TOP_K, K_PAD, RENORMALIZE)
    for c0 in range(0, IN_DIM, NORM_K):
        cols = c0 + tl.arange(0, NORM_K)
        mask = t_ok[:, None] & (cols < IN_DIM)[None, :]
        out = t[:, None].to(tl.int64) * IN_DIM + cols[None, :]
        s = tl.load(s_ptr + out, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(h_ptr + out, _normed(s, rstd, nw_ptr, cols, IN_DIM, WEIGHT_FIRST), mask=mask)


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, fp32_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and Semantics as `moelora.ops.torch.router.route`."""
    num_tokens, num_experts = router_logits.shape
    if not 0 < top_k <= num_experts:
        raise ValueError(f"route: top_k {top_k} must be in [1, {num_experts}] (the router's experts)")
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    dtype = torch.float32 if fp32_weights else router_logits.dtype
    weights = torch.empty(num_tokens, top_k, dtype=dtype, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(16, 4096 // block_e))
    _route_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits, weights, ids, num_tokens, num_experts, logits.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), RENORMALIZE=renormalize,
        BLOCK_T=block_t, BLOCK_E=block_e,
    )  # fmt: skip
    return weights, ids


ROUTER_TOKENS = 16  # at most this many tokens take the one-launch router; more: cuBLAS, then `route`
# More tokens than this: the partial logits by a tensor-core dot over 16 token rows. One token: products
# summed in registers, 64 input columns a program (H200, 128 experts x 2,048 inputs, 256 layers' weights in
# a CUDA graph: 9.35 -> 7.8 us a call, the ids equal to the twin's; two tokens that way: 10.9 vs 9.6 us).
_DOT_TOKENS = 1


def router(
    x: torch.Tensor,
    weight: torch.Tensor,
    top_k: int,
    renormalize: bool,
    fp32_weights: bool,
    k_chunk: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    pdl: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and Semantics as `moelora.ops.torch.router.router`: one launch for a few tokens in
    16 bits (the logits' partial sums split along the input, the last split taking the top-k), else
    cuBLAS and `route`. `k_chunk` (input columns per program), `block_k` (per step), `num_warps`: tiles
    for benchmarks; None: the plan's (`KernelPlan.router_k_chunk`, `router_warps`). `pdl`: launched as
    a programmatic dependent (`common.dependent_launch`; None: the plan's `pdl`)."""
    if not _one_launch(x, weight):
        return route(F.linear(x, weight), top_k, renormalize, fp32_weights)
    weights, ids, _, _ = _launch(
        x, weight, top_k, renormalize, fp32_weights, None, k_chunk, block_k, num_warps, pdl
    )
    return weights, ids


def add_norm_router(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight_first: bool,
    weight: torch.Tensor,
    top_k: int,
    renormalize: bool,
    fp32_weights: bool,
    pdl: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same signature and Semantics as `moelora.ops.torch.router.add_norm_router`: for a few tokens the
    residual add, the RMSNorm, the router's linear layer and its top-k in one launch (`_router_kernel`
    with NORM); else `rms_norm`, then `router`."""
    if residual.shape != x.shape or residual.dtype != x.dtype or norm_weight.shape != (x.shape[-1],):
        raise ValueError(
            f"add_norm_router: x {tuple(x.shape)} {x.dtype}, residual {tuple(residual.shape)} "
            f"{residual.dtype}, norm weight {tuple(norm_weight.shape)}: residual like x, the weight [H]"
        )
    h_dtype = x.dtype if weight_first else torch.promote_types(norm_weight.dtype, x.dtype)
    if h_dtype != x.dtype or not _one_launch(x, weight) or residual.stride(-1) != 1:
        h, s = rms_norm(x, norm_weight, eps, residual, weight_first)
        return *router(h, weight, top_k, renormalize, fp32_weights, pdl=pdl), h, s
    norm = (residual, norm_weight.contiguous(), eps, weight_first)
    return _launch(x, weight, top_k, renormalize, fp32_weights, norm, None, None, None, pdl)


def _one_launch(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the router of x [T, H] takes the one launch: a few tokens, 16 bits, at most 256 experts."""
    return (
        x.shape[0] <= ROUTER_TOKENS
        and x.element_size() == 2
        and weight.dtype == x.dtype
        and weight.shape[0] <= 256
    )


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    top_k: int,
    renormalize: bool,
    fp32_weights: bool,
    norm: tuple[torch.Tensor, torch.Tensor, float, bool] | None,
    k_chunk: int | None,
    block_k: int | None,
    num_warps: int | None,
    pdl: bool | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one-launch router -> (weights, ids, h, s); with `norm` = (residual, norm weight, eps,
    weight_first) its input is RMSNorm(x + residual), returned as h with the sums s (else h = s = x)."""
    num_tokens, in_dim = x.shape
    num_experts = weight.shape[0]
    if not 0 < top_k <= num_experts:
        raise ValueError(f"router: top_k {top_k} must be in [1, {num_experts}] (the router's experts)")
    dot = num_tokens > _DOT_TOKENS
    block_t = 16 if dot else triton.next_power_of_2(num_tokens)
    block_e = max(16, triton.next_power_of_2(num_experts))
    if block_k is None:  # the non-dot step holds [T, E, K] products in registers: 8,192 at most
        block_k = 128 if dot else max(16, 8192 // (block_t * block_e))
    block_k = min(block_k, max(16, triton.next_power_of_2(in_dim)))
    k_chunk = max(block_k, k_chunk or (128 if dot else TUNED.router_k_chunk))
    splits = triton.cdiv(in_dim, k_chunk)
    part = torch.empty(splits, block_t, block_e, dtype=torch.float32, device=x.device)
    weights = torch.empty(
        num_tokens, top_k, dtype=torch.float32 if fp32_weights else x.dtype, device=x.device
    )
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=x.device)
    h = s = x
    residual, norm_weight, eps, weight_first = x, x, 0.0, False
    if norm is not None:
        residual, norm_weight, eps, weight_first = norm
        h, s = torch.empty(num_tokens, in_dim, dtype=x.dtype, device=x.device), torch.empty_like(h)
    pdl = dependent_launch(x.device, TUNED.pdl_for("router") if pdl is None else pdl)
    line = 128 // weight.element_size()  # weights a 128-byte cache line holds
    _router_kernel[(splits,)](
        x, weight, part, weights, ids, launch_counters(x.device, 1), residual, norm_weight, h, s,
        num_tokens, num_experts, *x.stride(), *weight.stride(), residual.stride(0), eps,
        IN_DIM=in_dim, SPLITS=splits, K_CHUNK=k_chunk, TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k),
        RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k, DOT=dot,
        PRECISION="tf32", NORM=norm is not None, WEIGHT_FIRST=weight_first,
        NORM_K=min(triton.next_power_of_2(in_dim), max(16, 8192 // block_t)), PDL=pdl, LINE=line,
        LINES=triton.next_power_of_2(triton.cdiv(k_chunk, line)), num_warps=num_warps or TUNED.router_warps,
        launch_pdl=pdl,
    )  # fmt: skip
    return weights, ids, h, s


@triton.jit
def _grouped_route_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, num_tokens, num_experts, per_group, s_t, scaling,
    SIGMOID: tl.constexpr, GROUPS: tl.constexpr, G_PAD: tl.constexpr, TOPK_GROUPS: tl.constexpr,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """SIGMOID: scores s = sigmoid(logits), choice c = s + bias, a group scores the sum of its two largest
    c; else (DeepSeek-V2) s = c = softmax(logits), a group scores its largest. Only the TOPK_GROUPS best
    groups' experts may be chosen (the others' c set to -inf, or 0 after a softmax, as the twins); then k
    rounds of argmax over c (the lowest id among equals), the weights the chosen s."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    e = tl.arange(0, BLOCK_E)
    e_ok = (e < num_experts)[None, :]
    x = tl.load(logits_ptr + t[:, None].to(tl.int64) * s_t + e[None, :], mask=t_ok[:, None] & e_ok, other=0.0)
    x = x.to(tl.float32)
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-x))
        c = s + tl.load(bias_ptr + e, mask=e < num_experts, other=0.0).to(tl.float32)[None, :]
    else:
        x = tl.where(e_ok, x, float("-inf"))
        p = tl.exp(x - tl.max(x, axis=1)[:, None])
        s = p / tl.sum(p, axis=1)[:, None]
        c = s
    c = tl.where(e_ok, c, float("-inf"))  # lanes past the experts never win
    if GROUPS > 1:
        group = e // per_group
        g = tl.arange(0, G_PAD)
        group_score = tl.full([BLOCK_T, G_PAD], float("-inf"), dtype=tl.float32)
        for i in tl.static_range(GROUPS):
            in_group = (group == i)[None, :] & e_ok
            cg = tl.where(in_group, c, float("-inf"))
            score = tl.max(cg, axis=1)
            if SIGMOID:  # plus the group's second largest
                first = tl.argmax(cg, axis=1)
                score += tl.max(tl.where(e[None, :] == first[:, None], float("-inf"), cg), axis=1)
            group_score = tl.where(g[None, :] == i, score[:, None], group_score)
        allowed = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUPS):
            best = tl.argmax(group_score, axis=1)
            allowed |= group[None, :] == best[:, None]
            group_score = tl.where(g[None, :] == best[:, None], float("-inf"), group_score)
        c = tl.where(allowed & e_ok, c, float("-inf") if SIGMOID else 0.0)
        c = tl.where(e_ok, c, float("-inf"))
    kk = tl.arange(0, K_PAD)
    weights = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        arg = tl.argmax(c, axis=1)
        hit = e[None, :] == arg[:, None]
        chosen = tl.sum(tl.where(hit, s, 0.0), axis=1)
        if not SIGMOID:
            chosen = tl.sum(tl.where(hit, c, 0.0), axis=1)  # (0 for an expert outside the groups)
        weights = tl.where(kk[None, :] == j, chosen[:, None], weights)
        ids = tl.where(kk[None, :] == j, arg[:, None].to(tl.int32), ids)
        c = tl.where(hit, float("-inf"), c)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    out = t[:, None].to(tl.int64) * TOP_K + kk[None, :]
    out_mask = t_ok[:, None] & (kk < TOP_K)[None, :]
    tl.store(w_ptr + out, weights * scaling, mask=out_mask)
    tl.store(ids_ptr + out, ids, mask=out_mask)


def _grouped_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = logits.shape
    if not 0 < top_k <= num_experts or num_experts % groups or not 0 < topk_groups <= groups:
        raise ValueError(
            f"grouped router: top_k {top_k} of {num_experts} experts in {groups} groups, {topk_groups} of "
            "them chosen: need 0 < top_k <= experts, groups dividing the experts, 0 < topk_groups <= groups"
        )
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(16, 4096 // block_e))
    _grouped_route_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits, logits if bias is None else bias, weights, ids, num_tokens, num_experts,
        num_experts // groups, logits.stride(0), scaling,
        SIGMOID=bias is not None, GROUPS=groups, G_PAD=triton.next_power_of_2(groups),
        TOPK_GROUPS=topk_groups, TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), RENORMALIZE=renormalize,
        BLOCK_T=block_t, BLOCK_E=block_e,
    )  # fmt: skip
    return weights, ids


def grouped_router(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and Semantics as `moelora.ops.torch.router.grouped_router`: the fp32 linear layer
    (cuBLAS), then the choice in one launch."""
    logits = F.linear(x.float(), weight.float())
    return _grouped_route(logits, bias.float().contiguous(), top_k, groups, topk_groups, renormalize, scaling)


def softmax_grouped_router(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, groups: int, topk_groups: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and Semantics as `moelora.ops.torch.router.softmax_grouped_router`: the fp32 linear
    layer (cuBLAS), then the choice in one launch."""
    logits = F.linear(x.float(), weight.float())
    return _grouped_route(logits, None, top_k, groups, topk_groups, False, scaling)
