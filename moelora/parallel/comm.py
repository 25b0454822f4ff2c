"""Collectives over the TP group. With one rank they are identities and cost nothing."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moelora.parallel.state import ParallelState


def all_reduce(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Sum `x` over the TP group, in place; returns `x`."""
    if ps.tp_size > 1:
        dist.all_reduce(x, group=ps.tp_group)
    return x


def all_gather_last_dim(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Concatenate every TP rank's `x` along the last dimension, in rank order."""
    if ps.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ps.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=ps.tp_group)
    return torch.cat(parts, dim=-1)


def broadcast(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Rank 0's `x` on every TP rank, in place (queued on the device with NCCL); returns `x`."""
    if ps.tp_size > 1:
        dist.broadcast(x, src=dist.get_global_rank(ps.tp_group, 0), group=ps.tp_group)
    return x
