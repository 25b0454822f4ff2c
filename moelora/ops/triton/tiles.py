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
    group_m: int = 8  # row blocks per program group: neighbours share weight tiles and rows in L2


# (largest mean rows per expert, base MoE tiles, MoE-LoRA tiles) for the grouped GEMMs. Decode rows are
# few per expert, so small row blocks keep padding under one 16-row block per touched expert; the wide tiles
# won the H200 sweeps of docs/benchmarks.md (bench/moe_lora.py --sweep). With LoRA, a row block runs one
# expand per distinct adapter among its rows: at 64-256 rows per expert, 64-row blocks hold fewer adapters
# (16 adapters of rank 64 at M = 2048: 1092 us of LoRA with them, 1427 with the 128-row blocks).
_MOE_TABLE: tuple[tuple[float, Tiles, Tiles], ...] = (
    (16.0, Tiles(16, 64, 128, 4, 3), Tiles(16, 64, 128, 4, 3)),
    (64.0, Tiles(32, 64, 64, 4, 3), Tiles(32, 64, 64, 4, 3)),
    (256.0, Tiles(128, 128, 64, 8, 3), Tiles(64, 64, 64, 4, 3)),
    (float("inf"), Tiles(128, 128, 64, 8, 3), Tiles(128, 128, 64, 8, 3)),
)


def moe_tiles(num_pairs: int, num_experts: int, lora: bool) -> Tiles:
    """Tiles for a grouped GEMM of `num_pairs` (token, choice) rows over `num_experts` experts."""
    mean = num_pairs / max(1, num_experts)
    return next(t_lora if lora else t_base for limit, t_base, t_lora in _MOE_TABLE if mean <= limit)


@dataclass(frozen=True)
class DecodeTiles:
    block_n: int
    block_k: int
    warps: int


# The alignment-free path for a handful of (token, choice) pairs: one program per pair and output tile.
DECODE_TILES = DecodeTiles(block_n=16, block_k=256, warps=4)


def use_decode_path(num_pairs: int, num_experts: int, top_k: int) -> bool:
    """Few enough pairs that each reads its own expert (few repeats): skip the alignment."""
    return num_pairs <= max(top_k, num_experts // 8)


@dataclass(frozen=True)
class LoraTiles:
    block_m: int  # token rows per program, shrink and expand
    shrink_k: int  # input columns per step of the shrink
    k_chunk: int  # input columns per shrink program (a split of the sum when below the input size)
    expand_n: int  # output columns per program of the expand
    warps: int
    stages: int


# (most tokens, tiles) of the dense multi-LoRA kernels.
_LORA_TABLE: tuple[tuple[float, LoraTiles], ...] = (
    (16.0, LoraTiles(16, 128, 512, 64, 4, 2)),
    (64.0, LoraTiles(16, 128, 256, 64, 4, 2)),
    (float("inf"), LoraTiles(64, 128, 1 << 30, 128, 4, 3)),
)


def lora_tiles(num_tokens: int) -> LoraTiles:
    """Tiles of the dense LoRA shrink and expand for a batch of `num_tokens`."""
    return next(t for limit, t in _LORA_TABLE if num_tokens <= limit)


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: full fp32 ("ieee") for fp32 tensors, as torch's own fp32 matmuls on CUDA
    (TF32 would silently lose mantissa bits); "tf32" for 16-bit inputs, where no dot has fp32 operands
    (the fp32 LoRA intermediates enter as 16-bit hi + lo parts, see `common.add_expand`)."""
    return "ieee" if dtype == torch.float32 else "tf32"
