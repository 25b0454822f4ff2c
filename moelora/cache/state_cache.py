"""The state cache of linear-attention layers (Qwen3-Next's Gated DeltaNet): per layer, each sequence's
convolution inputs and recurrent state in a slot of its own, which the scheduler hands out."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StateCache:
    """conv[layer] [S, conv_dim, K - 1] (the model's dtype) and rec[layer] [S, Hv, Dk, Dv] fp32 for each
    linear-attention layer; S slots, one per sequence that may run at once."""

    def __init__(
        self,
        layers: Sequence[int],
        num_slots: int,
        conv_shape: tuple[int, int],
        rec_shape: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_slots = num_slots
        self.conv = {i: torch.zeros((num_slots, *conv_shape), dtype=dtype, device=device) for i in layers}
        self.rec = {
            i: torch.zeros((num_slots, *rec_shape), dtype=torch.float32, device=device) for i in layers
        }

    @staticmethod
    def bytes_per_slot(
        num_layers: int, conv_shape: tuple[int, int], rec_shape: tuple[int, int, int], dtype: torch.dtype
    ) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        conv = conv_shape[0] * conv_shape[1] * itemsize
        return num_layers * (conv + rec_shape[0] * rec_shape[1] * rec_shape[2] * 4)

    def copy_slot(self, src: int, dst: int) -> None:
        """Slot `dst` takes slot `src`'s states in every layer (a completion forked from another's
        prompt starts where the prompt left the states)."""
        for states in (*self.conv.values(), *self.rec.values()):
            states[dst].copy_(states[src])

    def release(self) -> None:
        """Drop the tensors (the engine has stopped)."""
        self.conv, self.rec = {}, {}


class SlotAllocator:
    """Hands out state slots in [0, num_slots); the scheduler takes one when a sequence starts running
    and gives it back when the sequence stops (finished, aborted or preempted)."""

    def __init__(self, num_slots: int) -> None:
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise RuntimeError("no free state slot (the scheduler admits at most max_num_seqs sequences)")
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        if slot >= 0:
            self._free.append(slot)
