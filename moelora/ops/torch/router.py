"""PyTorch twin of the router's top-k: softmax over the experts in fp32, the k largest, renormalised;
the router after the norm, and after a linear layer and the norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelora.ops.dense_lora import DenseLora
from moelora.ops.fp8 import RowScales
from moelora.ops.norm_router import NormRouter
from moelora.ops.torch.lora import linear
from moelora.ops.torch.norm import rms_norm


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The post-attention norm and the router -> (weights [T, k], ids [T, k], h [T, H], s [T, H]).

    Semantics: h, s = rms_norm(x, norm_weight, eps, residual, weight_first) (the MoE's input and the next
    residual), then weights, ids = router(h, weight, top_k, renormalize, fp32_weights). Kernels may sum
    the squares and the products in another order (h, then the logits, differ in their last bit at most).
    """
    h, s = rms_norm(x, norm_weight, eps, residual, weight_first)
    weights, ids = router(h, weight, top_k, renormalize, fp32_weights)
    return weights, ids, h, s


def linear_norm_router(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: DenseLora | None,
    token_slot: torch.Tensor | None,
    scales: RowScales | None,
    route: NormRouter,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear layer with one output part, then the norm and the router after it -> (weights, ids, h, s).

    Semantics: y = linear(x, weight, bias, lora, token_slot, (out,), scales), then
    add_norm_router(y, *route). Kernels may compute the logits from the sums s before the norm: the norm
    weight times s, multiplied by the router's rows and summed, then times the norm's scale (logits are
    linear in h), so they miss h's rounding; they differ from the router's on h in their last bits.
    """
    y = linear(x, weight, bias, lora, token_slot, (weight.shape[0],), scales)
    return add_norm_router(y, *route)


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
    """DeepSeek-V3's and GLM-4.5's choice -> (weights [T, k] fp32, global expert ids [T, k] int32).

    x [T, H]; weight [E, H]; bias [E] fp32 (e_score_correction_bias). Semantics, in fp32 as transformers:
    s = sigmoid(x @ weight^T); c = s + bias (for the choice only); with groups > 1 the experts form
    `groups` equal groups, a group scores the sum of its two largest c, and only the experts of the
    `topk_groups` best groups may be chosen; the ids are the top_k largest c (largest first); the
    weights are their s, divided by (their sum + 1e-20) if `renormalize`, times `scaling`.
    """
    scores = F.linear(x.float(), weight.float()).sigmoid()  # [T, E]
    choice = scores + bias.float()
    if groups > 1:
        group_scores = choice.view(choice.shape[0], groups, -1).topk(2, dim=-1).values.sum(dim=-1)
        choice = _within_best_groups(choice, group_scores, topk_groups, float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids.to(torch.int32)


def softmax_grouped_router(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, groups: int, topk_groups: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2's choice -> (weights [T, k] fp32, global expert ids [T, k] int32).

    x [T, H]; weight [E, H]. Semantics, in fp32 as transformers: p = softmax(x @ weight^T); with
    groups > 1 the experts form `groups` equal groups, a group scores its largest p, and only the experts
    of the `topk_groups` best groups may be chosen ("group_limited_greedy"; "greedy" is groups = 1);
    the ids are the top_k largest p (largest first), the weights their p times `scaling` (not
    renormalised).
    """
    probs = F.linear(x.float(), weight.float()).softmax(dim=-1)  # [T, E]
    choice = probs
    if groups > 1:
        group_scores = probs.view(probs.shape[0], groups, -1).amax(dim=-1)
        choice = _within_best_groups(probs, group_scores, topk_groups, 0.0)
    weights, ids = choice.topk(top_k, dim=-1)
    return weights * scaling, ids.to(torch.int32)


def _within_best_groups(
    scores: torch.Tensor, group_scores: torch.Tensor, topk_groups: int, fill: float
) -> torch.Tensor:
    """scores [T, E] with every expert outside the `topk_groups` best of its token's groups (group_scores
    [T, G], the experts in G equal groups in order) set to `fill`."""
    best = group_scores.topk(topk_groups, dim=-1).indices  # [T, topk_groups]
    allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [T, G]
    grouped = scores.view(*group_scores.shape, -1)
    return grouped.masked_fill(~allowed[:, :, None], fill).view(scores.shape)
