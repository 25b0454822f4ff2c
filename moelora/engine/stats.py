"""`EngineLoad`: a snapshot of what the engine holds now, for metrics, health checks and admission;
`StepRecord`: when each engine step ran and what it computed, for benchmarks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLoad:
    """Counts read from another thread without pausing the loop: each is exact, but they may be a step
    apart."""

    alive: bool  # the loop runs and has not failed or been shut down
    running: int  # sequences in the running batch (a request with n completions has n)
    waiting: int  # sequences queued for prefill (new or preempted); requests still in the inbox not counted
    kv_blocks_used: int
    kv_blocks_total: int
    lora_slots_used: int  # device adapter slots holding an adapter
    lora_slots_total: int  # 0 when adapters are off
    prefix_cache_hits: int = 0  # KV blocks reused from the prefix cache since start


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One engine step as the loop thread saw it (`time.perf_counter()` seconds).

    `start`: before scheduling; `end`: once the step's tokens were read and handed to their streams
    (after the device finished the step's work; with async scheduling the next step was queued first).
    """

    start: float
    end: float
    num_seqs: int  # sequences in the step
    prefill_tokens: int  # prompt tokens computed (new or preempted sequences)
    decode_tokens: int  # sequences that ran one generated token
    num_adapters: int  # distinct adapters in the step (base requests not counted)
