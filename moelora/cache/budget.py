"""How much memory the KV cache may take: an explicit block count, a share of the card
(gpu_memory_utilization), a byte budget, or a fraction of free memory."""

from __future__ import annotations

import math
import os

import torch

from moelora.config import EngineArgs

_CPU_KV_CAP = 1 << 30
_CUDA_KV_FRACTION = 0.8
_ACTIVATION_RESERVE = 0.1  # of a gpu_memory_utilization budget left to activations


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


def plan_kv_blocks(args: EngineArgs, bytes_per_block: int, model_len: int, device: torch.device) -> int:
    """Blocks from an explicit count, a share of the card (gpu_memory_utilization), a byte budget, or a
    fraction of free device memory (CPU: what max_num_seqs x model_len needs, up to 1 GiB)."""
    if args.num_kv_blocks is not None:
        return args.num_kv_blocks
    if args.gpu_memory_utilization is not None:
        if device.type != "cuda":
            raise ValueError("gpu_memory_utilization sizes a CUDA card's memory: on CPU give kv_cache_memory")
        free, total = torch.cuda.mem_get_info(device)
        left = args.gpu_memory_utilization * total - (total - free)  # of this share, after what is in use
        return int(max(0.0, left) * (1 - _ACTIVATION_RESERVE)) // bytes_per_block
    budget = args.kv_cache_memory
    if budget is not None and budget > 1:
        return int(budget) // bytes_per_block
    if device.type == "cuda":
        return int(free_memory(device) * (budget or _CUDA_KV_FRACTION)) // bytes_per_block
    if budget is not None:
        return int(free_memory(device) * budget) // bytes_per_block
    needed = args.max_num_seqs * math.ceil(model_len / args.block_size)
    return min(needed, _CPU_KV_CAP // bytes_per_block)
