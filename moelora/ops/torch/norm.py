"""PyTorch twin of RMSNorm, optionally fused with the residual add before it (Hugging Face's math)."""

from __future__ import annotations

from typing import overload

import torch

from moelora.ops.dense_lora import DenseLora


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


def add_norm_shrink(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor,
    weight_first: bool,
    lora: DenseLora,
    token_slot: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rms_norm(x, weight, eps, residual, weight_first)` = (y, s), and the LoRA shrink of the linear layer
    that takes y, computed by the norm's launch on a GPU so that the layer's launch need not
    (`ops.linear`'s `xa`).

    x, residual [T, N]; lora: the layer's slots (a [S, P, R, N], rank [S, P]); token_slot [T]; chunk: input
    columns a part of the shrink sums. Returns (y, s, xa): xa [ceil(N / chunk), T, P * R] fp32, xa[c, t,
    p * R + r] = y[t, cols_c] @ a[s_t, p, r, cols_c] over chunk c's columns, lanes at or above the slot's
    rank of part p read as zero; the rows of a token without a slot (ids outside [0, S)) are zero here
    (the kernel leaves them unwritten: no reader takes them)."""
    y, s = rms_norm(x, weight, eps, residual, weight_first)
    num_slots, parts, rank, n = lora.a.shape
    valid = (token_slot >= 0) & (token_slot < num_slots)
    lane = torch.arange(rank, device=x.device)
    a = torch.where((lane < lora.rank[..., None])[..., None], lora.a, 0).float()  # [S, P, R, N]
    a_t = a[token_slot.clamp(0, num_slots - 1).long()].reshape(x.shape[0], parts * rank, n)  # [T, P*R, N]
    xa = torch.stack(
        [
            torch.einsum("tn,tln->tl", y[:, c : c + chunk].float(), a_t[..., c : c + chunk])
            for c in range(0, n, chunk)
        ]
    )
    return y, s, torch.where(valid[None, :, None], xa, 0)


def norm_shrink(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor,
    weight_first: bool,
    lora: DenseLora,
    token_slot: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """`add_norm_shrink`'s xa alone, where the layer after the norm normalises its input itself
    (`ops.norm_linear`)."""
    return add_norm_shrink(x, weight, eps, residual, weight_first, lora, token_slot, chunk)[2]


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen3NextRMSNormGated: `rms_norm(x, weight, eps)` (the weight after the cast to x's
    dtype) times silu(gate) computed in fp32, the product in fp32, rounded once to x's dtype.

    x, gate [..., N] (same shape); weight [N]."""
    return (rms_norm(x, weight, eps) * torch.nn.functional.silu(gate.float())).to(x.dtype)
