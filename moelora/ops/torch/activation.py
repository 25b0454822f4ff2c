"""PyTorch twin of the dense MLP's activation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [T, 2I] (gate the first I columns, up the rest), in its dtype: silu
    rounded to it, then the product (transformers' `act_fn(gate_proj(x)) * up_proj(x)`). -> [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
