"""`bench latency --profile`: a torch profile of a row's decode steps, each kernel's time a step and its share
of the step's wall time on the card (from the profiler's device events), and the host time of the steps."""

from __future__ import annotations

import heapq
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from moelora.benchmark.report import percentile
from moelora.benchmark.session import Session
from moelora.benchmark.workload import Mix
from moelora.ops.plan import TUNED
from moelora.sampling_params import SamplingParams


@dataclass
class DecodeProfile:
    """Each kernel's time a decode step, us by name (`kernel_us`), and on a GPU its share of the step's wall
    time (`chain_us`, `chain_shares`); `between_replays`: the steps taken between CUDA-graph replays
    (`replay_steps`), else a profiled run less a prefill-only run (`per_decode_step`)."""

    kernel_us: dict[str, float] = field(default_factory=dict)
    chain_us: dict[str, float] = field(default_factory=dict)
    between_replays: bool = False


def profile_decode(session: Session, batch: int, mix: Mix, folder: Path, stem: str) -> DecodeProfile:
    """A torch.profiler table of one more run of `batch` fresh prompts of the mix (8 new tokens), by device
    time, into folder/stem.txt (and the chrome trace on a GPU); and each kernel's time a decode step."""
    from torch.profiler import ProfilerActivity, profile

    llm, w = session.llm, session.workload
    new_tokens = min(8, w.output_len)
    params = SamplingParams(temperature=w.temperature, max_tokens=new_tokens, ignore_eos=True)
    activities = [ProfilerActivity.CPU]
    if llm.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    prompts, loras = session.prompts.make(batch), mix.assign(batch)
    out = DecodeProfile()
    with profile(activities=activities) as prof:
        llm.generate(prompts, params, lora=loras)
    decode_steps = new_tokens - 1
    events = device_events(prof) if llm.device.type == "cuda" else []
    replays = replay_steps(events)
    if replays is not None:  # whole decode steps between graph replays: the prefill is not in them
        window, steps = replays
        kernels: dict[str, float] = {}
        for e in window:
            kernels[e.label] = kernels.get(e.label, 0.0) + (e.end - e.start) / steps
        out.kernel_us = kernels
        out.chain_us = {name: t / steps for name, t in chain_shares(window).items()}
        out.between_replays = True
    elif decode_steps:  # a prefill alone (fresh prompts of the same length: no cached prefix), to subtract
        first = SamplingParams(temperature=w.temperature, max_tokens=1, ignore_eos=True)
        with profile(activities=activities) as prefill_prof:
            llm.generate(session.prompts.make(batch), first, lora=loras)
        out.kernel_us = per_decode_step(
            _self_times(prof, llm.device.type), _self_times(prefill_prof, llm.device.type), decode_steps
        )
    key = "self_cuda_time_total" if llm.device.type == "cuda" else "self_cpu_time_total"
    folder.mkdir(parents=True, exist_ok=True)
    text = prof.key_averages().table(sort_by=key, row_limit=40)
    if llm.device.type == "cuda" and _dependent_launches(llm.device):
        text = (
            "Kernels launched as programmatic dependents (PDL): each decode kernel starts during the one "
            "before and its time includes that wait; MOELORA_PDL=0 for each kernel's own time.\n" + text
        )
    if llm.device.type == "cuda":
        prof.export_chrome_trace(str(folder / f"{stem}.json"))
        # From the profiler's own events: the chrome trace torch 2.11 + CUDA 13 wrote on the H100
        # (2026-12-06) had every timestamp and duration 0.
        text += "\n" + timeline_summary(events)
        if decode_steps and replays is None:
            prefill_shares = chain_shares(device_events(prefill_prof))
            out.chain_us = per_decode_step(chain_shares(events), prefill_shares, decode_steps)
    text += "\n" + host_profile(llm, prompts, params, loras)
    (folder / f"{stem}.txt").write_text(text)
    return out


GRAPH_KERNELS = 8  # a launch that put at least this many kernels on the card: a CUDA-graph replay


