"""The executor: one per rank, the same on every rank. It owns the model runner, the KV cache and the
adapter slots, and runs the commands that touch them: a step, a cacheless forward, an adapter slot write
or clear, a KV block copy.

On rank 0 each command first goes to the other ranks as a frozen message (`engine/messages.py`), then runs
here, inside the same lock, so every rank runs the same commands in the same order and meets in the same
collectives; a worker receives the messages and applies them to its own executor. Nothing else talks to
the workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from moelora.batch import ForwardBatch
from moelora.cache.kv_cache import KVCache
from moelora.engine.graphs import DecodeGraphs
from moelora.engine.messages import (
    CaptureGraphs,
    ClearSlot,
    CopyBlock,
    CopyState,
    Forward,
    Init,
    Message,
    Step,
    UsePlan,
    WriteSlot,
)
from moelora.engine.runner import ModelRunner, StepInput
from moelora.lora.adapter import AdapterError, LoraAdapter
from moelora.lora.pool import LoraPool
from moelora.lora.source import load_adapter
from moelora.models.decoder import MoeForCausalLM
from moelora.ops.plan import KernelPlan, use_plan, with_overrides
from moelora.parallel.comm import broadcast
from moelora.parallel.launch import WorkerChannel, WorkerGroup
from moelora.parallel.sharding import place_experts

T = TypeVar("T")
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecutorPlan:
    """What every rank builds, decided once by rank 0 (its memory budget) and sent to the others."""

    num_blocks: int  # KV cache blocks the allocator hands out
    block_size: int
    lora_slots: int  # adapter slots (0: adapters off, no memory reserved)
    lora_rank: int
    graphs: bool  # replay decode steps from CUDA graphs (one rank, CUDA, 16-bit)
    max_num_seqs: int  # the largest decode graph
    max_blocks: int  # most KV blocks one sequence holds
    state_snapshots: int = 0  # linear-attention state slots beyond the running ones: cached prefixes'


class Executor:
    """This rank's runner, KV cache and adapter slots; on rank 0 (`workers` given) the sender of every
    command, on a worker (`channel` given) their receiver's target."""

    def __init__(
        self,
        model: MoeForCausalLM,
        plan: ExecutorPlan,
        workers: WorkerGroup | None = None,
        channel: WorkerChannel | None = None,
    ) -> None:
        self.model, self.plan, self.workers, self.channel = model, plan, workers, channel
        if workers is not None:
            with workers.lock:
                workers.send(Init(plan))
        cfg, device = model.cfg, next(model.parameters()).device
        kv_heads, k_dim, v_dim = model.kv_layout()
        # With graphs, one block more than the allocator hands out: padded rows of a graph write there.
        self.cache = KVCache(
            cfg.num_layers, plan.num_blocks + int(plan.graphs), plan.block_size, kv_heads, k_dim,
            model.dtype, device, v_dim, model.kv_layers(),
        )  # fmt: skip
        # Linear-attention layers: a state slot per sequence that may run (the scheduler's max_num_seqs),
        # then the snapshots of cached prefixes.
        self.states = model.state_cache(plan.max_num_seqs + plan.state_snapshots, device)
        self.pool = LoraPool(model, plan.lora_slots, plan.lora_rank) if plan.lora_slots else None
        graphs = None
        if plan.graphs:
            graphs = DecodeGraphs(
                model, self.cache, plan.num_blocks, plan.max_num_seqs, plan.max_blocks, self.states
            )
        self.runner = ModelRunner(model, self.cache, graphs, self.states)
        self.device = device

    def _everywhere(self, message: Message, local: Callable[[], T]) -> T:
        """Send `message` to the workers (if any), then run `local` here; a worker's death is named."""
        workers = self.workers
        if workers is None:
            return local()
        with workers.lock:
            workers.send(message)
            return workers.checked(local)

    # ---------------------------------------------------------------- commands (rank 0)

    def step(
        self, step: StepInput, previous: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One engine step: (fp32 logits [B, V], {sequence index: prompt logits}); see ModelRunner.
        `previous`: the previous step's chosen ids on the device, for the step's `fed` tokens; the
        workers get them from rank 0 in a broadcast on the device (no wait for the host)."""
        rows = 0
        if step.fed:
            if previous is None:
                raise ValueError("a step with fed tokens needs the previous step's chosen ids")
            rows = previous.shape[0]

        def local() -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
            if rows and self.workers is not None:
                assert previous is not None
                broadcast(previous, self.model.ps)
            return self.runner.execute(step, previous)

        return self._everywhere(Step(step, rows), local)

    def forward_logits(self, ids: list[int], seq_lens: tuple[int, ...]) -> torch.Tensor:
        """A cacheless forward pass over prompts given flat: fp32 logits [sum(seq_lens), V]."""
        return self._everywhere(Forward(ids, seq_lens), lambda: self.run_forward(ids, seq_lens))

    def write_slot(self, slot: int, adapter: LoraAdapter) -> None:
        """Put `adapter` into `slot` on every rank. The workers read it again themselves (only their own
        experts); if one cannot (its files changed or vanished), no rank keeps it and this raises why."""
        pool = self._pool()
        workers = self.workers
        if workers is not None:
            message = WriteSlot(slot, adapter.name, adapter.source, pool.max_rank, adapter.fingerprint)
            with workers.lock:
                workers.send(message)
                errors = workers.checked(lambda: workers.gather(None))
            for rank, error in enumerate(errors):
                if error is not None:
                    raise AdapterError(f"{error} (on worker rank {rank})")
        pool.write(slot, adapter)

    def clear_slot(self, slot: int) -> None:
        self._everywhere(ClearSlot(slot), lambda: self.run_clear_slot(slot))

    def copy_block(self, src: int, dst: int) -> None:
        self._everywhere(CopyBlock(src, dst), lambda: self.run_copy_block(src, dst))

    def copy_state(self, src: int, dst: int) -> None:
        self._everywhere(CopyState(src, dst), lambda: self.run_copy_state(src, dst))

    def capture_graphs(self, lora: bool) -> int:
        """Capture every decode graph now (with adapters too if `lora`), on every rank; the number
        captured here."""
        return self._everywhere(CaptureGraphs(lora), lambda: self.run_capture_graphs(lora))

    def run_capture_graphs(self, lora: bool) -> int:
        """This rank's captures; one that fails turns this rank's graphs off (it decodes eagerly, its
        collectives in the same order as the other ranks')."""
        runner = self.runner
        with runner.lock:
            graphs = runner.graphs
            if graphs is None:
                return 0
            try:
                return graphs.capture_all(lora=False) + (graphs.capture_all(lora=True) if lora else 0)
            except Exception:
                _LOG.warning("CUDA graphs turned off, decode runs eagerly from now on", exc_info=True)
                runner.graphs = None
                return 0

    def use_plan(self, spec: str) -> KernelPlan:
        """Every rank's kernel plan becomes `ops.plan.use_plan(spec)`, its decode graphs dropped (the
        next decode step or `capture_graphs` captures them with the new plan); the plan. A spec
        `MOELORA_PLAN` would refuse is refused here, before any rank changes."""
        with_overrides(KernelPlan(), spec)
        return self._everywhere(UsePlan(spec), lambda: self.run_use_plan(spec))

    def run_use_plan(self, spec: str) -> KernelPlan:
        runner = self.runner
        with runner.lock:
            if runner.graphs is not None:
                runner.graphs.drop()
            return use_plan(spec)

    def release(self) -> None:
        """Drop the device memory this rank holds (graphs and their pool, KV and state caches, adapter
        slots)."""
        self.runner.graphs = None
        self.cache.release()
        if self.states is not None:
            self.states.release()
        if self.pool is not None:
            self.pool.release()

    # ---------------------------------------------------------------- every rank (workers: from messages)

    def run_step(self, step: StepInput, fed_rows: int = 0) -> None:
        previous = None
        if fed_rows:  # rank 0's chosen ids of the previous step, which the step's fed tokens read
            previous = torch.empty(fed_rows, dtype=torch.int64, device=self.device)
            broadcast(previous, self.model.ps)
        self.runner.execute(step, previous)

    @torch.inference_mode()
    def run_forward(self, ids: list[int], seq_lens: tuple[int, ...]) -> torch.Tensor:
        batch = ForwardBatch.prefill(list(seq_lens), self.device)
        tokens = torch.tensor(ids, dtype=torch.int64, device=self.device)
        with self.runner.lock:
            return self.model.compute_logits(self.model(tokens, batch))

    def write_own_shards(self, message: WriteSlot) -> None:
        """A worker's half of `write_slot`: read, write, answer; all clear the slot if any rank failed."""
        assert self.channel is not None
        error = None
        try:
            ps = self.model.ps
            owns = place_experts(self.model.cfg.num_experts, ps.ep_size, ps.ep_rank).owns
            adapter = load_adapter(
                message.name,
                message.source,
                self.model.cfg,
                self.model.family,
                message.max_rank,
                fingerprint=message.fingerprint,
                dtype=self.model.dtype,
                device=self.device,
                owns_expert=owns,
            )
            self._pool().write(message.slot, adapter)
        except AdapterError as e:
            error = str(e)
        answers: list[Any] = self.channel.gather(error)
        if any(a is not None for a in answers):
            self._pool().clear(message.slot)

    def run_clear_slot(self, slot: int) -> None:
        self._pool().clear(slot)

    def run_copy_block(self, src: int, dst: int) -> None:
        self.cache.copy_block(src, dst)

    def run_copy_state(self, src: int, dst: int) -> None:
        if self.states is None:
            raise RuntimeError("this model keeps no linear-attention states")
        self.states.copy_slot(src, dst)

    def _pool(self) -> LoraPool:
        if self.pool is None:
            raise RuntimeError("adapter slots are off on this executor")
        return self.pool
