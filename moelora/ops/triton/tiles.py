"""Tile configurations, fixed per shape class (no run-time autotuning)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int


# (largest mean rows per expert, base MoE tiles, MoE-LoRA tiles). Decode rows are few per expert, so
# small row blocks keep padding under one 16-row block per touched expert. The wide base tiles won the
# H200 sweep of docs/benchmarks.md (bench/moe_lora.py --sweep); the LoRA kernels keep the tiles their GPU
# tests ran with (their fused expand adds fp32 tiles that the wide configuration was not measured with).
_MOE_TABLE: tuple[tuple[float, Tiles, Tiles], ...] = (
    (16.0, Tiles(16, 64, 128, 4, 3), Tiles(16, 64, 128, 4, 3)),
    (64.0, Tiles(32, 64, 64, 4, 3), Tiles(32, 64, 64, 4, 3)),
    (256.0, Tiles(128, 128, 64, 8, 3), Tiles(64, 64, 64, 4, 3)),
    (float("inf"), Tiles(128, 128, 64, 8, 3), Tiles(128, 64, 64, 8, 3)),
)


def moe_tiles(num_pairs: int, num_experts: int, lora: bool) -> Tiles:
    """Tiles for a grouped GEMM of `num_pairs` (token, choice) rows over `num_experts` experts."""
    mean = num_pairs / max(1, num_experts)
    return next(t_lora if lora else t_base for limit, t_base, t_lora in _MOE_TABLE if mean <= limit)


def lora_block_m(num_tokens: int) -> int:
    """Token rows per program of the dense LoRA kernels."""
    return 16 if num_tokens <= 64 else 64


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: full fp32 ("ieee") for fp32 tensors, as torch's own fp32 matmuls on CUDA
    (TF32 would silently lose mantissa bits); "tf32" for 16-bit inputs, where it only affects the fp32
    LoRA intermediates, which carry far more precision than the bf16/fp16 values they feed."""
    return "ieee" if dtype == torch.float32 else "tf32"
