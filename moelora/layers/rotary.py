"""Rotary position embedding (the rotate-half convention of Hugging Face models)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos, sin of the angles positions[t] * inv_freq (inv_freq [D/2], from the config), which
    `ops.rotary` applies to q and k."""

    def __init__(self, inv_freq: Sequence[float], attention_scaling: float) -> None:
        super().__init__()
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", torch.tensor(inv_freq, dtype=torch.float32), persistent=False)
        self.attention_scaling = attention_scaling

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D] for the token positions, computed in fp32 and cast like HF does."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)
