"""PyTorch twin of RMSNorm, optionally fused with the residual add before it (Hugging Face's math)."""

from __future__ import annotations

from typing import overload

import torch


@overload
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: None = None, weight_first: bool = False
) -> torch.Tensor: ...


@overload
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor, weight_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor]: ...


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    weight_first: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension, after adding `residual` when one is given.

    x [..., N]; weight [N]; residual None or like x (same shape and dtype).
    Semantics: s = x + residual in x's dtype (or s = x); with sf = s in fp32,
    n = (sf * rsqrt(mean(sf^2) + eps)) cast to x's dtype, y = weight * n (in the promoted dtype of
    weight and x). With `weight_first` (GPT-OSS's norm) the weight multiplies the fp32 row before the
    one cast: y = (weight * (sf * rsqrt(...))) cast to x's dtype. Returns y, or (y, s) when residual is
    given (s is the next layer's residual).
    """
    s = x if residual is None else x + residual
    sf = s.float()
    sf = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    y = (weight.float() * sf).to(s.dtype) if weight_first else weight * sf.to(s.dtype)
    return y if residual is None else (y, s)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen3NextRMSNormGated: `rms_norm(x, weight, eps)` (the weight after the cast to x's
    dtype) times silu(gate) computed in fp32, the product in fp32, rounded once to x's dtype.

    x, gate [..., N] (same shape); weight [N]."""
    return (rms_norm(x, weight, eps) * torch.nn.functional.silu(gate.float())).to(x.dtype)
