"""Tile configurations, fixed per shape class (no run-time autotuning)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from moelora.ops.triton.align import busy_size


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    group_m: int = 8  # row blocks per program group: neighbours share weight tiles and rows in L2
    down_n: int = 0  # the down GEMM's output columns per tile (0: block_n)
    down_stages: int = 0  # its pipeline stages (0: stages)
    tma_down: bool = False  # the down GEMM reads h and its weights through TMA; without LoRA, persistent

    def for_down(self, block_r: int = 0) -> Tiles:
        """The down GEMM's tiles (same row blocks as the gate/up GEMM: they share the alignment), with a
        fused LoRA expand of `block_r` rank lanes (0: none): past 16 its B tile leaves shared memory for
        3 stages only."""
        stages = self.down_stages or self.stages
        if block_r > 16:
            stages = min(stages, 3)
        return replace(self, block_n=self.down_n or self.block_n, stages=stages)


# (largest mean rows per expert, base MoE tiles, MoE-LoRA tiles) for the grouped GEMMs. Decode rows are
# few per expert, so small row blocks keep padding under one 16-row block per touched expert; the wide tiles
# won the H200 sweeps of docs/benchmarks.md (bench/moe_lora.py --sweep). With LoRA, a row block of the
# gate/up GEMM runs one expand per distinct adapter among its rows, so where the base tiles' blocks would
# hold many adapters (`moe_tiles`) the LoRA tiles are shorter (16 adapters of rank 64 at M = 2048: 1362 us
# on 64-row blocks, 1576 on 128-row ones; 4 adapters of rank 16: 676 against 645). Past 256 rows per expert
# groups of 32 row blocks share weight tiles longer (qwen3 M = 8192: 1389 us against 1446 with 8). On
# 128-row blocks the down GEMM (a short K of I) is TMA-fed, on 256 columns in 4 stages, and without LoRA
# persistent (H200, qwen3: 362 against 478 us at M = 8192, 149 against 177 at 2048).
_BIG = Tiles(128, 128, 64, 8, 3, down_n=256, down_stages=4, tma_down=True)
_MOE_TABLE: tuple[tuple[float, Tiles, Tiles], ...] = (
    (16.0, Tiles(16, 64, 128, 4, 3), Tiles(16, 64, 128, 4, 3)),
    (64.0, Tiles(32, 64, 64, 4, 3), Tiles(32, 64, 64, 4, 3)),
    (256.0, _BIG, Tiles(64, 64, 64, 4, 3)),
    (float("inf"), replace(_BIG, group_m=32), replace(_BIG, group_m=32)),
)

# Programs of a persistent down GEMM (`Tiles.tma_down`, without LoRA); None: one per SM.
PERSISTENT_PROGRAMS: int | None = None


def moe_tiles(num_pairs: int, num_experts: int, num_slots: int = 0) -> Tiles:
    """Tiles for a grouped GEMM of `num_pairs` (token, choice) rows over `num_experts` experts, with LoRA
    of `num_slots` adapter slots (0: none). A row block of the base tiles holds about block_m / (mean rows
    per (expert, slot)) distinct adapters; up to 4 it keeps the base tiles."""
    mean = num_pairs / max(1, num_experts)
    base, lora = next((t_base, t_lora) for limit, t_base, t_lora in _MOE_TABLE if mean <= limit)
    return base if base.block_m * num_slots <= 4 * mean else lora


def shrink_rows(num_pairs: int, num_experts: int, num_slots: int) -> int:
    """Rows per step of the MoE-LoRA shrink (one program per busy (expert, slot) bucket): the mean bucket's,
    at least the dot's smallest tile, at most 64 (a larger bucket takes several steps)."""
    mean = num_pairs // max(1, num_experts * num_slots)
    return min(64, max(16, 1 << max(0, mean - 1).bit_length()))


# The MoE-LoRA shrink's input splits; None: `shrink_splits`' rule.
SHRINK_SPLITS: int | None = None


