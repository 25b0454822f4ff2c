"""Runs the model on one scheduled step: builds the batch metadata once, returns the logits it needs.

A step is described by a `StepInput` of plain Python data. With tensor or expert parallelism the driver
(rank 0) builds it from the scheduled sequences and sends the same object to every worker, so all ranks
run the identical forward pass (and meet in the same collectives); only the driver samples.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from moelora.batch import ForwardBatch, PagedKV, StateRows
from moelora.cache.kv_cache import KVCache
from moelora.cache.state_cache import StateCache
from moelora.engine.graphs import DecodeGraphs, GraphCaptureError, feed
from moelora.engine.request import Sequence
from moelora.engine.transfer import to_device
from moelora.models.decoder import MoeForCausalLM


@dataclass(frozen=True)
class StepInput:
    """One step of B sequences flattened to T tokens, as plain data (picklable, device independent).

    ids, positions, slot_mapping: per token. seq_lens, kv_lens, lora_slots (-1 = base model) and
    block_tables: per sequence. prompt_logits: (sequence index, number of positions) for the sequences
    whose prompt log-probs are wanted this step: the logits of their first that many tokens of the step
    (prompt positions, never the prompt's last). fed: (token index, row) for the tokens that the
    previous step sampled and the host has not seen yet (async scheduling): their entry in ids is a
    placeholder, the token is read on the device from row `row` of the previous step's chosen ids (a
    worker gets them in a broadcast).
    state_slots: each sequence's slot in the linear-attention layers' state cache (models with such
    layers; empty otherwise).
    """

    ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    seq_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    block_tables: list[list[int]]
    lora_slots: list[int]
    prompt_logits: list[tuple[int, int]]
    fed: list[tuple[int, int]] = field(default_factory=list)
    state_slots: list[int] = field(default_factory=list)  # per sequence (linear attention), else empty


def step_input(seqs: Seq[Sequence], block_size: int, num_new: Seq[int]) -> StepInput:
    """The StepInput of the scheduled sequences: each runs num_new[i] tokens from num_cached on (all it
    has left, or a part of its prompt), a last one the host does not have yet (`Sequence.pending`) fed
    from the previous step's choices. A sequence that wants prompt log-probs gets the logits of the prompt
    positions it runs (all but the prompt's last)."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    fed: list[tuple[int, int]] = []
    seq_lens, kv_lens, lora_slots, prompt_logits = [], [], [], []
    for i, s in enumerate(seqs):
        start = s.num_cached
        end = start + num_new[i]
        ids += s.token_ids[start:end]
        if s.pending >= 0 and end == s.num_tokens:
            fed.append((len(ids), s.pending))
            ids.append(0)
        positions += range(start, end)
        slots += (s.blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
        seq_lens.append(end - start)
        kv_lens.append(end)
        entry = s.request.lora_entry
        lora_slots.append(-1 if entry is None or entry.slot is None else entry.slot)
        if s.wants_prompt_logprobs and start < max(s.num_prompt - 1, 1):  # (none of a 1-token prompt)
            prompt_logits.append((i, max(0, min(end, s.num_prompt - 1) - start)))
    width = max(len(s.blocks) for s in seqs)
    tables = [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
    state_slots = [s.state_slot for s in seqs] if any(s.state_slot >= 0 for s in seqs) else []
    return StepInput(
        ids, positions, slots, tuple(seq_lens), tuple(kv_lens), tables, lora_slots, prompt_logits, fed,
        state_slots,
    )  # fmt: skip


_LOG = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model: MoeForCausalLM,
        cache: KVCache,
        graphs: DecodeGraphs | None = None,
        states: StateCache | None = None,
    ) -> None:
        self.model, self.cache, self.graphs, self.states = model, cache, graphs, states
        # Held by every forward of the model, here and in LLM.logits: a CUDA graph capture must not
        # see another thread's kernels, and two forwards never interleave on the device.
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device

    def build_batch(
        self, step: StepInput, previous: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ForwardBatch]:
        """Token ids [T] and the ForwardBatch of a step, on this rank's device; `previous`: the previous
        step's chosen ids [B'] when the step has `fed` tokens."""
        dev, i32, i64 = self.device, torch.int32, torch.int64
        kv = PagedKV(
            self.cache,
            to_device(step.slot_mapping, i64, dev),
            to_device(step.block_tables, i32, dev),
            step.kv_lens,
            to_device(step.kv_lens, i32, dev),
        )
        token_slot = None
        if any(slot >= 0 for slot in step.lora_slots):
            per_seq = [slot for slot, n in zip(step.lora_slots, step.seq_lens, strict=True) for _ in range(n)]
            token_slot = to_device(per_seq, i32, dev)
        states, rows = None, None
        if self.states is not None and step.state_slots:
            states, rows = self.states, StateRows.of(step.seq_lens, step.kv_lens, step.state_slots, dev)
        positions = to_device(step.positions, i64, dev)
        batch = ForwardBatch(positions, step.seq_lens, kv, token_slot, states, rows)
        ids = to_device(step.ids, i64, dev)
        feed(ids, step.fed, previous)
        return ids, batch

    @torch.inference_mode()
    def execute(
        self, step: StepInput, previous: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """-> (fp32 logits [B, V] at each sequence's last token, {sequence index: fp32 logits of the prompt
        positions it runs} for `step.prompt_logits`). `previous`: the previous step's chosen
        ids on the device, read by the step's `fed` tokens. Returns once the work is queued."""
        with self.lock:
            return self._execute(step, previous)

    def _execute(
        self, step: StepInput, previous: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        graphs = self.graphs
        if graphs is not None and graphs.fits(step):
            try:
                return graphs.run(step, previous), {}
            except GraphCaptureError:
                _LOG.warning("CUDA graphs turned off, decode runs eagerly from now on", exc_info=True)
                self.graphs = None
        ids, batch = self.build_batch(step, previous)
        hidden = self.model(ids, batch)
        starts = [0, *itertools.accumulate(step.seq_lens)]
        ends = to_device([e - 1 for e in starts[1:]], torch.int64, self.device)
        logits = self.model.compute_logits(hidden[ends])
        prompt_logits = {
            i: self.model.compute_logits(hidden[starts[i] : starts[i] + n]) for i, n in step.prompt_logits
        }
        return logits, prompt_logits
