"""Per-step metadata of a forward pass, built once and passed to every layer (never a global)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moelora.cache.kv_cache import KVCache
from moelora.cache.state_cache import StateCache


@dataclass(frozen=True)
class PagedKV:
    """Where this step's keys and values are written, and which cached ones each sequence reads.

    cache: the paged K/V tensors of every layer.
    slot_mapping [T] int64: cache slot (block * block_size + offset) of each new token.
    block_tables [B, max_blocks] int32: each sequence's blocks in order (padded with 0).
    kv_lens: per sequence, the tokens in the cache after this step's writes (context + new).
    kv_lens_dev [B] int32: kv_lens on the device (for GPU kernels that must not copy them per layer).
    """

    cache: KVCache
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    kv_lens: tuple[int, ...]
    kv_lens_dev: torch.Tensor | None = None


@dataclass(frozen=True)
class StateRuns:
    """Sequences of a step that run several tokens through the linear-attention layers in one call.

    lens: host-side token counts, in batch order; rows [sum(lens)] int64 on the device: their token rows;
    slots [len(lens)] int64: their state slots."""

    lens: tuple[int, ...]
    rows: torch.Tensor
    slots: torch.Tensor


@dataclass(frozen=True)
class StateRows:
    """Where a step's sequences stand for the linear-attention layers, built once per step.

    start: the sequences computed from nothing (a prompt's first part, or a preempted sequence again from
    position 0). resume: the later parts of a prompt computed in parts (chunked prefill), continuing from
    their slot's state. decode_rows, decode_slots [D] int64 on the device: the token row and the slot of
    each sequence continuing by one token from its slot's state (int32 slots from a CUDA graph's static
    inputs); a one-token part of a prompt is one of them."""

    start: StateRuns
    resume: StateRuns
    decode_rows: torch.Tensor
    decode_slots: torch.Tensor

    def decode_only(self, num_tokens: int) -> bool:
        """Whether every one of the step's `num_tokens` rows continues a state by one token (then
        decode_rows are 0, 1, ... in order, and a layer may step its rows without gathering them)."""
        return not self.start.lens and not self.resume.lens and self.decode_rows.shape[0] == num_tokens

    @staticmethod
    def decoding(rows: torch.Tensor, slots: torch.Tensor) -> StateRows:
        """Every sequence one token on from its slot's state (a decode step; rows 0, 1, ...)."""
        none = StateRuns((), rows[:0], rows[:0])
        return StateRows(none, none, rows, slots)

    @staticmethod
    def of(
        seq_lens: Sequence[int], kv_lens: Sequence[int], slots: Sequence[int], device: torch.device
    ) -> StateRows:
        """From each sequence's tokens this step, its tokens after it (kv_lens) and its state slot: a
        sequence with earlier tokens continues the slot's states, which hold them (its earlier parts, or
        a cached prefix's states copied in before the step)."""
        if min(slots, default=0) < 0:
            raise ValueError(
                f"every sequence of a step with linear attention needs a state slot, got {list(slots)}"
            )
        lens: tuple[list[int], list[int]] = ([], [])  # start, resume
        rows: tuple[list[int], list[int], list[int]] = ([], [], [])  # start, resume, decode
        slots_of: tuple[list[int], list[int], list[int]] = ([], [], [])
        row = 0
        for n, total, slot in zip(seq_lens, kv_lens, slots, strict=True):
            kind = 0 if total == n else 2 if n == 1 else 1
            if kind < 2:
                lens[kind].append(n)
            rows[kind].extend(range(row, row + n))
            slots_of[kind].append(slot)
            row += n
        parts = [*rows, *slots_of]
        flat = torch.tensor([x for part in parts for x in part], dtype=torch.int64).to(device)
        start_rows, resume_rows, decode_rows, start_slots, resume_slots, decode_slots = flat.split(
            [len(part) for part in parts]
        )
        return StateRows(
            StateRuns(tuple(lens[0]), start_rows, start_slots),
            StateRuns(tuple(lens[1]), resume_rows, resume_slots),
            decode_rows,
            decode_slots,
        )


@dataclass(frozen=True)
class ForwardBatch:
    """A batch of B sequences flattened to T tokens, in sequence order.

    positions [T] int64: position of each token within its sequence.
    seq_lens: the B query lengths, the tokens each sequence runs this step (host side; they sum to T).
    kv: the paged KV cache and its metadata; None for a cacheless forward of whole sequences.
    token_slot [T] int32: each token's adapter slot, -1 for the base model; None when no token of the
        batch uses an adapter (then no LoRA work is done at all).
    states, state_rows: the linear-attention layers' state cache and where each sequence stands in it
        (None for models without such layers, or for a forward that keeps no state).
    """

    positions: torch.Tensor
    seq_lens: tuple[int, ...]
    kv: PagedKV | None = None
    token_slot: torch.Tensor | None = None
    states: StateCache | None = None
    state_rows: StateRows | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @staticmethod
    def prefill(seq_lens: Sequence[int], device: torch.device | str = "cpu") -> ForwardBatch:
        """Whole sequences from position 0, without a KV cache."""
        if not seq_lens or min(seq_lens) < 1:
            raise ValueError(f"every sequence needs at least one token, got lengths {list(seq_lens)}")
        positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in seq_lens]).to(device)
        return ForwardBatch(positions, tuple(int(n) for n in seq_lens))
