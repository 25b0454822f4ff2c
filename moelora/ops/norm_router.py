"""`NormRouter`: the RMSNorm (with its residual add) and the softmax router that follow a linear layer,
the argument that lets one launch run all three (`ops.linear_norm_router`)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class NormRouter(NamedTuple):
    """h, s = rms_norm(y, norm_weight, eps, residual, weight_first), then the router's (weights, ids) of
    h (`ops.add_norm_router`'s arguments after its input y)."""

    residual: torch.Tensor  # [T, H], y's dtype
    norm_weight: torch.Tensor  # [H]
    eps: float
    weight_first: bool
    weight: torch.Tensor  # the router's [E, H]
    top_k: int
    renormalize: bool
    fp32_weights: bool
