"""`ExpertExtras`: what routed experts have beyond the plain SwiGLU MLP in bf16 (GPT-OSS's biases and
activation, FP8 weights' scales), as one value."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertExtras:
    """Per-expert biases and the clamped SwiGLU of GPT-OSS, and the scales of FP8 expert weights.

    b_gate_up [E_loc, 2 * I_loc] (this rank's gate biases, then its up biases) or None; b_down [E_loc, H]
    or None (None also on the ranks that do not add it: one rank per intermediate split does);
    swiglu (limit, alpha) or None for silu(gate) * up. With them, for expert e:
        g, u = split(W_gate_up[e] x + b_gate_up[e])
        h = (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'),  g' = min(g, limit)
        d = W_down[e] h + b_down[e]
    """

    b_gate_up: torch.Tensor | None
    b_down: torch.Tensor | None
    swiglu: tuple[float, float] | None
    scales: ExpertScales | None = None  # FP8 expert weights (`--quantization fp8`)


@dataclass(frozen=True)
class ExpertScales:
    """The scales of FP8 (float8_e4m3fn) expert weights, per row and group of `group` input columns:
    gate_up [E_loc, 2 * I_loc, ceil(H / group)] and down [E_loc, H, ceil(I_loc / group)], fp32, with
        W_gate_up[e, n, k] = W8_gate_up[e, n, k] * gate_up[e, n, k // group]
    (and so for down). `group` is a power of two >= 16; the kernels step at most `group` columns at a
    time, so each step reads one scale per row."""

    gate_up: torch.Tensor
    down: torch.Tensor
    group: int


def activation(gate: torch.Tensor, up: torch.Tensor, swiglu: tuple[float, float] | None) -> torch.Tensor:
    """silu(gate) * up, or GPT-OSS's clamped SwiGLU with swiglu = (limit, alpha)."""
    if swiglu is None:
        return torch.nn.functional.silu(gate) * up
    limit, alpha = swiglu
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))
