"""CUDA graphs of decode steps: one captured forward per padded batch size and LoRA on/off.

A decode step (every sequence runs one token) is the same few hundred kernel launches every time; replaying
a captured graph replaces the Python and launch work of each layer (the cost that dominates decode on a
GPU) with one launch. Inputs are copied into static buffers; a batch of B sequences runs in the graph of the
next bucket size Bp >= B, the extra rows reading and writing one spare KV block that no sequence owns and
using no adapter slot. Only kernels that are graph safe run here (no host synchronisation, no
data-dependent sizes): the Triton paths of every op, so graphs are used only on CUDA in fp16/bf16 (the
PyTorch twins loop over host-side lengths). Under TP x EP each rank captures and replays its own graphs at
the same steps (every rank decides from the same StepInput), NCCL's all-reduces captured inside.
Linear-attention layers step each sequence's state in its slot (padding rows name slot -1: they read zeros
and write nothing); a step in which a sequence starts from nothing (a one-token prompt) runs eagerly, since
a graph's rows always continue a state.

On the CPU (tests, with `ops.graph_safe` patched on) nothing is captured: each step runs the same forward
on the same static inputs eagerly (the PyTorch twins read the host-side lengths, which graphs do not), so
the graph path's inputs, padding rows and state slots are checked without a GPU.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moelora.batch import ForwardBatch, PagedKV, StateRows
from moelora.cache.kv_cache import KVCache
from moelora.cache.state_cache import StateCache
from moelora.engine.transfer import pinned, to_device
from moelora.models.decoder import MoeForCausalLM

if TYPE_CHECKING:
    from moelora.engine.runner import StepInput

_LOG = logging.getLogger(__name__)


# One capture stream per device for every DecodeGraphs of the process. cuBLAS keeps a workspace (32 MiB
# on Hopper) per stream it has run on, for the life of the process: a new stream per capture left 32 MiB
# behind per batch size and per LLM (found by tests/test_gpu_memory.py).
_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_LIVE: weakref.WeakSet[DecodeGraphs] = weakref.WeakSet()


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


def free_cublas_workspaces() -> None:
    """Give back cuBLAS's per-stream workspaces when no decode graph of this process is alive (a captured
    graph has its workspace's address baked in); they are allocated again on the next cuBLAS call."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None and torch.cuda.is_available() and not _LIVE:
        torch.cuda.synchronize()
        clear()


def feed(ids: torch.Tensor, fed: list[tuple[int, int]], previous: torch.Tensor | None) -> None:
    """Write the previous step's chosen ids into a step's token ids on the device: ids[t] = previous[row]
    for each (t, row) in `fed` (the tokens the host has not seen yet)."""
    if not fed:
        return
    if previous is None:
        raise ValueError("a step with fed tokens needs the previous step's chosen ids")
    index = to_device(list(zip(*fed, strict=True)), torch.int64, ids.device)  # [2, F]: token, row
    ids.index_copy_(0, index[0], previous.index_select(0, index[1]))


class GraphCaptureError(RuntimeError):
    """A decode step could not be captured (an op that is not graph safe); the caller runs eagerly."""


