"""Timing helpers shared by the benchmarks: eager calls timed with CUDA events, CUDA-graph replays.

Benchmarks run as scripts (`python bench/x.py`), so they import this as `timing`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def events_us(fn: Callable[[], object], reps: int) -> float:
    """Mean time per call of `reps` back-to-back eager calls (after warm-up), host overhead included;
    wall-clock time without CUDA."""
    for _ in range(3):
        fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) * 1e6 / reps
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) * 1e3 / reps


def graph_us(fn: Callable[[], object], calls: int = 1, reps: int = 7, warm_ms: float = 20.0) -> float:
    """Median over `reps` replays of a CUDA graph of `calls` captured calls, per call. Before them: one
    eager call, then replays for about `warm_ms` of device time (at least three). The card's clocks drop
    while the host compiles and captures a variant; timed right after a few replays, a variant would be
    timed partly at the lower clocks. (A guess at part of the noise of the 2026-12-06 FP8 tile sweep, where
    variants one input split apart differed by up to 25% in a cell; not yet checked on a card.)"""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(3):
        graph.replay()
    end.record()
    end.synchronize()
    each_ms = max(begin.elapsed_time(end) / 3, 1e-3)
    for _ in range(min(10_000, int(warm_ms / each_ms))):
        graph.replay()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1e3 / calls)
    del graph
    return sorted(times)[len(times) // 2]
