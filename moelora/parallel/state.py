"""The frozen parallel state every layer that needs one is given (never looked up)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParallelState:
    """One process's place in the layout of design.md.

    Global rank r in [0, tp_size) is TP rank r; its EP rank is r // moe_tp_size and its MoE-TP rank
    r % moe_tp_size, where moe_tp_size = tp_size / ep_size.
    """

    tp_rank: int = 0
    tp_size: int = 1
    ep_size: int = 1
    tp_group: Any = None  # torch.distributed ProcessGroup, None when tp_size == 1

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.ep_size < 1:
            raise ValueError(f"tp_size ({self.tp_size}) and ep_size ({self.ep_size}) must be >= 1")
        if self.tp_size % self.ep_size:
            raise ValueError(
                f"ep_size {self.ep_size} does not divide tp_size {self.tp_size}: choose an ep_size that does "
                f"(experts are split over ep_size groups of tp_size / ep_size ranks)"
            )
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} outside [0, {self.tp_size})")

    @property
    def moe_tp_size(self) -> int:
        return self.tp_size // self.ep_size

    @property
    def ep_rank(self) -> int:
        return self.tp_rank // self.moe_tp_size

    @property
    def moe_tp_rank(self) -> int:
        return self.tp_rank % self.moe_tp_size
