"""PyTorch twin of the router's top-k: softmax over the experts in fp32, the k largest, renormalised."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, fp32_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (weights [T, k], global expert ids [T, k] int32), choices in decreasing weight.

    router_logits [T, E]. Semantics: p = softmax(logits in fp32) over the E experts; the k largest p and
    their ids; weights divided by their sum if `renormalize`; weights cast back to the logits' dtype
    unless `fp32_weights` (Mixtral keeps them in fp32).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if not fp32_weights:
        weights = weights.to(router_logits.dtype)
    return weights, ids.to(torch.int32)


def router(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool, fp32_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's linear layer, then `route`: route(x @ weight^T in x's dtype, ...).

    x [T, H]; weight [E, H] (the router's rows, no bias). Kernels may sum the products in another order
    than F.linear (the logits then differ in their last bit at most).
    """
    return route(F.linear(x, weight), top_k, renormalize, fp32_weights)