def replay_steps(events: list[DeviceEvent]) -> tuple[list[DeviceEvent], int] | None:
    """The device events of whole decode steps in a profiled run (`device_events`), and how many steps:
    from the first CUDA-graph replay's first kernel to the last replay's first kernel, so each step is a
    replay, what ran after it (sampling, copies) and the card's idle time before the next. None with fewer
    than two replays (decode run eagerly: `per_decode_step` then subtracts a prefill-only run). The
    prefill, run eagerly before the first replay, is not in the window, where subtracting a second run's
    prefill left its kernels and idle times in the tables whenever the two prefills differed (the 24th
    session's profiles: a `(card idle)` row of 271 us a step in one column and none in the other)."""
    kernels: dict[int, int] = {}
    first: dict[int, DeviceEvent] = {}
    for e in events:
        kernels[e.correlation] = kernels.get(e.correlation, 0) + 1
        if e.correlation not in first or e.start < first[e.correlation].start:
            first[e.correlation] = e
    starts = sorted(first[c] for c, n in kernels.items() if n >= GRAPH_KERNELS)
    if len(starts) < 2:
        return None
    lo, last = starts[0].start, starts[-1]
    # The last replay's first kernel as a mark of no length at the end: the idle time before it counts.
    mark = last._replace(end=last.start)
    return [*(e for e in events if lo <= e.start < last.start), mark], len(starts) - 1


def per_decode_step(run: dict[str, float], prefill: dict[str, float], steps: int) -> dict[str, float]:
    """Each kernel's time a decode step: its time in a run of a prefill and `steps` decode steps less its
    time in a prefill alone, over the steps; kernels that took no decode time left out."""
    out = {name: (t - prefill.get(name, 0.0)) / steps for name, t in run.items()}
    return {name: t for name, t in out.items() if t > 0}


IDLE = "(card idle)"


class DeviceEvent(NamedTuple):
    """A kernel, copy or memset on the card in a profile: start and end (us), name, and the correlation id
    of the host launch that put it there (a CUDA-graph replay's kernels share one)."""

    start: float
    end: float
    name: str
    correlation: int
    grid: str = ""  # a kernel's grid, "80x1x1", where the profiler gives it

    @property
    def label(self) -> str:
        """Its name in the tables: with its grid where known, so that one kernel launched at several sizes
        (the linear layer's q/k/v and o, say) shows as several rows."""
        if not self.grid:
            return self.name
        name = self.name if len(self.name) <= 48 else self.name[:45] + "..."
        return f"{name} ({self.grid})"


def device_events(prof: Any) -> list[DeviceEvent]:
    """The device's kernels, copies and memsets of a torch profile, in start order (not its annotation
    ranges, which span many kernels)."""
    out = []
    for e in prof.profiler.kineto_results.events():
        if _on_device(e):
            start = e.start_ns() / 1e3
            end = start + e.duration_ns() / 1e3
            out.append(DeviceEvent(start, end, e.name(), e.correlation_id(), _grid(e)))
    return sorted(out)


def _grid(event: Any) -> str:
    """A profiler event's kernel grid as "AxBxC", from the metadata the trace's "grid" comes from ("" where
    it has none: a copy, or a torch without the accessor)."""
    meta = getattr(event, "metadata_json", None)
    found = re.search(r'"grid":\s*\[\s*(\d+),\s*(\d+),\s*(\d+)\s*\]', meta() if meta is not None else "")
    return "x".join(found.groups()) if found else ""


def _on_device(event: Any) -> bool:
    """Whether a profiler event is a kernel, copy or memset on the card. torch 2.13 names an event's
    activity; torch 2.11 (the GPU machine's) only gives its device type, which a GPU annotation range
    shares."""
    if hasattr(event, "activity_type"):
        return event.activity_type() in ("kernel", "gpu_memcpy", "gpu_memset")
    from torch.autograd import DeviceType

    annotation = getattr(event, "is_user_annotation", None)
    return event.device_type() == DeviceType.CUDA and not (annotation and annotation())