def buckets(max_batch: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, then multiples of 8 up to 64, then of 32, up to max_batch."""
    sizes = [1, 2, 4, 8]
    sizes += range(16, 65, 8)
    sizes += range(96, max_batch + 32, 32)
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [Bp, V] fp32, written by every replay


class DecodeGraphs:
    """Captures lazily (the first decode step of each size pays a capture) and replays."""

    def __init__(
        self,
        model: MoeForCausalLM,
        cache: KVCache,
        pad_block: int,
        max_batch: int,
        max_blocks: int,
        states: StateCache | None = None,
    ) -> None:
        """`pad_block`: a KV block no sequence owns; `max_blocks`: most blocks one sequence can hold;
        `states`: the linear-attention layers' state cache (models that have such layers)."""
        self.model, self.cache, self.pad_block, self.states = model, cache, pad_block, states
        self.sizes = buckets(max_batch)
        self.max_batch = self.sizes[-1]
        dev = next(model.parameters()).device
        n, width = self.max_batch, max_blocks
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=dev)
        self.kv_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.token_slot = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.state_slots = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(n, dtype=torch.int64, device=dev)
        self.capture = dev.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._graphs: dict[tuple[int, bool], _Graph] = {}
        self.replays = 0
        self.stream = _capture_stream(dev) if self.capture else None
        _LIVE.add(self)

    def fits(self, step: StepInput) -> bool:
        """A decode step (one token per sequence, no prompt logits) that a graph of this set can run."""
        return (
            max(step.seq_lens) == 1
            and not step.prompt_logits
            and len(step.ids) <= self.max_batch
            and len(step.block_tables[0]) <= self.block_tables.shape[1]
            and (self.states is None or min(step.kv_lens) > 1)
        )

    def capture_all(self, lora: bool) -> int:
        """Capture every size's graph now (with adapters or without), so that no later step pays a capture;
        the number captured. The caller holds the runner's lock."""
        if not self.capture:
            return 0
        missing = [s for s in self.sizes if (s, lora) not in self._graphs]
        for size in missing:
            self._graphs[(size, lora)] = self._capture(size, lora)
        return len(missing)

    def drop(self) -> None:
        """Forget every captured graph (after the card has finished their replays); each size is captured
        again at its next step or `capture_all`. For a changed kernel plan: a graph keeps the kernels it
        was captured with."""
        if self.capture and self._graphs:
            torch.cuda.synchronize(self.ids.device)
        self._graphs.clear()

    def size_for(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

    def _forward(self, size: int, lora: bool, host_lens: tuple[int, ...] | None = None) -> torch.Tensor:
        kv = PagedKV(
            self.cache,
            self.slot_mapping[:size],
            self.block_tables[:size],
            host_lens or (1,) * size,  # not read by the kernels a graph runs (kv_lens_dev is)
            self.kv_lens[:size],
        )
        rows = None
        if self.states is not None:
            rows = StateRows.decoding(self.rows[:size], self.state_slots[:size])
        token_slot = self.token_slot[:size] if lora else None
        batch = ForwardBatch(self.positions[:size], (1,) * size, kv, token_slot, self.states, rows)
        return self.model.compute_logits(self.model(self.ids[:size], batch))

    def _capture(self, size: int, lora: bool) -> _Graph:
        self._fill_padding(0, size)
        stream = self.stream
        assert stream is not None
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(size, lora)  # compiles every kernel variant (and makes cuBLAS's workspace)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            logits = self._forward(size, lora)
        _LOG.info("captured a decode graph for %d sequences%s", size, " with adapters" if lora else "")
        return _Graph(graph, logits)

    def _fill_padding(self, start: int, stop: int) -> None:
        bs = self.cache.block_size
        self.ids[start:stop] = 0
        self.positions[start:stop] = 0
        self.slot_mapping[start:stop] = self.pad_block * bs
        self.block_tables[start:stop] = 0
        self.block_tables[start:stop, 0] = self.pad_block
        self.kv_lens[start:stop] = 1
        self.token_slot[start:stop] = -1
        self.state_slots[start:stop] = -1

    @torch.inference_mode()
    def run(self, step: StepInput, previous: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [B, V] of a decode step that `fits` (queued; `previous`: see `feed`)."""
        ids, block_tables, lora_slots = step.ids, step.block_tables, step.lora_slots
        b = len(ids)
        size = self.size_for(b)
        assert size is not None, (b, self.max_batch)
        lora = any(s >= 0 for s in lora_slots)
        key = (size, lora)
        if self.capture and key not in self._graphs:
            try:
                self._graphs[key] = self._capture(size, lora)
            except Exception as e:
                raise GraphCaptureError(f"capturing a decode step of {size} sequences failed: {e}") from e
        width, dev = len(block_tables[0]), self.ids.device
        host = pinned([ids, step.positions, step.slot_mapping], torch.int64, dev)
        self.ids[:b].copy_(host[0], non_blocking=True)
        self.positions[:b].copy_(host[1], non_blocking=True)
        self.slot_mapping[:b].copy_(host[2], non_blocking=True)
        self.block_tables[:b, :width].copy_(pinned(block_tables, torch.int32, dev), non_blocking=True)
        self.block_tables[:b, width:] = 0
        per_seq = [list(step.kv_lens), lora_slots, *([step.state_slots] if self.states is not None else [])]
        small = pinned(per_seq, torch.int32, dev)  # one copy: lengths, adapter slots (and state slots)
        self.kv_lens[:b].copy_(small[0], non_blocking=True)
        self.token_slot[:b].copy_(small[1], non_blocking=True)
        if self.states is not None:
            self.state_slots[:b].copy_(small[2], non_blocking=True)
        feed(self.ids, step.fed, previous)
        self._fill_padding(b, size)
        self.replays += 1
        if not self.capture:
            return self._forward(size, lora, (*step.kv_lens, *(1,) * (size - b)))[:b]
        g = self._graphs[key]
        g.graph.replay()
        return g.logits[:b]
