"""The engine: one loop thread owning the scheduler, KV cache and model; any thread may submit or abort.

Callers never touch engine state: `submit` validates and tokenises in the caller's thread, then hands
the request to the loop through a queue; the loop admits it between steps (continuous batching) and
streams deltas back through the request's `RequestStream`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moelora import ops
from moelora.cache.budget import fit_model_len, free_memory, plan_kv_blocks, reserve_bytes
from moelora.cache.kv_cache import BlockAllocator, KVCache
from moelora.config import EngineArgs, LoraArgs
from moelora.engine.adapters import EngineAdapters
from moelora.engine.detokenizer import IncrementalDetokenizer
from moelora.engine.executor import Executor, ExecutorPlan
from moelora.engine.request import (
    InvalidRequestError,
    Prompt,
    Request,
    Sequence,
    Status,
    derived_seed,
    encode_prompt,
)
from moelora.engine.runner import step_input
from moelora.engine.sampler import PendingSample, Sampled, SamplingInput, launch_sample, sample
from moelora.engine.scheduler import Scheduler, snapshot_slots
from moelora.engine.stats import EngineLoad, StepRecord
from moelora.engine.stream import EngineDeadError, RequestStream
from moelora.engine.transfer import to_device
from moelora.lora.adapter import LoraAdapter
from moelora.lora.dummy import DummyLora
from moelora.lora.manager import LoraInfo, LoraManager
from moelora.lora.pool import pool_bytes
from moelora.models.config import activation_bytes
from moelora.models.decoder import MoeForCausalLM
from moelora.ops.plan import KernelPlan
from moelora.outputs import Logprobs, RequestDelta
from moelora.parallel.launch import WorkerGroup
from moelora.sampling_params import SamplingParams

_LOG = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """A step whose work is queued and whose choices the host has not read yet."""

    seqs: list[Sequence]  # the sequences sampled, in the order of the choices' rows
    sampled: PendingSample
    start: float  # perf_counter before it was scheduled
    num_seqs: int  # sequences the step ran (some may have ended before their row was sampled)
    prefill: int
    decode: int
    adapters: int


_STEP_LOG = 1 << 16  # steps whose StepRecord is kept (8.5 MiB when full)
_MIN_STEP_TOKENS = 8192  # the default step budget (without chunked prefill at least max_model_len)


def _step_tokens(args: EngineArgs, model_len: int, chunked: bool) -> int:
    """The most tokens a step runs: the given budget, else _MIN_STEP_TOKENS with chunked prefill, else
    max(_MIN_STEP_TOKENS, model_len) (a whole prompt of the longest length in one step)."""
    if args.max_num_batched_tokens:
        return args.max_num_batched_tokens
    return _MIN_STEP_TOKENS if chunked else max(_MIN_STEP_TOKENS, model_len)


def _size(num_bytes: int) -> str:
    """Bytes for a message: GiB, or MiB below a tenth of one."""
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 / 10 else f"{num_bytes / 2**20:.1f} MiB"


class Engine:
    """Continuous-batching generation over a paged KV cache: the life cycle of requests (inbox,
    scheduling, sampling, stop rules, outputs). What runs on the device, on every rank, is the
    executor's."""

    def __init__(
        self,
        model: MoeForCausalLM,
        tokenizer: Any | None,
        args: EngineArgs | None = None,
        *,
        seed: int = 0,
        eos_token_ids: tuple[int, ...] = (),
        lora_rank: int | None = None,
        lora_args: LoraArgs | None = None,
        workers: WorkerGroup | None = None,
    ) -> None:
        """`lora_rank`: the adapter slots' rank, or None for no adapter support (no memory reserved).
        `workers`: the other TP ranks (this process is rank 0); the executor sends them every command."""
        self.model, self.tokenizer, self.args = model, tokenizer, args or EngineArgs()
        self.cfg, self.seed = model.cfg, seed
        self.eos_token_ids = tuple(sorted(set(eos_token_ids) | set(model.cfg.eos_token_ids)))
        self.device = device = next(model.parameters()).device
        la = lora_args or LoraArgs()
        self.chunked_prefill = self.args.enable_chunked_prefill
        # Linear-attention states kept at the end of cached prefixes (prefix caching needs them there)
        self.state_snapshots = snapshot_slots(
            model.cfg.linear is not None,
            self.args.enable_prefix_caching,
            self.chunked_prefill,
            self.args.state_snapshots,
        )
        self.adapters = (
            None if lora_rank is None else EngineAdapters(model, la, lora_rank, free_memory(device))
        )
        self.loras = self.adapters.manager if self.adapters is not None else None
        plan = self._plan(lora_rank, la)
        self.executor = Executor(model, plan, workers=workers)
        self._in_flight: _InFlight | None = None
        self.allocator = BlockAllocator(plan.num_blocks)
        a = self.args
        step_tokens = _step_tokens(a, self.max_model_len, self.chunked_prefill)
        fits = self.loras.fits if self.loras is not None else (lambda adapters: True)
        self.scheduler = Scheduler(
            self.allocator,
            a.block_size,
            a.max_num_seqs,
            step_tokens,
            fits,
            a.enable_prefix_caching,
            state_slots=self.cfg.linear is not None,
            chunked_prefill=self.chunked_prefill,
            long_prefill_token_threshold=a.long_prefill_token_threshold,
            state_snapshots=self.state_snapshots,
        )
        if self.cfg.linear is not None and a.enable_prefix_caching and not self.state_snapshots:
            _LOG.info(
                "prefix caching is off for this model: its linear-attention layers need their states at "
                "the end of a cached prefix, which are kept with chunked prefill and state_snapshots > 0"
            )

        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._streams: dict[str, RequestStream] = {}
        self._requests: dict[str, Request] = {}  # loop thread only
        self._step_log: deque[StepRecord] = deque(maxlen=_STEP_LOG)  # appended by the loop thread
        self._error: BaseException | None = None
        self._stopping = False
        self._stop_reason = ""
        self._thread = threading.Thread(target=self._loop, name="moelora-engine", daemon=True)
        self._thread.start()

    def _plan(self, lora_rank: int | None, la: LoraArgs) -> ExecutorPlan:
        """The KV cache from the memory budget (the model's length limit checked against it), and what
        every rank builds."""
        a, cfg, model = self.args, self.cfg, self.model
        kv_heads, k_dim, v_dim = model.kv_layout()
        kv_layers = sum(model.kv_layers())
        per_block = KVCache.bytes_per_block(kv_layers, a.block_size, kv_heads, k_dim, model.dtype, v_dim)
        wanted_len = a.max_model_len or cfg.max_position_embeddings
        slots = la.max_loras_per_batch if lora_rank is not None else 0
        adapter_slots = pool_bytes(model, slots, lora_rank) if lora_rank is not None else 0
        # linear attention's state slots: the running sequences', then the cached prefixes' snapshots
        state = (a.max_num_seqs + self.state_snapshots) * model.state_bytes_per_slot()
        pool = adapter_slots + state  # both made after the cache

        def blocks_for(model_len: int) -> int:
            """The cache's blocks with the largest step of a `model_len` limit kept free."""
            step = _step_tokens(a, model_len, self.chunked_prefill)
            activations = activation_bytes(cfg, step, a.max_num_seqs, model.dtype)
            return plan_kv_blocks(a, per_block, model_len, self.device, activations, pool)

        num_blocks = blocks_for(wanted_len)
        capacity = num_blocks * a.block_size
        if capacity < wanted_len and a.max_model_len is None and a.max_num_batched_tokens is None:
            # The model's own limit does not fit: its longest prompt, and so the largest step, is what the
            # cache holds; a smaller step's reserve leaves room for a longer cache (a fixed point).
            fitted, blocks = fit_model_len(blocks_for, a.block_size, wanted_len)
            if fitted > capacity:
                _LOG.warning(
                    "max_model_len lowered to %d (the model allows %d): the memory left after the weights "
                    "and adapter slots holds that many tokens of KV cache beside a step of that many "
                    "tokens; give max_model_len, max_num_batched_tokens or kv_cache_memory to choose",
                    fitted, wanted_len,
                )  # fmt: skip
                num_blocks, capacity, wanted_len = blocks, fitted, fitted
        step_tokens = _step_tokens(a, wanted_len, self.chunked_prefill)
        activations = activation_bytes(cfg, step_tokens, a.max_num_seqs, model.dtype)
        if num_blocks < 1 or (a.max_model_len is not None and a.max_model_len > capacity):
            taken = [f"{_size(free_memory(self.device))} free after the weights"]
            if adapter_slots:
                taken.append(f"adapter slots {_size(adapter_slots)} ({slots} of rank {lora_rank})")
            if state:
                taken.append(
                    f"linear-attention state {_size(state)} ({a.max_num_seqs} sequences, "
                    f"{self.state_snapshots} snapshots)"
                )
            if self.device.type == "cuda":
                taken.append(
                    f"at least {_size(reserve_bytes(activations))} kept for the activations of a step of "
                    f"{step_tokens} tokens"
                )
            source = "" if a.max_model_len is not None else " (the model's max_position_embeddings)"
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {a.block_size} tokens ({capacity} tokens, "
                f"{per_block} bytes per block), too few for max_model_len {wanted_len}{source}; "
                f"{', '.join(taken)}: lower max_model_len, max_num_batched_tokens, max_loras_per_batch, "
                f"max_lora_rank or max_num_seqs, or give kv_cache_memory or num_kv_blocks"
            )
        self.max_model_len = min(wanted_len, capacity)
        _LOG.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB); a step of up to %d tokens needs about %.2f GiB "
            "of activations (kept free on CUDA)",
            num_blocks, a.block_size, num_blocks * per_block / 2**30, step_tokens, activations / 2**30,
        )  # fmt: skip
        # With TP x EP every rank captures its own graphs at the same steps (all see the same StepInput),
        # the all-reduces inside them.
        graphs = a.cuda_graphs and ops.graph_safe(next(model.parameters()))
        return ExecutorPlan(
            num_blocks=num_blocks,
            block_size=a.block_size,
            lora_slots=slots,
            lora_rank=lora_rank or 0,
            graphs=graphs,
            max_num_seqs=a.max_num_seqs,
            max_blocks=-(-self.max_model_len // a.block_size),
            state_snapshots=self.state_snapshots,
        )

    # ------------------------------------------------------------------ adapters (any thread)

    def _require_adapters(self, wanted: str | None = None) -> EngineAdapters:
        if self.adapters is None:
            what = f"unknown adapter '{wanted}': " if wanted is not None else ""
            raise ValueError(
                f"{what}adapters are off: start with lora_modules={{...}} or enable_lora=True "
                "(CLI: --lora or --enable-lora)"
            )
        return self.adapters

    def _require_loras(self, wanted: str | None = None) -> LoraManager:
        return self._require_adapters(wanted).manager

    def load_lora(self, name: str, source: str | Path | DummyLora, pinned: bool = False) -> None:
        """Read, validate and register an adapter (a PEFT folder, or a DummyLora made in memory); safe
        while requests run (they are not disturbed)."""
        entry = self._require_adapters().load(name, source, pinned)
        if pinned:
            self._inbox.put(("pin", entry))
            self._wake.set()

    def read_adapter(self, name: str, source: str | Path | DummyLora, max_rank: int | None) -> LoraAdapter:
        """The adapter `source` holds, validated against this model (nothing registered)."""
        return self._require_adapters().read(name, source, max_rank)

    def unload_lora(self, name: str) -> None:
        """New requests for `name` fail from now on; requests already running on it finish first."""
        self._require_loras().unregister(name)
        self._inbox.put(("collect", None))
        self._wake.set()

    def list_loras(self) -> list[LoraInfo]:
        return self.loras.info() if self.loras is not None else []

    # ------------------------------------------------------------------ caller side (any thread)

    def submit(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        lora: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; returns its id. Its deltas arrive on `stream(request_id)`."""
        items = [(prompt, sampling_params, lora)]
        (stream,) = self._submit(items, [request_id], claimed=False)
        return stream.request_id

    def submit_stream(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        lora: str | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Like `submit`, returning the request's stream."""
        (stream,) = self.submit_many([(prompt, sampling_params, lora)], [request_id])
        return stream

    def submit_many(
        self,
        items: Seq[tuple[Prompt, SamplingParams | None, str | None]],
        request_ids: Seq[str | None] | None = None,
        *,
        text_deltas: bool = True,
    ) -> list[RequestStream]:
        """Queue (prompt, params, adapter) requests that the loop admits together, in order; all or none:
        if one is invalid (its error is raised) none is queued. `text_deltas=False`: the caller reads only
        each request's whole output (`RequestStream.result()`): the stream gets no delta per token, only
        the last one, and a request without stop strings has its text decoded once, by `result()` in the
        caller's thread, instead of token by token on the engine's loop."""
        return self._submit(items, request_ids, claimed=True, text_deltas=text_deltas)

    def _submit(
        self,
        items: Seq[tuple[Prompt, SamplingParams | None, str | None]],
        request_ids: Seq[str | None] | None,
        claimed: bool,
        text_deltas: bool = True,
    ) -> list[RequestStream]:
        self._check_alive()
        ids = list(request_ids) if request_ids is not None else [None] * len(items)
        requests: list[Request] = []
        try:
            for (prompt, params, lora), rid in zip(items, ids, strict=True):
                requests.append(self._prepare(prompt, params or SamplingParams(), lora, rid, text_deltas))
        except BaseException:
            for request in requests:
                self._unprepare(request)
            raise
        for request in requests:
            request.stream.claimed = claimed
        self._inbox.put(("submit", requests))
        self._wake.set()
        return [r.stream for r in requests]

    def _prepare(
        self,
        prompt: Prompt,
        params: SamplingParams,
        lora: str | None,
        request_id: str | None,
        text_deltas: bool = True,
    ) -> Request:
        """A validated request with its stream registered and its adapter counted (not yet queued)."""
        text, ids = self._tokenize(prompt)
        room = self.max_model_len - len(ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens {params.max_tokens} is more than the {room} tokens the context leaves after "
                f"the prompt's {len(ids)} (max_model_len {self.max_model_len}): ask for at most {room}",
                "max_tokens",
            )
        entry = self._require_loras(lora).use(lora) if lora is not None else None
        with self._lock:
            n = next(self._counter)
            rid = request_id if request_id is not None else f"req-{n}"
            if rid in self._streams:
                if entry is not None and self.loras is not None:
                    self.loras.release(entry)
                raise ValueError(f"request id '{rid}' is already in use")
            stream = RequestStream(rid, self._forget)
            self._streams[rid] = stream
        request = Request(rid, text, ids, params, lora, stream, arrival=n, lora_entry=entry)
        request.seqs = [self._new_sequence(request, i, text_deltas) for i in range(params.n)]
        request.whole_output = not text_deltas
        detoks = [s.detokenizer for s in request.seqs]
        if all(d.deferred for d in detoks):
            # The whole text of each completion, decoded once by the consumer after the request ended
            # (not on the engine's loop, where 256 completions ending in one step held it for ~10 ms).
            stream.final_texts = lambda: [d.final_text() for d in detoks]
        return request

    def _unprepare(self, request: Request) -> None:
        """Undo `_prepare` for a request that was never queued."""
        self._forget(request.request_id)
        if request.lora_entry is not None and self.loras is not None:
            self.loras.release(request.lora_entry)

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def load(self) -> EngineLoad:
        """What the engine holds now (for metrics and admission; safe from any thread)."""
        loras = self.loras
        return EngineLoad(
            alive=self._thread.is_alive() and self._error is None and not self._stopping,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.allocator.num_blocks - self.allocator.num_free,
            kv_blocks_total=self.allocator.num_blocks,
            lora_slots_used=loras.slots_in_use if loras is not None else 0,
            lora_slots_total=loras.num_slots if loras is not None else 0,
            prefix_cache_hits=self.allocator.hits,
        )

    def capture_graphs(self) -> int:
        """Capture the decode CUDA graphs of every batch size now (with adapters too when adapters are
        on) instead of at each size's first step; the number captured (0 when graphs are not used)."""
        return self.executor.capture_graphs(lora=self.loras is not None)

    def use_plan(self, spec: str) -> KernelPlan:
        """Run later steps with the kernel plan `spec` gives (`MOELORA_PLAN` syntax, applied to the plan
        the process started with; "" restores it), on every rank; the decode graphs are captured again
        (at their next step, or all at once by `capture_graphs`). Only while no request is in the engine,
        so that no request runs under two plans. For comparing plans in one process (`moelora bench
        latency --plan-variants`)."""
        with self._lock:
            if self.scheduler.has_work():
                raise RuntimeError("use_plan: requests are running or waiting; change the plan between them")
            return self.executor.use_plan(spec)

    def forward_logits(self, ids: list[int], seq_lens: tuple[int, ...]) -> torch.Tensor:
        """A cacheless forward pass of prompts given flat (every rank): fp32 logits [len(ids), V]."""
        return self.executor.forward_logits(ids, seq_lens)

    def step_records(self, since: float = 0.0) -> list[StepRecord]:
        """The most recent steps (up to 65,536) that started at or after `since` (a perf_counter time)."""
        with self._lock:
            return [r for r in self._step_log if r.start >= since]

    def stream(self, request_id: str) -> RequestStream:
        """The stream of a request submitted with `submit` (once: the engine then forgets the id when the
        request ends); a request whose stream was never asked for stays known until it is."""
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None:
                raise KeyError(f"no running request '{request_id}'")
            stream.claimed = True
            if stream.finished:
                del self._streams[request_id]
            return stream

    def abort(self, request_id: str) -> None:
        """Stop a request: its completions finish with reason "abort" and its KV blocks are freed."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def shutdown(self, reason: str = "the engine was shut down before the request finished") -> None:
        """Stop the loop; requests still running end with an EngineDeadError saying `reason`."""
        if not self._stopping:
            self._stop_reason = reason
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def release(self) -> None:
        """After shutdown: drop the device memory the engine holds (CUDA graphs and their pool, the KV
        cache, the adapter slots' contents) even if something still references the engine."""
        if self._thread.is_alive():
            raise RuntimeError("release() needs the engine loop stopped: call shutdown() first")
        self.executor.release()

    def failure(self) -> str | None:
        """Why the engine no longer runs (a loop error, or shutdown); None while it runs."""
        if self._error is not None:
            return f"the engine stopped after an error: {self._error!r}"
        return self._stop_reason if self._stopping else None

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._error!r}") from self._error
        if self._stopping:
            raise EngineDeadError("the engine has been shut down")

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        ids = encode_prompt(self.tokenizer, prompt, self.cfg.vocab_size)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, which must leave "
                f"room for at least one generated token",
                "prompt",
            )
        return (prompt if isinstance(prompt, str) else None), ids

    def _new_sequence(self, request: Request, index: int, text_deltas: bool = True) -> Sequence:
        p = request.params
        # Unseeded requests get a seed from the engine seed and their place in the submission order, so
        # a script submitting the same requests in the same order samples the same text at any timing.
        seed = p.seed + index if p.seed is not None else derived_seed(self.seed, request.arrival, index)
        detok = IncrementalDetokenizer(
            self.tokenizer,
            request.prompt_token_ids,
            p.stop,
            p.skip_special_tokens,
            p.min_tokens,
            deferred=not text_deltas,
        )
        seq = Sequence(request, index, list(request.prompt_token_ids), detok, seed)
        if p.logprobs is not None:
            seq.logprobs = []
        return seq

    # ------------------------------------------------------------------ loop thread

    def _loop(self) -> None:
        try:
            torch.set_grad_enabled(False)
            while not self._stopping:
                self._drain_inbox()
                if not self.scheduler.has_work():
                    if self._in_flight is not None:  # (it ended its sequences: nothing left to run)
                        self._finish_in_flight()
                        continue
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self.step()
        except BaseException as e:  # the loop must never die silently: every request learns why
            _LOG.exception("engine loop failed")
            self._error = e
        self._drain_inbox()
        for request in list(self._requests.values()):
            request.stream.put(EngineDeadError(f"request failed: {self.failure()}"))
            if request.lora_entry is not None and self.loras is not None:
                self.loras.release(request.lora_entry)
        self._requests.clear()
        with self._lock:
            self._streams.clear()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                for request in item:
                    self._requests[request.request_id] = request
                    # Completion 0 computes the prompt; the others start from its cached blocks (_fork).
                    first, *request.forks = request.seqs
                    self.scheduler.add(first)
            elif kind == "abort" and item in self._requests:
                self._abort(self._requests[item])
            elif kind == "pin" and self.adapters is not None:
                running = {s.request.lora_entry for s in self.scheduler.running if s.request.lora_entry}
                self.adapters.place_pinned(item, running, self.executor)
            elif kind == "collect" and self.adapters is not None:
                self.adapters.collect(self.executor)

    def _fail(self, request: Request, error: BaseException) -> None:
        """End a request with an error (its stream raises it); its blocks and adapter reference are freed."""
        for seq in request.seqs:
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq)
        request.stream.put(error)
        self._retire(request)

    def _retire(self, request: Request) -> None:
        """Forget a request that has ended, for whatever reason (its stream entry too, once a consumer
        holds the stream); free its adapter once an unloaded adapter has no user left."""
        self._requests.pop(request.request_id, None)
        if request.stream.claimed:
            self._forget(request.request_id)
        entry = request.lora_entry
        if entry is not None and self.adapters is not None:
            self.adapters.manager.release(entry)
            if entry.unloaded:
                self.adapters.collect(self.executor)

    def _abort(self, request: Request) -> None:
        for seq in request.seqs:
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
                self._emit(seq, [], [], None, "")

    def step(self) -> None:
        """One scheduling step: run the scheduled sequences one token further. With async scheduling the
        step is queued on the device before the previous step's choices are read (its sequences' last
        tokens are fed on the device), and its own choices are read by the next call: the host's work
        of one step runs while the device computes the next."""
        start = time.perf_counter()
        scheduled = self.scheduler.schedule()
        # A sequence whose token in flight is certainly its last (its length limit) runs no further.
        num_new = {id(s): n for s, n in zip(scheduled.seqs, scheduled.num_new, strict=True)}
        seqs = [s for s in scheduled.seqs if not self._ends_with_pending(s)]
        if seqs and self.adapters is not None:
            entries = dict.fromkeys(s.request.lora_entry for s in seqs if s.request.lora_entry is not None)
            failed = self.adapters.acquire(list(entries), self.executor) if entries else {}
            for entry, error in failed.items():
                _LOG.error("%s", error)
                for request in [r for r in self._requests.values() if r.lora_entry is entry]:
                    self._fail(request, error)
            seqs = [s for s in seqs if s.request.lora_entry not in failed]
        # Linear-attention states of cached prefixes into the slots of the sequences starting after them
        # (before any step moves those slots on), and snapshots of the states this step leaves at a block
        # boundary worth keeping (queued right after it, before a later step moves them on)
        for src, dst in scheduled.restores:
            self.executor.copy_state(src, dst)
        ran = {id(s) for s in seqs}
        for seq in scheduled.snapshots:
            if id(seq) not in ran:
                self.scheduler.drop_snapshot(seq)
        if not seqs:
            self._finish_in_flight()
            return
        step = step_input(seqs, self.args.block_size, [num_new[id(s)] for s in seqs])
        prefill = sum(n for s, n in zip(seqs, step.seq_lens, strict=True) if s.num_cached < s.num_prompt)
        previous = self._in_flight
        logits, prompt_logits = self.executor.step(step, previous.sampled.tokens if previous else None)
        for seq in scheduled.snapshots:
            if seq.snapshots and id(seq) in ran:
                self.executor.copy_state(seq.state_slot, seq.snapshots[-1][1])
        starts = [s.num_cached for s in seqs]
        for seq, n in zip(seqs, step.seq_lens, strict=True):
            seq.num_cached += n
        self._finish_in_flight()  # the host's work of the previous step, while the device runs this one
        for i, pl in prompt_logits.items():
            self._set_prompt_logprobs(seqs[i], pl, starts[i])
        # Sampled: the sequences not ended by the previous step whose prompt is all computed (one whose
        # prompt is computed in parts gets its first token after the last part).
        live = [i for i, s in enumerate(seqs) if s.status is Status.RUNNING and s.num_cached == s.num_tokens]
        for i in live:
            if seqs[i].request.forks and seqs[i].index == 0:  # its prompt was computed in this step
                self._fork(seqs[i], logits[i])
        if len(live) < len(seqs):
            logits = logits.index_select(0, to_device(live, torch.int64, logits.device))
        sampled_seqs = [seqs[i] for i in live]
        inputs = [
            SamplingInput(
                s.request.params,
                s.request.prompt_token_ids,  # the prompt itself (token_ids starts with it), not a copy
                s.output_ids,
                s.seed,
                self.eos_token_ids,
            )
            for s in sampled_seqs
        ]
        sampled = launch_sample(logits, inputs)
        for row, seq in enumerate(sampled_seqs):
            seq.pending = row
        adapters = len({s.request.lora_entry for s in seqs if s.request.lora_entry is not None})
        decode = len(step.ids) - prefill
        self._in_flight = _InFlight(sampled_seqs, sampled, start, len(seqs), prefill, decode, adapters)
        if not self.args.async_scheduling:
            self._finish_in_flight()

    def _ends_with_pending(self, seq: Sequence) -> bool:
        """Whether the token `seq` has in flight will end it by length (see `_append`)."""
        if seq.pending < 0:
            return False
        n, limit = seq.num_tokens, seq.request.params.max_tokens
        return n >= self.max_model_len or (limit is not None and n - seq.num_prompt >= limit)

    def _finish_in_flight(self) -> None:
        """Read the choices of the step in flight and hand them out (stop rules, streams, prefix cache)."""
        done, self._in_flight = self._in_flight, None
        if done is None:
            return
        for seq, sampled in zip(done.seqs, done.sampled.result(), strict=True):
            seq.pending = -1
            if seq.status is Status.FINISHED:  # aborted or failed while its token was on the way
                continue
            self.scheduler.cache_blocks(seq)
            self._append(seq, sampled)
        record = StepRecord(
            done.start, time.perf_counter(), done.num_seqs, done.prefill, done.decode, done.adapters
        )
        with self._lock:
            self._step_log.append(record)

    def _fork(self, first: Sequence, logits: torch.Tensor) -> None:
        """Start completions 1..n-1 from completion 0's freshly computed prompt: they share its full prompt
        blocks, get a copy of the last partial one (and of its linear-attention states), and draw their
        first token from the same logits. One that finds no room (sequence slots, a free block) waits and
        computes the prompt itself. The copies are queued right after the step that computed the prompt,
        before any step moves completion 0's states on."""
        request, n = first.request, first.num_prompt
        forks, request.forks = request.forks, []
        full, partial = divmod(n, self.args.block_size)
        for seq in forks:
            room = len(self.scheduler.running) < self.scheduler.max_num_seqs
            if not room or self.allocator.num_free < int(partial > 0):
                self.scheduler.add(seq)
                continue
            blocks = self.allocator.share(first.blocks[:full])
            if partial:
                (copy,) = self.allocator.allocate(1)
                self.executor.copy_block(first.blocks[full], copy)
                blocks.append(copy)
            seq.blocks, seq.num_cached, seq.num_registered = blocks, n, full
            self.scheduler.start_running(seq)
            if self.scheduler.states is not None:
                self.executor.copy_state(first.state_slot, seq.state_slot)
            inputs = [SamplingInput(request.params, seq.token_ids[:n], [], seq.seed, self.eos_token_ids)]
            (sampled,) = sample(logits[None], inputs)
            self._append(seq, sampled)

    def _set_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, start: int) -> None:
        """The prompt log-probs of positions start.. (the logits' rows: the tokens after them scored),
        appended to those of the positions before (a prompt computed in parts), or the first ones."""
        n = seq.request.params.prompt_logprobs or 0
        raw = logits.float().log_softmax(-1)
        targets = torch.tensor(seq.token_ids[start + 1 : start + 1 + raw.shape[0]], device=raw.device)
        actual = raw.gather(1, targets[:, None]).squeeze(1).tolist()
        top_vals, top_ids = raw.topk(n, dim=-1) if n else (raw[:, :0], raw[:, :0].long())
        earlier = seq.request.prompt_logprobs if start > 0 else None
        result: list[Logprobs | None] = [None] if earlier is None else earlier
        for tok, lp, ids, vals in zip(
            targets.tolist(), actual, top_ids.tolist(), top_vals.tolist(), strict=True
        ):
            entry = dict(zip(ids, vals, strict=True))
            entry[tok] = lp
            result.append(entry)
        seq.request.prompt_logprobs = result

    def _append(self, seq: Sequence, s: Sampled) -> None:
        p = seq.request.params
        seq.token_ids.append(s.token)
        new_logprobs = []
        if seq.logprobs is not None:
            entry = dict(s.top_logprobs or {})
            entry[s.token] = s.logprob
            seq.logprobs.append(entry)
            new_logprobs.append(entry)
        num_out = len(seq.token_ids) - seq.num_prompt
        stop_token = num_out > p.min_tokens - 1 and (
            (s.token in self.eos_token_ids and not p.ignore_eos) or s.token in p.stop_token_ids
        )
        text = "" if stop_token else seq.detokenizer.add(s.token)
        reason = None
        if stop_token or seq.detokenizer.stopped:
            reason = "stop"
        elif (p.max_tokens is not None and num_out >= p.max_tokens) or len(
            seq.token_ids
        ) >= self.max_model_len:
            reason = "length"
        if reason is not None:
            if not seq.detokenizer.stopped and not seq.detokenizer.deferred:
                text += seq.detokenizer.finish()
            seq.finish_reason = reason
            self.scheduler.finish(seq)
        self._emit(seq, [s.token], new_logprobs, reason, text)

    def _emit(
        self, seq: Sequence, tokens: list[int], logprobs: list[Logprobs], reason: str | None, text: str
    ) -> None:
        request = seq.request
        done = request.finished
        if request.whole_output and not done:
            return  # its consumer reads only the last delta's output
        prompt_logprobs = None
        if not request.prompt_logprobs_sent and request.prompt_logprobs is not None:
            prompt_logprobs, request.prompt_logprobs_sent = request.prompt_logprobs, True
        output = request.output() if done else None
        delta = RequestDelta(
            request.request_id,
            seq.index,
            tokens,
            text,
            logprobs if seq.logprobs is not None else None,
            reason,
            prompt_logprobs,
            done,
            output,
        )
        request.stream.put(delta)
        if done:
            self._retire(request)
