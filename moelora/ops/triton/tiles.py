"""The shape rules that pick tiles and kernel variants, fixed per shape class (no run-time autotuning).
Each MoE rule reads its table or its override from a `KernelPlan` (`moelora/ops/plan.py`) passed in;
this module holds no state.
"""

from __future__ import annotations

import torch

from moelora.ops.plan import TUNED, DecodeTiles, KernelPlan, LoraTiles, Tiles

__all__ = ["DecodeTiles", "KernelPlan", "LoraTiles", "Tiles"]  # the tile types, for the launchers
from moelora.ops.triton.align import busy_size


def moe_tiles(
    num_pairs: int, num_experts: int, num_slots: int = 0, plan: KernelPlan = TUNED, w8a8: bool = False
) -> Tiles:
    """Tiles for a grouped GEMM of `num_pairs` (token, choice) rows over `num_experts` experts, with LoRA
    of `num_slots` adapter slots (0: none). A row block of the base tiles holds about block_m / (mean rows
    per (expert, slot)) distinct adapters; up to 4 it keeps the base tiles. With FP8 activations (`w8a8`)
    the plan's `fp8_act_table`."""
    mean = num_pairs / max(1, num_experts)
    if w8a8:
        return next(t for limit, t in plan.fp8_act_table if mean <= limit)
    base, lora = next((t_base, t_lora) for limit, t_base, t_lora in plan.moe_table if mean <= limit)
    return base if base.block_m * num_slots <= 4 * mean else lora


def shrink_rows(num_pairs: int, num_experts: int, num_slots: int, plan: KernelPlan = TUNED) -> int:
    """Rows per step of the MoE-LoRA shrink (one program per busy (expert, slot) bucket): the mean bucket's,
    at least the dot's smallest tile, at most 64 (a larger bucket takes several steps)."""
    if plan.shrink_rows is not None:
        return plan.shrink_rows
    mean = num_pairs // max(1, num_experts * num_slots)
    return min(64, max(16, 1 << max(0, mean - 1).bit_length()))


def shrink_splits(
    num_pairs: int, num_experts: int, num_slots: int, in_dim: int, plan: KernelPlan = TUNED
) -> int:
    """Input splits of the MoE-LoRA shrink (`moe_shrink`), so that about 1024 programs stream the busy
    buckets' A (at most 16 splits, of at least 256 columns). One program per bucket waits on its 128-column
    loads in turn (H200: about 0.6 us each) while most SMs idle: Qwen3 at M = 8, 16 adapters of rank 64,
    LoRA delta 34 against 46 us; Mixtral at M = 32 (4, 16), 28-31 against 69-79 us. Only while buckets hold
    16 rows or fewer on average: each split writes the rows' partial sums, which every column tile of the
    GEMM that takes them reads back."""
    if plan.shrink_splits is not None:
        return plan.shrink_splits
    buckets = busy_size(num_pairs, num_experts, num_slots)
    if num_pairs > 16 * buckets:
        return 1
    return max(1, min(16, in_dim // 256, 1024 // buckets))


def down_shrink_in_gate_up(
    num_pairs: int, num_experts: int, inter: int, tiles: Tiles, plan: KernelPlan = TUNED
) -> bool:
    """Whether the gate/up GEMM writes the down shrink (a part per column tile, added up by the down GEMM)
    instead of a shrink launch: while experts hold about 2 pairs or fewer, so a row block's rows have one
    or two adapters (one dot each), and the parts are few (at most 16 column tiles)."""
    if plan.down_shrink_in_gate_up is not None:
        return plan.down_shrink_in_gate_up
    return num_pairs <= 2 * num_experts and -(-inter // tiles.block_n) <= 16


def use_decode_path(num_pairs: int, num_experts: int, top_k: int, plan: KernelPlan = TUNED) -> bool:
    """Few enough pairs that each reads its own expert (few repeats): skip the alignment."""
    if plan.decode_pairs is not None:
        return num_pairs <= plan.decode_pairs
    return num_pairs <= max(top_k, num_experts // 8)


def fp8_activations(
    num_pairs: int, num_experts: int, group: int, dtype: torch.dtype, plan: KernelPlan = TUNED
) -> bool:
    """Whether the aligned path's GEMMs take FP8 weights of scale group `group` (0: not FP8) with FP8
    activations (W8A8; `KernelPlan.fp8_activation_rows`): the K step is then one group, which FP8 MMA
    needs to be a power of two of at least 32 columns. Only for 16-bit activations (`dtype`): a model
    run in fp32 asks for fp32 products, as `dot_precision` gives it elsewhere."""
    rows = plan.fp8_activation_rows
    whole = group >= 32 and group & (group - 1) == 0
    fp32 = dtype == torch.float32
    return rows is not None and whole and not fp32 and num_pairs >= rows * max(1, num_experts)


def lora_tiles(num_tokens: int, plan: KernelPlan = TUNED) -> LoraTiles:
    """Tiles of the dense LoRA shrink and expand for a batch of `num_tokens`."""
    return next(t for limit, t in plan.lora_table if num_tokens <= limit)


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: full fp32 ("ieee") for fp32 tensors, as torch's own fp32 matmuls on CUDA
    (TF32 would silently lose mantissa bits); "tf32" for 16-bit inputs, where no dot has fp32 operands
    (the fp32 LoRA intermediates enter in 16 bits, see `expand_mode`)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def down_expand_apart(
    tiles: Tiles, num_pairs: int, num_experts: int, num_slots: int, rank: int, plan: KernelPlan = TUNED
) -> bool:
    """Whether the down LoRA expand runs apart (`moe_expand`) rather than in the down GEMM's epilogue.

    In the epilogue each distinct adapter of a row block costs a full-height dot of the LoRA's rank;
    apart, d's rows are read and written once more. H200, Qwen3 shape, 16 adapters of rank 64: apart
    1234 against 1558 us at M = 8192 (4 buckets of ~32 rows per block), equal at 2048 (8 of ~8), 5-20%
    slower at M <= 128; 4 adapters of rank 16: 679 against 650 us at 2048 (4 of ~32), 420 against 271 at
    8192 (1 of ~128). Mixtral (8 experts, few buckets), 16 of rank 64: 227 against 303 us at M = 128,
    723 against 913 at 2048."""
    if plan.down_expand_apart is not None:
        return plan.down_expand_apart
    mean = num_pairs / max(1, num_experts)
    bucket = mean / max(1, num_slots)
    adapters_per_block = min(tiles.block_m, mean) / max(1.0, bucket)
    return num_experts * num_slots <= 128 or (bucket >= 16 and adapters_per_block * rank >= 256)


def expand_mode(dtype: torch.dtype, plan: KernelPlan = TUNED) -> int:
    """`add_expand`'s EXPAND for LoRA weights of this dtype: 0 (fp32 dot) or the plan's `expand_16bit`."""
    return 0 if dtype == torch.float32 else plan.expand_16bit
