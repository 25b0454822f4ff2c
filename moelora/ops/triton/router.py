"""The router's top-k in one launch: softmax over the experts in fp32, k rounds of argmax, renormalise."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    x = tl.where(e_ok, x.to(tl.float32), float("-inf"))  # lanes past the experts never win
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    # k rounds: the largest remaining probability (the lowest id among equals), then take it out.
    kk = tl.arange(0, K_PAD)
    weights = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)
        arg = tl.argmax(p, axis=1)
        weights = tl.where(kk[None, :] == j, best[:, None], weights)
        ids = tl.where(kk[None, :] == j, arg[:, None].to(tl.int32), ids)
        p = tl.where(e[None, :] == arg[:, None], -1.0, p)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=1)[:, None]
    out = t[:, None].to(tl.int64) * TOP_K + kk[None, :]
    out_mask = t_ok[:, None] & (kk < TOP_K)[None, :]
    tl.store(w_ptr + out, weights.to(w_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out, ids, mask=out_mask)


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
