"""Runs the model on one scheduled step: builds the batch metadata once, returns the logits it needs.

A step is described by a `StepInput` of plain Python data. With tensor or expert parallelism the driver
(rank 0) builds it from the scheduled sequences and sends the same object to every worker, so all ranks
run the identical forward pass (and meet in the same collectives); only the driver samples.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from moelora.batch import ForwardBatch, PagedKV
from moelora.cache.kv_cache import KVCache
from moelora.engine.graphs import DecodeGraphs, GraphCaptureError
from moelora.engine.request import Sequence
from moelora.models.decoder import MoeForCausalLM


@dataclass(frozen=True)
class StepInput:
    """One step of B sequences flattened to T tokens, as plain data (picklable, device independent).

    ids, positions, slot_mapping: per token. seq_lens, kv_lens, lora_slots (-1 = base model) and
    block_tables: per sequence. prompt_logits: (sequence index, number of prompt positions) for the
    sequences whose prompt log-probs are wanted this step (their logits at every prompt position but
    the last).
    """

    ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    seq_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    block_tables: list[list[int]]
    lora_slots: list[int]
    prompt_logits: list[tuple[int, int]]


def step_input(seqs: Seq[Sequence], block_size: int) -> StepInput:
    """The StepInput of the scheduled sequences: each runs token_ids[num_cached:]."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    seq_lens, kv_lens, lora_slots, prompt_logits = [], [], [], []
    for i, s in enumerate(seqs):
        start, end = s.num_cached, len(s.token_ids)
        ids += s.token_ids[start:end]
        positions += range(start, end)
        slots += (s.blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
        seq_lens.append(end - start)
        kv_lens.append(end)
        entry = s.request.lora_entry
        lora_slots.append(-1 if entry is None or entry.slot is None else entry.slot)
        if s.wants_prompt_logprobs and s.num_cached == 0:
            prompt_logits.append((i, s.num_prompt - 1))
    width = max(len(s.blocks) for s in seqs)
    tables = [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
    return StepInput(
        ids, positions, slots, tuple(seq_lens), tuple(kv_lens), tables, lora_slots, prompt_logits
    )


_LOG = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: MoeForCausalLM, cache: KVCache, graphs: DecodeGraphs | None = None) -> None:
        self.model, self.cache, self.graphs = model, cache, graphs
        # Held by every forward of the model, here and in LLM.logits: a CUDA graph capture must not
        # see another thread's kernels, and two forwards never interleave on the device.
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device

    def build_batch(self, step: StepInput) -> tuple[torch.Tensor, ForwardBatch]:
        """Token ids [T] and the ForwardBatch of a step, on this rank's device."""
        dev = self.device
        kv = PagedKV(
            self.cache,
            torch.tensor(step.slot_mapping, dtype=torch.int64, device=dev),
            torch.tensor(step.block_tables, dtype=torch.int32, device=dev),
            step.kv_lens,
            torch.tensor(step.kv_lens, dtype=torch.int32, device=dev),
        )
        token_slot = None
        if any(slot >= 0 for slot in step.lora_slots):
            per_seq = torch.tensor(step.lora_slots, dtype=torch.int32)
            token_slot = per_seq.repeat_interleave(torch.tensor(step.seq_lens)).to(dev)
        positions = torch.tensor(step.positions, dtype=torch.int64, device=dev)
        batch = ForwardBatch(positions, step.seq_lens, kv, token_slot)
        return torch.tensor(step.ids, dtype=torch.int64, device=dev), batch

    @torch.inference_mode()
    def execute(self, step: StepInput) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """-> (fp32 logits [B, V] at each sequence's last token, {sequence index: fp32 logits of every
        prompt position but the last} for `step.prompt_logits`)."""
        with self.lock:
            return self._execute(step)

    def _execute(self, step: StepInput) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        graphs = self.graphs
        if graphs is not None and graphs.fits(step):
            try:
                return graphs.run(step), {}
            except GraphCaptureError:
                _LOG.warning("CUDA graphs turned off, decode runs eagerly from now on", exc_info=True)
                self.graphs = None
        ids, batch = self.build_batch(step)
        hidden = self.model(ids, batch)
        starts = [0, *torch.tensor(step.seq_lens).cumsum(0).tolist()]
        ends = torch.tensor(starts[1:], device=self.device) - 1
        logits = self.model.compute_logits(hidden[ends])
        prompt_logits = {
            i: self.model.compute_logits(hidden[starts[i] : starts[i] + n]) for i, n in step.prompt_logits
        }
        return logits, prompt_logits
