"""Device-scope counters that order the programs of one launch, and the per-device buffer they live in.

A program that waits only for programs with a lower `ticket` cannot deadlock (those are running); the last
program of a group to finish (`last_one`) sees the others' writes and can add them up in a fixed order,
so the result does not depend on timing. Every counter is back to zero when its launch ends.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_COUNTERS = 1 << 16
_BUFFERS: dict[torch.device, tuple[torch.Tensor, bool]] = {}


@triton.jit
def ticket(counter_ptr):
    """This program's place in the order programs started (0, 1, ...). A program that waits only for
    programs with lower tickets cannot deadlock: they hold a ticket, so they are running."""
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel")


@triton.jit
def signal(counter_ptr):
    """Count this program's writes done at *counter_ptr. The barrier first: one thread does the atomic,
    and its release covers the other threads' writes only once a barrier has ordered them before it."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release")


@triton.jit
def wait_for(counter_ptr, target):
    """Spin until *counter_ptr >= target; what the programs counted there wrote is visible after it."""
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
    while seen < target:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def last_one(counter_ptr, count):
    """Count this program in (its writes done, as `signal`); True for the last of `count` programs,
    which then sees all their writes and resets the counter to zero for the next launch."""
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel") == count - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0)
    tl.debug_barrier()
    return last


def launch_counters(device: torch.device, needed: int) -> torch.Tensor:
    """The counters of `device` (int32 [MAX_COUNTERS], all zero between launches: each launch resets
    what it counted), for a launch that uses the first `needed`. Launches that use them run one after
    another (one stream). Made once per device; if first made while a CUDA graph is captured, its zeroing
    is part of the graph, so the next call outside a capture zeroes it first."""
    if needed > MAX_COUNTERS:
        raise ValueError(f"a launch needs {needed} counters, more than the {MAX_COUNTERS} there are")
    buf, zeroed = _BUFFERS.get(device, (None, False))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if buf is None:
        buf = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
        zeroed = not capturing
    elif not zeroed and not capturing:
        buf.zero_()
        zeroed = True
    _BUFFERS[device] = (buf, zeroed)
    return buf
