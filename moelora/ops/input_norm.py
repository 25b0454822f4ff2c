"""`InputNorm`: the RMSNorm (with its residual add) before a linear layer, the argument that lets the
layer's one launch run both (`ops.norm_linear`)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class InputNorm(NamedTuple):
    """The norm as `ops.rms_norm` takes it: its input is x + residual (x itself where residual is None)."""

    residual: torch.Tensor | None  # like x
    weight: torch.Tensor  # [in]
    eps: float
    weight_first: bool
