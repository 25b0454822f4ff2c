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


def graph_us(fn: Callable[[], object], calls: int = 1, reps: int = 7) -> float:
    """Median over `reps` replays of a CUDA graph of `calls` captured calls (after one eager warm-up call
    and three replays), per call."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
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