def shrink_splits(num_pairs: int, num_experts: int, num_slots: int, in_dim: int) -> int:
    """Input splits of the MoE-LoRA shrink (`moe_shrink`), so that about 1024 programs stream the busy
    buckets' A (at most 16 splits, of at least 256 columns). One program per bucket waits on its 128-column
    loads in turn (H200: about 0.6 us each) while most SMs idle: Qwen3 at M = 8, 16 adapters of rank 64,
    LoRA delta 34 against 46 us; Mixtral at M = 32 (4, 16), 28-31 against 69-79 us. Only while buckets hold
    16 rows or fewer on average: each split writes the rows' partial sums, which every column tile of the
    GEMM that takes them reads back."""
    if SHRINK_SPLITS is not None:
        return SHRINK_SPLITS
    buckets = busy_size(num_pairs, num_experts, num_slots)
    if num_pairs > 16 * buckets:
        return 1
    return max(1, min(16, in_dim // 256, 1024 // buckets))


# Where the down projection's LoRA shrink runs: in the gate/up GEMM's epilogue, in parts per column tile
# (True), or in a launch of its own (False); None: `down_shrink_in_gate_up`'s rule.
DOWN_SHRINK_IN_GATE_UP: bool | None = None


def down_shrink_in_gate_up(num_pairs: int, num_experts: int, inter: int, tiles: Tiles) -> bool:
    """Whether the gate/up GEMM writes the down shrink (a part per column tile, added up by the down GEMM)
    instead of a shrink launch: while experts hold about 2 pairs or fewer, so a row block's rows have one
    or two adapters (one dot each), and the parts are few (at most 16 column tiles)."""
    if DOWN_SHRINK_IN_GATE_UP is not None:
        return DOWN_SHRINK_IN_GATE_UP
    return num_pairs <= 2 * num_experts and -(-inter // tiles.block_n) <= 16


@dataclass(frozen=True)
class DecodeTiles:
    block_n: int
    block_k: int
    warps: int
    lora_regs: int = 128  # register cap of the gate/up launch with LoRA (0: none)


# The alignment-free path for a handful of (token, choice) pairs: one program per pair and output tile.
# With LoRA the gate/up kernel needs 138 registers a thread (sm_90): 3 programs an SM instead of the base's
# 4, so one Qwen3 token's 448 programs took two waves; capped at 128 it spills 32 bytes and fits one.
DECODE_TILES = DecodeTiles(block_n=16, block_k=256, warps=4)


# At most this many (token, choice) pairs take the decode path; None: `use_decode_path`'s rule.
DECODE_PAIRS: int | None = None


def use_decode_path(num_pairs: int, num_experts: int, top_k: int) -> bool:
    """Few enough pairs that each reads its own expert (few repeats): skip the alignment."""
    if DECODE_PAIRS is not None:
        return num_pairs <= DECODE_PAIRS
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
    (the fp32 LoRA intermediates enter in 16 bits, see `expand_mode`)."""
    return "ieee" if dtype == torch.float32 else "tf32"


# How the LoRA expand of 16-bit weights takes its fp32 intermediates (`common.add_expand`): 1 rounds them
# to the weights' dtype (one dot, as PEFT's own 16-bit LoRA), 2 splits them into hi + lo parts (two dots,
# fp32-like). The rounding error is 2^-9 of the delta, itself a fraction of an output that is stored in
# 16 bits; the second dot doubled the MoE expand, which with many adapters per row block costs as much as
# the base GEMM (docs/benchmarks.md, 2026-11-29, second session).
EXPAND_16BIT = 1


# The down projection's LoRA expand: in the down GEMM's epilogue (False) or apart, over the alignment's
# (expert, slot) buckets, adding into the GEMM's output (True; `moe_expand`); None: `down_expand_apart`.
DOWN_EXPAND_APART: bool | None = None


def down_expand_apart(tiles: Tiles, num_pairs: int, num_experts: int, num_slots: int, rank: int) -> bool:
    """Whether the down LoRA expand runs apart (`moe_expand`) rather than in the down GEMM's epilogue.

    In the epilogue each distinct adapter of a row block costs a full-height dot of the LoRA's rank;
    apart, d's rows are read and written once more. H200, Qwen3 shape, 16 adapters of rank 64: apart
    1234 against 1558 us at M = 8192 (4 buckets of ~32 rows per block), equal at 2048 (8 of ~8), 5-20%
    slower at M <= 128; 4 adapters of rank 16: 679 against 650 us at 2048 (4 of ~32), 420 against 271 at
    8192 (1 of ~128). Mixtral (8 experts, few buckets), 16 of rank 64: 227 against 303 us at M = 128,
    723 against 913 at 2048."""
    if DOWN_EXPAND_APART is not None:
        return DOWN_EXPAND_APART
    mean = num_pairs / max(1, num_experts)
    bucket = mean / max(1, num_slots)
    adapters_per_block = min(tiles.block_m, mean) / max(1.0, bucket)
    return num_experts * num_slots <= 128 or (bucket >= 16 and adapters_per_block * rank >= 256)


def expand_mode(dtype: torch.dtype) -> int:
    """`add_expand`'s EXPAND for LoRA weights of this dtype: 0 (fp32 dot) or EXPAND_16BIT."""
    return 0 if dtype == torch.float32 else EXPAND_16BIT
