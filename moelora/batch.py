"""Per-step metadata of a forward pass, built once and passed to every layer (never a global)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardBatch:
    """A batch of B sequences flattened to T tokens, in sequence order.

    positions [T] int64: position of each token within its sequence.
    seq_lens: the B sequence lengths (host side; they sum to T).
    """

    positions: torch.Tensor
    seq_lens: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @staticmethod
    def prefill(seq_lens: Sequence[int], device: torch.device | str = "cpu") -> ForwardBatch:
        """Whole sequences from position 0."""
        if not seq_lens or min(seq_lens) < 1:
            raise ValueError(f"every sequence needs at least one token, got lengths {list(seq_lens)}")
        positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in seq_lens]).to(device)
        return ForwardBatch(positions, tuple(int(n) for n in seq_lens))
