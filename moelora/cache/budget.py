"""How much memory the KV cache may take: an explicit block count, a share of the card
(gpu_memory_utilization), a byte budget, or a fraction of free memory; on CUDA the default and the
share leave room for the activations of the largest step (`models.config.activation_bytes`)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from moelora.config import EngineArgs

_CPU_KV_CAP = 1 << 30
_CUDA_KV_FRACTION = 0.8
_ACTIVATION_RESERVE = 0.1  # of a gpu_memory_utilization budget left to activations, at least
_ACTIVATION_MARGIN = 1.25  # on the estimate: the caching allocator's rounding and fragmentation
_FIXED_RESERVE = 1 << 30  # CUDA graphs' pools, cuBLAS workspaces, the sampler's buffers


def reserve_bytes(activations: int) -> int:
    """What the KV cache leaves free for a step's activations of (estimated) `activations` bytes."""
    return int(activations * _ACTIVATION_MARGIN) + _FIXED_RESERVE


def free_memory(device: torch.device) -> int:
    """Bytes free on the device (CUDA) or available to this machine (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fit_model_len(blocks_for: Callable[[int], int], block_size: int, wanted: int) -> tuple[int, int]:
    """(length, blocks): `wanted` and its cache's blocks where those hold it; else the longest length whose
    cache, planned for that length (`blocks_for`: a step of its tokens kept free, a smaller reserve than
    the wanted length's), still holds one sequence of it. The cache's size falls as the length rises, so
    the longest such length is found by bisection; (0, blocks_for(1)) where not even one token fits."""
    blocks = blocks_for(wanted)
    if blocks * block_size >= wanted:
        return wanted, blocks
    lo, hi = 0, wanted - 1  # lo fits (0 trivially), hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if blocks_for(mid) * block_size >= mid:
            lo = mid
        else:
            hi = mid - 1
    return lo, blocks_for(max(lo, 1))


def plan_kv_blocks(
    args: EngineArgs,
    bytes_per_block: int,
    model_len: int,
    device: torch.device,
    activations: int = 0,
    pending: int = 0,
) -> int:
    """Blocks from an explicit count, a share of the card (gpu_memory_utilization), a byte budget, or a
    fraction of free device memory (CPU: what max_num_seqs x model_len needs, up to 1 GiB). `pending`:
    bytes allocated after the cache (the adapter slots), not free for it. On CUDA the share and the
    default fraction leave `reserve_bytes(activations)` free for the largest step."""
    if args.num_kv_blocks is not None:
        return args.num_kv_blocks
    if args.gpu_memory_utilization is not None:
        if device.type != "cuda":
            raise ValueError("gpu_memory_utilization sizes a CUDA card's memory: on CPU give kv_cache_memory")
        free, total = torch.cuda.mem_get_info(device)
        share = args.gpu_memory_utilization * total
        left = share - (total - free) - pending  # of this share, after what is in use
        left -= max(share * _ACTIVATION_RESERVE, reserve_bytes(activations))
        return int(max(0.0, left)) // bytes_per_block
    budget = args.kv_cache_memory
    if budget is not None and budget > 1:
        return int(budget) // bytes_per_block
    free = free_memory(device) - pending
    if device.type == "cuda":
        kv = min(free * (budget or _CUDA_KV_FRACTION), free - reserve_bytes(activations))
        return int(max(0.0, kv)) // bytes_per_block
    if budget is not None:
        return int(max(0, free) * budget) // bytes_per_block
    needed = args.max_num_seqs * math.ceil(model_len / args.block_size)
    return min(needed, _CPU_KV_CAP // bytes_per_block)
