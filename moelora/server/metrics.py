"""Prometheus metrics: engine state read at scrape time, request timings observed as tokens stream out.

Each app has its own registry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from moelora.engine.engine import Engine
from moelora.outputs import RequestDelta

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineCollector(Collector):
    """Gauges of the engine's load and the adapter manager's counters, read when Prometheus scrapes."""

    def __init__(self, engine: Engine, pending: _Pending) -> None:
        self.engine, self.pending = engine, pending

    def collect(self) -> Iterator[Metric]:
        load = self.engine.load()
        gauges = {
            "moelora_requests_running": ("sequences in the running batch", load.running),
            "moelora_requests_waiting": ("sequences queued for prefill", load.waiting),
            "moelora_requests_pending": ("requests waiting for their first token", self.pending.count),
            "moelora_kv_blocks_used": ("KV cache blocks held by sequences", load.kv_blocks_used),
            "moelora_kv_blocks_total": ("KV cache blocks", load.kv_blocks_total),
            "moelora_lora_slots_used": ("device adapter slots holding an adapter", load.lora_slots_used),
            "moelora_lora_slots_total": ("device adapter slots", load.lora_slots_total),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "moelora_prefix_cache_hits", "KV blocks reused from the prefix cache", load.prefix_cache_hits
        )
        loras = self.engine.loras
        if loras is None:
            return
        stats = loras.stats
        yield CounterMetricFamily("moelora_lora_loads", "adapter writes into a device slot", stats.loads)
        yield CounterMetricFamily(
            "moelora_lora_evictions", "adapters evicted from a device slot", stats.evictions
        )
        per_adapter = CounterMetricFamily(
            "moelora_lora_requests", "requests submitted per adapter", labels=["adapter"]
        )
        for name, count in sorted(stats.requests.items()):
            per_adapter.add_metric([name], count)
        yield per_adapter


class _Pending:
    """Requests submitted whose first token has not come yet (what --max-waiting bounds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def try_add(self, limit: int, n: int = 1) -> bool:
        """Count n more sequences if that stays within `limit`."""
        with self._lock:
            if self.count + n > limit:
                return False
            self.count += n
            return True

    def done(self, n: int = 1) -> None:
        with self._lock:
            self.count -= n


class ServerMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.pending = _Pending()
        self.registry.register(_EngineCollector(engine, self.pending))
        self.requests = Counter(
            "moelora_requests", "requests accepted per model name", ["model"], registry=self.registry
        )
        self.prompt_tokens = Counter("moelora_prompt_tokens", "prompt tokens", registry=self.registry)
        self.generated_tokens = Counter(
            "moelora_generation_tokens", "generated tokens", registry=self.registry
        )
        self.ttft = Histogram(
            "moelora_time_to_first_token_seconds",
            "from request arrival to its first generated token",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "moelora_inter_token_latency_seconds",
            "between consecutive tokens of one completion",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )

    def forget_model(self, name: str) -> None:
        """Drop an unloaded adapter's request series (no series outlives its adapter)."""
        with contextlib.suppress(KeyError):  # no request named it
            self.requests.remove(name)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, sequences: int = 1) -> RequestTimer:
        return RequestTimer(self, sequences)


class RequestTimer:
    """Times one engine request from arrival: first token (TTFT) and the gaps between tokens (ITL)."""

    def __init__(self, metrics: ServerMetrics, sequences: int = 1) -> None:
        self.metrics, self.sequences = metrics, sequences
        self.start = time.perf_counter()
        self._last: dict[int, float] = {}  # completion index -> time of its latest token
        self._pending = True

    def on_delta(self, delta: RequestDelta) -> None:
        if delta.output is not None:
            self.metrics.prompt_tokens.inc(len(delta.output.prompt_token_ids))
        if not delta.token_ids:
            return
        now = time.perf_counter()
        if self._pending:
            self._pending = False
            self.metrics.pending.done(self.sequences)
            self.metrics.ttft.observe(now - self.start)
        last = self._last.get(delta.index)
        if last is not None:
            self.metrics.itl.observe((now - last) / len(delta.token_ids))
        self._last[delta.index] = now
        self.metrics.generated_tokens.inc(len(delta.token_ids))

    def close(self) -> None:
        """The request ended (finished, failed or aborted): it no longer counts as pending."""
        if self._pending:
            self._pending = False
            self.metrics.pending.done(self.sequences)
