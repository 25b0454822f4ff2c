"""The single source of truth for who owns which slice of every weight.

Invariant 1 of design.md: one expert placement. Base expert weights, per-expert LoRA buffers, load-time
filtering and the runtime id rewrite all use `ExpertPlacement`; nothing else decides expert ownership.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """The contiguous block of global experts one EP rank owns: [first, first + count)."""

    num_experts: int
    first: int
    count: int

    def owns(self, global_id: int) -> bool:
        return self.first <= global_id < self.first + self.count

    def global_ids(self) -> range:
        return range(self.first, self.first + self.count)

    def local_id(self, global_id: int) -> int:
        """Local id of an owned expert, -1 for an expert owned by another rank."""
        return global_id - self.first if self.owns(global_id) else -1

    def expert_map(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[E] int32 global -> local id, -1 for experts owned elsewhere."""
        ids = torch.arange(self.num_experts, dtype=torch.int32, device=device) - self.first
        ids[(ids < 0) | (ids >= self.count)] = -1
        return ids


def place_experts(num_experts: int, ep_size: int, ep_rank: int) -> ExpertPlacement:
    """Contiguous, balanced partition: the first `num_experts % ep_size` ranks own one expert more."""
    if ep_size > num_experts:
        raise ValueError(
            f"ep_size {ep_size} is larger than the model's {num_experts} experts: every EP rank must own at "
            f"least one expert; use ep_size <= {num_experts}"
        )
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank {ep_rank} outside [0, {ep_size})")
    base, extra = divmod(num_experts, ep_size)
    first = ep_rank * base + min(ep_rank, extra)
    return ExpertPlacement(num_experts, first, base + (1 if ep_rank < extra else 0))


def shard_range(size: int, num_shards: int, rank: int, what: str) -> slice:
    """Even split of `size` into `num_shards` parts; `what` names the dimension in the error."""
    if size % num_shards:
        raise ValueError(f"{what} ({size}) is not divisible by {num_shards}: choose a size that divides it")
    step = size // num_shards
    return slice(rank * step, (rank + 1) * step)