def chain_shares(events: list[DeviceEvent]) -> dict[str, float]:
    """Each kernel's share of the card's wall time, us by name: every instant goes to the running device
    event that ends first, or when none runs to "IDLE before <the event that starts next>" (which launch
    the card waited for); the shares add up to the span from the first start to the last end. With PDL a
    kernel starts during the one before and waits: that time goes to the one before, so a kernel's share
    is how far it moved the step's end past its predecessor's, where its own duration would count the
    wait."""
    device = sorted(events)
    shares: dict[str, float] = {}
    running: list[tuple[float, int, str]] = []  # (end, index, name): a heap, the first to end on top
    times = sorted({t for e in device for t in (e.start, e.end)})
    i = 0
    for a, b in itertools.pairwise(times):
        while i < len(device) and device[i].start <= a:
            heapq.heappush(running, (device[i].end, i, device[i].label))
            i += 1
        while running and running[0][0] <= a:
            heapq.heappop(running)
        name = running[0][2] if running else f"{IDLE} before {device[i].label}"
        shares[name] = shares.get(name, 0.0) + (b - a)
    return shares


def _self_times(prof: Any, device_type: str) -> dict[str, float]:
    """Each kernel's (on a CPU, each op's) own time in a profile, us, by name."""
    attr = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    times: dict[str, float] = {}
    for event in prof.key_averages():
        t = float(getattr(event, attr, 0.0) or 0.0)
        if t > 0:
            times[event.key] = times.get(event.key, 0.0) + t
    return times


def _dependent_launches(device: Any) -> bool:
    """Whether the decode kernels on `device` run as programmatic dependent launches (the plan's `pdl`)."""
    from moelora.ops.triton.common import dependent_launch  # (Triton: only with a GPU)

    return dependent_launch(device, TUNED.pdl)


def host_profile(llm: Any, prompts: list[Any], params: SamplingParams, loras: list[Any]) -> str:
    """cProfile of the engine's steps (in its loop thread) over one more run of the row: where the host
    time of a step goes, by function (own time first)."""
    import cProfile
    import io
    import pstats

    engine = llm.engine
    prof = cProfile.Profile()
    step = engine.step

    def profiled_step() -> None:
        prof.enable()  # in the loop thread, which is the one a Profile records
        try:
            step()
        finally:
            prof.disable()

    engine.step = profiled_step
    try:
        llm.generate(prompts, params, lora=loras)
    finally:
        del engine.step  # the class's own method again
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    return "host time of the engine's steps (cProfile, one run):\n" + out.getvalue()


def timeline_summary(events: list[DeviceEvent]) -> str:
    """Where a step's wall time goes on the device (`device_events`): for each launch that put several
    kernels on the card (a CUDA-graph replay, above all), the span of its kernels, the time the card was
    busy inside that span, its kernel count, and the idle time since the previous launch's last kernel."""
    by_launch: dict[int, list[DeviceEvent]] = {}
    for e in events:
        by_launch.setdefault(e.correlation, []).append(e)
    groups = sorted((sorted(g) for g in by_launch.values() if len(g) > 1), key=lambda g: g[0].start)
    lines = [
        "launches of several kernels (graph replays), us:",
        "kernels   span   busy  busy/span  gap p50  idle before",
    ]
    prev_end = None
    for g in groups:
        start, end = g[0].start, max(e.end for e in g)
        busy, cursor, gaps = 0.0, start, []
        for e in g:  # the union of the kernels' intervals (they may overlap on several streams)
            gaps.append(max(0.0, e.start - cursor))
            lo = max(e.start, cursor)
            if e.end > lo:
                busy += e.end - lo
                cursor = e.end
        idle = f"{start - prev_end:.0f}" if prev_end is not None else "-"
        gap = percentile(gaps[1:], 50) if len(gaps) > 1 else 0.0
        share = busy / (end - start) if end > start else 1.0  # kernels of no measured length
        lines.append(f"{len(g):7d} {end - start:6.0f} {busy:6.0f} {share:10.0%} {gap:8.1f} {idle:>12}")
        prev_end = end
    return "\n".join(lines) + "\n"
