"""PyTorch twins of the MLPs' elementwise steps: the dense MLP's activation, the gated shared expert's add."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [T, 2I] (gate the first I columns, up the rest), in its dtype: silu
    rounded to it, then the product (transformers' `act_fn(gate_proj(x)) * up_proj(x)`). -> [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def add_gated(base: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """base + sigmoid(gate) * x in base's dtype, each step rounded to it (transformers' gated shared
    expert: `sigmoid(shared_expert_gate(h)) * shared_expert(h)`, added to the routed experts' sum).

    base, x [T, H]; gate [T, 1] (one logit a token)."""
    return base + torch.sigmoid(gate) * x
