"""`ExpertLora`: one MoE layer's per-expert adapter slots, the one argument the routed-expert LoRA ops take
for them (from the layer down to the kernels' launchers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertLora:
    """Per-expert adapter slots of this rank's experts, in the op contract's layout; scales folded into B.

    a_gu [S, E_loc, 2, R, H], b_gu [S, E_loc, 2, I_loc, R] (slice 0 gate, 1 up), a_dn [S, E_loc, R, I_loc],
    b_dn [S, E_loc, H, R]; indexed by local expert id, so they hold only the experts this rank owns.
    rank None or [S] int32: each slot's largest rank over these experts' projections, 0 where empty (lanes
    from there up are zero padding in every buffer, which kernels may skip; the result is the same).
    The tensors are written in place by the adapter pool; the value itself never changes.
    """

    a_gu: torch.Tensor
    b_gu: torch.Tensor
    a_dn: torch.Tensor
    b_dn: torch.Tensor
    rank: torch.Tensor | None = None

    @property
    def num_slots(self) -> int:
        return int(self.a_gu.shape[0])

    @property
    def max_rank(self) -> int:
        return int(self.a_gu.shape[3])

    def check(
        self, num_experts: int, hidden: int, inter: int, num_tokens: int, token_slot: torch.Tensor
    ) -> None:
        """ValueError naming the first buffer whose shape is not the contract's for these experts."""
        s, r = self.num_slots, self.max_rank
        want = {
            "a_gu": (self.a_gu, (s, num_experts, 2, r, hidden)),
            "b_gu": (self.b_gu, (s, num_experts, 2, inter, r)),
            "a_dn": (self.a_dn, (s, num_experts, r, inter)),
            "b_dn": (self.b_dn, (s, num_experts, hidden, r)),
        }
        for name, (t, shape) in want.items():
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, expected {shape} (the op contract's layout)"
                )
        if token_slot.shape != (num_tokens,):
            raise ValueError(f"token_slot has shape {tuple(token_slot.shape)}, expected ({num_tokens},)")
        if self.rank is not None and self.rank.shape != (s,):
            raise ValueError(f"slot ranks have shape {tuple(self.rank.shape)}, expected ({s},)")
