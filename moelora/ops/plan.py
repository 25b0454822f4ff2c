"""The kernel choices of the MoE and LoRA ops as one frozen value: tile tables and the switches between kernel
variants. The default, `TUNED`, is the table the H200 sweeps of docs/benchmarks.md chose; a benchmark or
test that wants another variant builds a `KernelPlan` and passes it to the op (`ops.fused_moe(...,
plan=...)`). Nothing here is read from a module global at call time, so nothing can be patched.

No Triton import: the plan is part of the op signatures, which hold without Triton too.

Two things are read from the environment, when this module is imported: `MOELORA_PDL=0` turns
programmatic dependent launch off (`KernelPlan.pdl`), for a profile whose kernel times are each kernel's
own (under PDL a kernel starts early and its time includes the wait for the one before); `MOELORA_PLAN`
changes scalar fields of `TUNED` for a whole process (`with_overrides`), so that a variant can be timed in
the model (`MOELORA_PLAN="linear_tiles.programs_per_sm=3" moelora bench latency ...`; the bench
header prints it).
"""

from __future__ import annotations

import ast
import dataclasses
import os
from dataclasses import dataclass, field, replace
from typing import Any

# The decode step's launches `KernelPlan.pdl_off` may name: the RMSNorm's (with or without the adapters'
# shrink), the one-launch linear layer, q/k/v with the input norm inside, o with the norm and the router
# after it, the rotary embedding, decode attention, the router, the decode MoE's gate/up and down GEMVs.
_PDL_LAUNCHES = frozenset(
    {"norm", "linear", "norm_linear", "linear_router", "rotary", "attention", "router", "gate_up", "down"}
)


def _pdl_from_env() -> bool:
    """`KernelPlan.pdl`'s default: on unless MOELORA_PDL is 0."""
    value = os.environ.get("MOELORA_PDL", "1")
    if value not in ("0", "1"):
        raise ValueError(f"MOELORA_PDL={value!r}: 1 (programmatic dependent launch, the default) or 0 (off)")
    return value == "1"


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


# The aligned path's tiles where W8A8 runs (`KernelPlan.fp8_activation_rows`), base and LoRA alike, by largest
# mean rows per expert. Each K step's FP8 product is scaled by its rows' and columns' scales before it is
# added (`acc += dot * scales`), so a tile holds two fp32 accumulators: the moe_table's 128 x 256 (gate and
# up interleaved) over 8 warps spills. H200, Qwen3 shape, M = 2,048 (bench/fp8_moe.py, 2026-12-05): with
# those tiles the gate/up GEMM took 861 us (W8A16 437, bf16 289) and the down 416 (219, 137); with the
# LoRA row's 64 x 64 (8 adapters of rank 16) 339 and 330, the layer 814 us against W8A16's 881 and
# bf16's 736. The small rows are the moe_table's with a K step of one group (128 columns). H100, same
# bench (`--sweep`, sixteenth session): at 2,048 a down tile of 128 columns took the layer from 556 to 504
# us (bf16 577), with 8 adapters 851 to 747 (bf16 827); its 12 other tiles were slower.
_W8A8_TABLE: tuple[tuple[float, Tiles], ...] = (
    (16.0, Tiles(16, 64, 128, 4, 3)),
    (64.0, Tiles(32, 64, 128, 4, 3)),
    (float("inf"), Tiles(64, 64, 128, 4, 3, down_n=128)),
)


@dataclass(frozen=True)
class DecodeTiles:
    block_n: int
    block_k: int
    warps: int
    lora_regs: int = 128  # register cap of the gate/up launch with LoRA in the plain loop (0: none)
    lora_ahead_regs: int = 168  # and of that launch a step ahead (`lora_ahead`)
    # Input columns a shrink program of the gate/up launch with LoRA sums (the pair's input in
    # hidden / shrink_chunk parts). Qwen3 at batch 1: 8 pairs x 8 parts = 64 shrink programs beside 384 GEMV
    # ones. H100, Qwen3-30B-A3B bf16, batch 1, 8 adapters (2026-12-06, 25th session): 256 4.21 ms a step,
    # 1,024 4.48, 2,048 (one wave of 392 programs) 4.59: the longer a shrink program's walk, the later the
    # GEMV programs' epilogues get their xa. The parts run by the first GEMV programs instead (each part,
    # then its GEMV; 384 programs in one wave, not 448; `shrink_in_gemv`, 26th session) took 4.30 against
    # 4.23 ms (H100, 2026-12-07, one process): removed.
    shrink_chunk: int = 256
    # With FP8 weights the K step: 0 for one scale group (block_k cut to it), or a power-of-two multiple of
    # the group (a step then loads one scale a row per group it spans). H100, Qwen3-30B-A3B's experts, one
    # token, 4 layers a graph (bench/fp8_moe.py --sweep, 2026-12-05), gate/up + down: steps of 512 with
    # their sums per step (`fp8_step_sum`) 28.4 us base / 33.7 with 8 adapters r16, against 31.9 / 36.2
    # for steps of one group summed after the loop (bf16: 41.1 / 43.6); a later sweep with each group
    # summed apart (`fp8_group_sums`): steps of 1,024 26.0 / 28.7, of 512 26.3 / 32.0 (step sums 28.8 /
    # 33.8 in the same run)
    fp8_block_k: int = 1024
    # Each K step's products summed at once (one fp32 a row across the loop), not a [block_n, block_k]
    # tile of them summed after it. sm_90, Qwen3's gate/up GEMV, ptxas (`python -m tests.kernel_compile
    # --regs decode_`): bf16 126 -> 56 registers a thread, FP8 in steps of one group 71 -> 39. Slower: H100,
    # Qwen3-30B-A3B bf16, batch 1 (2026-12-05), 4.08 -> 4.70 ms a step base, 4.98 -> 4.96 with 8 adapters
    step_sum: bool = False
    fp8_step_sum: bool = True  # `step_sum` where the weights are FP8 (fewer registers for the scale tile)
    # With `fp8_step_sum` and steps over several groups: each group's products summed, then the sums times
    # the rows' scales of the groups (one multiply a row and group), instead of a scale tile built by a
    # select a group over the step's [block_n, block_k] products (timed above)
    fp8_group_sums: bool = True
    # The gate/up launch without LoRA, 16-bit weights, products summed after the loop: each step's tiles
    # loaded while the step before is multiplied (two steps' loads in flight a program): the K loop feeds
    # no dot, so Triton does not pipeline it (8 vector loads a thread, then their products). ptxas (sm_90a):
    # 126 -> 202 registers, the same 64 FMAs a step (a base row keeps its bits next to adapters). H100,
    # Qwen3-30B-A3B bf16 (2026-12-06, three calls, `--plan-variants`), ms a step p50 base: batch 1 3.80 ->
    # 3.70 and 3.80 -> 3.69 / 3.70; batch 16 15.61 -> 15.70 (noise). With LoRA (capped at `lora_regs`: 300
    # bytes of spills) batch 1 took 4.85 against 4.24 ms, uncapped 4.31 (see `lora_ahead` for what runs).
    # The down GEMV's tiles too (48 -> 64 registers), on since 2026-12-06 (24th session, H100, two calls):
    # batch 1 base 3.69 -> 3.64 and 3.71 -> 3.65 (with the gate/up capped at 168 registers, no change alone);
    # in its launches with LoRA as well (`lora_ahead` of the down tiles): no change (4.23 both), so off.
    # Capping the base gate/up at 168 registers (3 programs an SM, one wave of 384): 3.71, no change.
    # (`decode_common.ahead_mode`.)
    ahead: bool = True
    # The same for FP8 weights (steps in one scale group, or each group summed apart). ptxas: gate/up in the
    # shipped steps of 1,024 columns 111 -> 255 registers and 944 bytes of spills; in steps of 512, 96 -> 222
    # and none. H100, Qwen3-30B-A3B FP8 (`-q fp8`), batch 1 (2026-12-06), ms a step base / 8 adapters: off
    # 3.30 / 3.77; gate/up ahead in steps of 512 3.35 / 3.79; steps of 512 alone 3.28 / 3.79; the down ahead
    # 3.27 / 3.77 (p90 3.70 base: noise). So off.
    fp8_ahead: bool = False
    # And in launches with LoRA (the gate/up's LoRA tiles then load after the loop, beside the wait for its
    # shrink). ptxas, Qwen3's gate/up with LoRA: 229 registers uncapped (168 without it); under `lora_regs`
    # 128 it spills 204 bytes, 160: 20, 168 and 200: none. H100, batch 1 with 8 adapters (2026-12-06, 24th
    # session): capped at 168 4.25 -> 4.22, 4.23 -> 4.20 and (with the down ahead) 4.24 -> 4.21 ms; at 200
    # 4.36 (2 programs an SM). On in the gate/up's tiles (`lora_ahead_regs`; FP8 launches keep their loop
    # and its cap, `lora_regs`).
    lora_ahead: bool = False


# The alignment-free path for a handful of (token, choice) pairs: one program per pair and output tile.
# With LoRA the gate/up kernel needs 138 registers a thread (sm_90): 3 programs an SM instead of the base's
# 4, so one Qwen3 token's 448 programs took two waves; capped at 128 it spills 32 bytes and fits one.
# A step ahead with LoRA (`lora_ahead`) is capped at 168: 3 programs an SM, no spills.
_DECODE_TILES = DecodeTiles(block_n=16, block_k=256, warps=4, lora_ahead=True)
# The down GEMV (with the weighted sum in it) apart: H200, Qwen3-30B-A3B, 4 layers of weights per graph
# (2026-12-04): 16 x 128 took 12.5 / 12.9 us at 1 token (base / 8 adapters r16) against 14.6 / 14.4 for
# the gate/up's 16 x 256, and 55.9 / 59.8 against 58.5 / 62.9 at 8 tokens; first of 10 variants.
_DECODE_DOWN_TILES = DecodeTiles(block_n=16, block_k=128, warps=4)
# FP8 experts take the same tiles with K steps of `fp8_block_k` (a scale a row per group the step spans:
# a step reading each column's scale took 65-111 us on the H200, 2026-12-04).


@dataclass(frozen=True)
class LoraTiles:
    block_m: int  # token rows per program, shrink and expand
    shrink_k: int  # input columns per step of the shrink
    k_chunk: int  # input columns per shrink program (a split of the sum when below the input size)
    expand_n: int  # output columns per program of the expand
    warps: int
    stages: int


# (most tokens, tiles) of the dense multi-LoRA kernels.
# H200, q/k/v and o of Qwen3-30B-A3B, 8 adapters of rank 16, tokens grouped by adapter as the scheduler
# orders them (`bench/linear.py --lora-sweep --grouped`), us per layer over cuBLAS alone: 256 tokens
# 25 -> 8 (q/k/v) and 33 -> 7 (o) against the single 64-row table row this replaced (4 programs a launch;
# 80 and 111 with the tokens in arrival order, 8 adapters in every block); 1,024 tokens 20 -> 15, 21 -> 9.
_LORA_TABLE: tuple[tuple[float, LoraTiles], ...] = (
    (16.0, LoraTiles(16, 128, 512, 64, 4, 2)),
    (256.0, LoraTiles(16, 128, 256, 64, 4, 3)),
    (1024.0, LoraTiles(32, 128, 512, 128, 4, 3)),
    (float("inf"), LoraTiles(64, 128, 1 << 30, 128, 4, 3)),
)


@dataclass(frozen=True)
class LinearTiles:
    """Tiles of the one-launch linear layer (`ops/triton/linear.py`) for a few tokens."""

    block_n: int  # output columns per program (narrower where a stacked part's size needs it)
    block_k: int  # input columns per step
    warps: int
    stages: int
    programs_per_sm: int  # the input is split until about this many GEMV programs per SM run
    shrink_chunk: int  # input columns per LoRA shrink program


# H200, Qwen3-30B-A3B's q/k/v and o at 1 and 16 tokens (bench/linear.py --sweep, 2026-12-04): 4 stages and
# one program per SM came first of 48 variants (1-2 us apart in all). On an H100 (2026-12-05, `--sweep
# --per-sm`) 3 programs per SM won every isolated row (sum 89 against 102 us), but in the model at batch 1
# the base step got slower (4.08 against 3.92 ms) while the step with an adapter got faster (4.74 against
# 4.92). A launch with adapters cannot take more splits than one without: the splits set the order of a
# row's sum, and a base row must come out the same whatever its neighbours run (the H100 caught that in
# test_linear_gpu, 2026-12-05, when 3 splits were tried for launches with adapters only: 4.62 against
# 4.76 ms with adapters at batch 1, removed). So one program per SM for every launch.
_LINEAR_TILES = LinearTiles(block_n=64, block_k=128, warps=4, stages=4, programs_per_sm=1, shrink_chunk=256)


@dataclass(frozen=True)
class AttnDecodeTiles:
    """Tiles of the split-KV decode attention (`ops/triton/attn_decode.py`) and MLA's latent decode."""

    block_n: int  # keys per loop iteration
    warps: int
    stages: int
    min_chunk: int  # fewest keys a split is sized for: bounds the split count from the context capacity
    waves: int  # programs aimed at per multiprocessor when choosing the split count
    max_splits: int = 1 << 30  # and at most this many (the last split merges them one after another)


# The H200 sweep of docs/benchmarks.md: these tiles were best or within 4% at B = 1, 16, 64 and 8k keys;
# 128-key chunks (64 splits at B=1, 8k) beat 256 there (10.3 vs 11.7 us) and change nothing at B >= 16.
# At most 32 splits: with the engine's block tables (40,960 keys wide for Qwen3) one sequence took 128,
# most of them empty; H100, Qwen3-30B-A3B heads, 48 layers a graph (2026-12-05): 640 keys 9.0 -> 6.8 us,
# 4,096 keys 14.8 -> 11.3 us (64 splits: 7.2 and 14.1); B = 4 took 32 splits already, B >= 16 fewer.
# In the model (H100, Qwen3-30B-A3B bf16, batch 1, 2026-12-06, `--plan-variants`), ms a step base / 8
# adapters: shipped 3.88 / 4.59; at most 8 or 16 splits, or 32 keys a step, 3.87-3.89 / 4.58-4.61 (noise).
_ATTN_DECODE_TILES = AttnDecodeTiles(block_n=64, warps=4, stages=3, min_chunk=128, waves=2, max_splits=32)


@dataclass(frozen=True)
class DeltaTiles:
    """The chunked delta-rule prefill's choices (`ops/triton/delta_prefill.py`)."""

    chunk: int = 16  # tokens a step of the walk takes, a power of two >= 16
    block_v: int | None = None  # value columns a program keeps; None: 32 while at most two programs an SM
    precision: str = "tf32x3"  # the products' tl.dot input precision (8x "ieee"'s speed, same error)
    warps: int = 4
    split: bool = True  # every chunk's (I + A)^-1 solved first, all chunks at once (H200: 0.70-0.81x)


@dataclass(frozen=True)
class KernelPlan:
    """Kernel choices of the routed-expert and dense LoRA ops. A field left None lets its shape rule
    decide (see the rule of the same name in `ops/triton/tiles.py`)."""

    # (largest mean rows per expert, base tiles, LoRA tiles) of the grouped GEMMs, in increasing order
    moe_table: tuple[tuple[float, Tiles, Tiles], ...] = _MOE_TABLE
    decode_tiles: DecodeTiles = _DECODE_TILES  # the alignment-free path's gate/up GEMV
    decode_down_tiles: DecodeTiles = _DECODE_DOWN_TILES  # and its down GEMV
    # (most tokens, tiles) of the dense multi-LoRA shrink and expand, in increasing order
    lora_table: tuple[tuple[float, LoraTiles], ...] = _LORA_TABLE
    linear_tiles: LinearTiles = _LINEAR_TILES  # the one-launch linear layer (base GEMV, bias, LoRA)
    # One token on an adapter: each GEMV program of that layer computes its input columns' part of the
    # LoRA shrink itself (its A loads beside the weight's) and adds b @ that part, the input splits adding
    # up as the base's; no shrink programs, tickets or waits. Where a program walks at most this many K
    # steps (0: never). H100, Qwen3-30B-A3B, 16 layers a graph (bench/linear.py, 2026-12-05), us with the
    # shrink folded / apart: o (4 splits of 8 steps) 13.5 / 15.9, router (16 of 1) 4.5 / 8.7, but q/k/v
    # (1 split of 16 steps) 27.2 / 17.9.
    linear_fold_steps: int = 8
    # At most this many tokens take the one launch; more run cuBLAS plus the LoRA kernels. H100,
    # Qwen3-30B-A3B bf16, batch 64, one process (2026-12-06, 25th session, `--plan-variants`), ms a step p50
    # base / 8 adapters r16: 64 tokens 22.82 / 26.16 against 16 tokens 22.84 / 26.38 (the dense LoRA's
    # shrink and expand launches go). Batches 17-63 not timed.
    linear_tokens: int = 64
    # The input RMSNorm (and the residual add before it) inside q/k/v's one launch for at most this many
    # tokens (0: never; `linear.norm_linear`): every program computes its rows' rstd and normalises its
    # input columns as it loads them; one launch a layer fewer. With adapters the norm's launch computes
    # only their shrink (`norm.norm_shrink`). The 18th session's form of it cost 0.35 ms a step at batch 1
    # (removed): by the sm_90 TTGIR of this form before its last change, a [BLOCK_K] load of the norm weight
    # (2 bytes a thread) is not staged by the loop's pipelining (each K step waits for it) and a K-step
    # loop over the rows for the rstd waits each step too; here the weight is loaded as a tile like x's
    # (staged with it) and the rstd takes a row's loads at once. H100, Qwen3-30B-A3B, batch 1, one process
    # (2026-12-07, 27th session): that form took 5.78 / 5.14 ms a step base / 8 adapters against 3.65 /
    # 4.23 without it; its q/k/v launch ended 49.5 us after the MoE's (a q/k/v launch alone takes about 8).
    # In a chain of q/k/v and o (`bench/linear.py --norm`) it cost 14-16 us a layer more than the norm's
    # own launch with the residual and nothing more without one; x + residual was stored in the GEMV's loop
    # by column tile 0's programs, now with the rstd's loads before it (90 / 144 registers a thread, base
    # / given the shrink, were 94 / 188). Not yet timed.
    norm_linear_tokens: int = 0
    # The LoRA shrink of the attention's q/k/v (where its one launch would take shrink programs: not
    # folded; past the one launch, in place of the dense LoRA's shrink launch) in the input RMSNorm's
    # launch before it (`norm.add_norm_shrink`), for at most this many tokens (0: never): one program per
    # (token, input chunk) beside the norm's, A loaded before the wait for the previous kernel; the q/k/v
    # launch then has no shrink programs, tickets or waits. H100, Qwen3-30B-A3B, 8 adapters r16, one
    # process (2026-12-06, `--plan-variants`), ms a step with it (up to 16 tokens) / without: bf16 batch 1
    # 4.47 / 4.60, batch 16 17.88 / 17.82 (noise); FP8 batch 1 4.00 / 4.07; the base rows the same. Batch 64
    # (cuBLAS, the dense LoRA's shrink launch replaced): 26.98 against 27.05 with 16 (0.3%, near the noise).
    norm_shrink_tokens: int = 64
    # Where the one launch is given xa (above) and the batch's slots make one group of the expand
    # (`common.add_expand_slots`), its split-0 programs load their B tiles before the wait for the previous
    # kernel and xa right after it, and keep only the expand's dot for after the GEMV. H100, Qwen3-30B-A3B,
    # 8 adapters r16, one process (2026-12-06, `--plan-variants`, o's shrink off in both): batch 1 4.50 ->
    # 4.43 ms a step; base rows unchanged (the same bits).
    linear_expand_early: bool = True
    # A decode step of at most this many sequences (0: never) with adapters: the output projection takes
    # its LoRA shrink from the decode attention's launch (`ops.decode_o_shrink`): the program that stores
    # a KV head's output also multiplies it by o's A over those heads' columns (A brought into L2 before
    # the wait); o's one launch then neither folds the shrink into its GEMV nor runs shrink programs, and
    # past the one launch the dense LoRA runs its expand alone. H100, Qwen3-30B-A3B, 8 adapters r16, one
    # process each (2026-12-06, `--plan-variants`), ms a step with it / without: batch 1 4.29 / 4.43 and
    # (another machine) 4.34 / 4.49; FP8 (`-q fp8`) batch 1 3.72 / 4.01 (both this and the early loads
    # off); batch 16 17.85 / 18.10 (same); batch 64 27.00 / 27.08 (noise: only o's shrink launch goes).
    # Base rows unchanged.
    o_shrink_tokens: int = 64
    # A layer whose output projection (TP = 1) is followed by the RMSNorm and a softmax router (the MoE
    # layers): for at most this many tokens (0: never; at most the one-launch router's 16) the norm and the
    # router run inside o's one launch (`linear.linear_norm_router`), not in a launch of their own. H100,
    # Qwen3-30B-A3B bf16, 8 adapters r16 (2026-12-06, one process a row pair, `--plan-variants`), ms a step
    # p50 base / mixed with it against 0: batch 1 3.80 / 4.24 against 3.88 / 4.28; batch 4 7.64 / 8.52
    # against 7.74 / 8.75; batch 8 11.00 / 12.39 against 11.15 / 12.51; batch 16 slower, 16.26 / 18.10
    # against 15.70 / 17.56 (the last tile adds 32 tiles' partials of 16 rows and 128 experts alone).
    o_router_tokens: int = 8
    attn_decode_tiles: AttnDecodeTiles = _ATTN_DECODE_TILES  # the split-KV decode attention
    # The one-launch router (`router.add_norm_router`, at most `ROUTER_TOKENS` tokens): input columns per
    # program for one token (more tokens: 128 each, a tensor-core dot over 16 rows), and warps a program.
    # H100, Qwen3-30B-A3B bf16, batch 1, one process (2026-12-06, `--plan-variants`), ms a step base / 8
    # adapters: shipped 3.88 / 4.59; 1, 2 or 8 warps 3.91-3.93 / 4.62-4.66; 128 columns 3.98 / 4.70
    router_k_chunk: int = 64
    router_warps: int = 4
    # A decode step's rotary embedding (q/k norm, cache write) inside the decode attention launch
    # (`attn_decode.paged_decode` with `rotary`), one launch a layer fewer. H100, Qwen3-30B-A3B bf16, batch
    # 1 (2026-12-06): 3.99 -> 3.92 ms a step base, 4.79 -> 4.64 with 8 adapters; GLM-4.5-Air (16 layers,
    # partial rotary), base: 4.92 -> 4.77.
    rotary_in_decode: bool = True
    # with an FP8 weight (which cuBLAS cannot take without dequantising it into a 16-bit copy first, 3
    # bytes a weight more) at most this many; more, below `fp8_copy_tokens`, take a Triton GEMM scaling
    # each weight tile in registers (`fp8_gemm_tiles`), then the LoRA kernels; from there the 16-bit copy
    # and cuBLAS. On the H200 (bench/linear.py --fp8, docs/benchmarks.md 2026-12-05) the one launch ties
    # the copy at 32-64 tokens without adapters and loses by 4-6 us with 8 of them at 64; the Triton GEMM
    # (128-wide tiles then) lost to the copy at every size from 32 to 2,048 tokens (1.2-3x its time).
    fp8_linear_tokens: int = 32
    # the one launch's tiles with an FP8 weight (None: `linear_tiles`). A K step lies in one scale group
    # (128 columns): half the bytes of a 16-bit step. H100, Qwen3-30B-A3B `-q fp8`, batch 1, ms a step
    # base / 8 adapters (2026-12-06, one call): `linear_tiles` (64 wide, 4 stages) 3.54 / 4.62; 32 wide
    # with 4 stages 3.43 / 4.18; 64 wide with 6 stages 3.46 / 4.59; 32 wide with 6 stages 3.35 / 4.09.
    # (`bench/linear.py --sweep --fp8` had the same tiles first of 27 by its sum over q/k/v and o, within
    # its noise of the next ten.) The 16-bit launch gained nothing from either change (3.92 / 4.79 with
    # both against 3.91 / 4.64).
    fp8_linear_tiles: LinearTiles | None = LinearTiles(32, 128, 4, 6, 1, 256)
    # With its tiles narrowed to 32-64 columns where one row block would leave SMs idle (`fp8_linear.
    # filled_block_n`; 128-wide tiles ran Qwen3's q/k/v as 40 programs up to 64 tokens) the GEMM wins in
    # the model. H100, Qwen3-30B-A3B `-q fp8`, batch 64, ms a step base / 8 adapters r16 (2026-12-06, one
    # process, `--plan-variants`): the copy 16.55 / 20.32, the GEMM 16.17 / 19.98; batches 1 and 16 (the
    # one launch) unchanged. Up to 127 tokens, the measured range: prefill chunks of 128 tokens and more
    # keep the copy until the GEMM is timed there.
    fp8_copy_tokens: int = 128
    fp8_gemm_tiles: Tiles = Tiles(64, 128, 128, 4, 3)
    # In the one launch with an FP8 weight, each K step's dot takes the weights as they are (exact in 16
    # bits) and is then scaled by its rows' scales ([tokens, columns] multiplies), instead of scaling the
    # [K step, columns] weight tile (a multiply and a rounding a weight) before it. Untimed (2026-12-05):
    # off until measured
    fp8_linear_scale_dots: bool = False
    delta: DeltaTiles = DeltaTiles()  # the chunked delta-rule prefill
    # At most this many (token, choice) pairs take the decode path (None: the shape rule, 16 for Qwen3).
    # H100, Qwen3-30B-A3B bf16, one process (2026-12-06, 25th session), ms a step p50 base / 8 adapters,
    # the rule against 32 and 64 pairs: batch 4 7.69 / 8.47 against 7.67 / 8.66 and 7.64 / 8.63; batch 8
    # 11.03 / 12.42 against 11.09 / 12.42 and 12.23 / 13.88; batch 16 the same (15.6 / 17.7).
    decode_pairs: int | None = None
    # The aligned path's token alignment in one launch of one program (zero the bucket counts, count,
    # prefix sums, scatter, with a barrier between them) where a step has at most 1,024 (token, choice)
    # pairs, instead of four launches (`align.moe_align_buckets`). Off until timed. On an H100 (2026-12-06,
    # 25th session) its own tests passed (`test_align_matches_twin`, up to 600 pairs with slots: blocks,
    # bucket starts and counts and the busy list equal to the four launches', the pairs the same per
    # bucket), so the kernels after it see the inputs they see after the four launches. The kernel tests'
    # MoE paths with it stopped at the run's 90-150 s limits after 7 and 35 tests: most likely Triton
    # compiling their many variants (a test whose kernels another run had compiled took 1.8 s), not told
    # apart from a hang in the time left. The split path went back to the four launches.
    align_one_launch: bool = False
    shrink_splits: int | None = None  # input splits of the aligned MoE-LoRA shrink
    down_shrink_in_gate_up: bool | None = None  # the down LoRA shrink in the gate/up GEMM's epilogue
    down_expand_apart: bool | None = None  # the down LoRA expand in its own launch (not the down GEMM)
    # From this many mean rows per expert the aligned path's grouped GEMMs multiply FP8 expert weights by
    # FP8 activations (each row quantised per scale group in a pass before the GEMM; W8A8 on the FP8
    # tensor cores) where the weights' group is a power of two of at least 32 columns and the activations
    # are 16-bit (an fp32 model keeps fp32 products); None: never (W8A16: the weight tile dequantised).
    # H200, Qwen3 shape (bench/fp8_moe.py, 2026-12-05, eleventh session): at M = 32 and 128 (2 and 8
    # rows an expert) 0.62x the bf16 time against W8A16's 0.67x, with 8 adapters of rank 16 0.71x
    # against 0.75x; at 2,048 with adapters 1.11x against 1.20x. Fewer rows were not measured, so they
    # keep W8A16.
    fp8_activation_rows: float | None = 2.0
    fp8_act_table: tuple[tuple[float, Tiles], ...] = _W8A8_TABLE  # the GEMMs' tiles where W8A8 runs
    persistent_programs: int | None = None  # programs of the persistent down GEMM (None: one per SM)
    shrink_rows: int | None = None  # rows per step of the aligned MoE-LoRA shrink
    shrink_k: int = 128  # input columns per step of the aligned MoE-LoRA shrink (its splits are whole steps)
    expand_n: int = 128  # output columns per tile of the bucketed down LoRA expand (`moe_lora_expand`)
    expand_programs: int = 1024  # at least this many programs of that expand (several per SM) where
    # columns allow
    # How the LoRA expand of 16-bit weights takes its fp32 intermediates: 1 rounds them to the weights'
    # dtype (one dot, as PEFT's own 16-bit LoRA), 2 splits them into hi + lo parts (two dots, fp32-like).
    # The rounding error is 2^-9 of the delta, itself a fraction of an output stored in 16 bits; the
    # second dot doubled the MoE expand, which with many adapters per row block costs as much as the base
    # GEMM (docs/benchmarks.md, 2026-11-29, second session).
    expand_16bit: int = 1
    # Programmatic dependent launch (Hopper): the decode path's kernels (norms, the one-launch linear layer,
    # rotary, decode attention, the router, the decode MoE GEMVs) start during the previous kernel's last
    # programs and wait for it in-kernel (`common.after_previous`), so a launch's start-up overlaps the
    # tail of the one before (the linear layer and the down GEMV bring their weights into L2 meanwhile);
    # in a CUDA graph the launches keep the edge. H100, Qwen3-30B-A3B bf16, batch 1 (2026-12-05,
    # twelfth session): 4.08 -> 4.03 ms a step base, 4.98 -> 4.80 with 8 adapters; H200, thirteenth session:
    # 3.54 / 4.27 ms (tenth session, before it: 3.62 / 4.41). MOELORA_PDL=0 turns it off.
    pdl: bool = field(default_factory=_pdl_from_env)
    # Launches (`_PDL_LAUNCHES`, separated by spaces) that are not programmatic dependents even with
    # `pdl` on: they start only once the kernel before them has finished. A dependent launch's programs
    # are placed while that kernel still runs, in the places its programs free first; one of fewer
    # programs than SMs after one that fills the card may then run several to an SM on part of the card.
    # q/k/v with the input norm inside (`norm_linear`, off by default) follows the MoE's down launch
    # (every SM full), not the norm's one program: at 86 KB of shared memory two of its 80 programs fit an
    # SM. H100, 27th session, base at batch 1: the norm inside cost 2.13 ms a step with PDL on everywhere,
    # 0.75 ms with it off everywhere (its cost in a q/k/v + o chain, 16 us a layer, did not depend on PDL).
    # So it is off there until timed against on (`pdl_off=''`).
    pdl_off: str = "norm_linear"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.pdl_off.split()) - _PDL_LAUNCHES)
        if unknown:
            raise ValueError(
                f"KernelPlan.pdl_off: no launch {', '.join(map(repr, unknown))}; the launches are "
                f"{', '.join(sorted(_PDL_LAUNCHES))}"
            )

    def pdl_for(self, launch: str) -> bool:
        """Whether `launch` (one of `_PDL_LAUNCHES`) is a programmatic dependent under this plan."""
        return self.pdl and launch not in self.pdl_off.split()


def with_overrides(plan: KernelPlan, spec: str) -> KernelPlan:
    """`plan` with the scalar fields `spec` names changed: `path=value` items separated by `;` or `,`, a
    path of field names through nested plans (`linear_tiles.programs_per_sm=3`,
    `decode_tiles.fp8_block_k=256`, `fp8_activation_rows=None`), each value a Python literal of the
    field's type (an int, float, bool, string or None). A field of tiles typed `... | None` takes None
    (`fp8_linear_tiles=None`). Tables are not overridable here."""
    out = plan
    for item in (part.strip() for part in spec.replace(",", ";").split(";")):
        if not item:
            continue
        path, eq, text = item.partition("=")
        if not eq:
            raise ValueError(f"MOELORA_PLAN item {item!r}: expected path=value, such as decode_pairs=16")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise ValueError(
                f"MOELORA_PLAN item {item!r}: {text.strip()!r} is not a Python literal"
            ) from None
        out = _replace_path(out, path.strip().split("."), value, item)
    return out


def _replace_path(obj: Any, path: list[str], value: Any, item: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise ValueError(f"MOELORA_PLAN item {item!r}: {type(obj).__name__} has no field {path[0]!r}; it has "
                         f"{', '.join(sorted(names))}")  # fmt: skip
    current = getattr(obj, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"MOELORA_PLAN item {item!r}: {path[0]!r} has no fields")
        return replace(obj, **{path[0]: _replace_path(current, path[1:], value, item)})
    scalar = (bool, int, float, str, type(None))
    field_type = next(str(f.type) for f in dataclasses.fields(obj) if f.name == path[0])
    if value is None and "None" in field_type:  # tiles that may be None (`fp8_linear_tiles=None`)
        return replace(obj, **{path[0]: None})
    if not isinstance(current, scalar) or not isinstance(value, scalar):
        raise ValueError(f"MOELORA_PLAN item {item!r}: only scalar fields take a value here")
    if current is not None and value is not None:  # the field's type (an int where a float is)
        same = isinstance(value, type(current)) or (type(current) is float and type(value) is int)
        if not same or isinstance(value, bool) != isinstance(current, bool):
            raise ValueError(
                f"MOELORA_PLAN item {item!r}: {path[0]} takes {_a(type(current).__name__)}, not {value!r}"
            )
    try:
        return replace(obj, **{path[0]: value})
    except ValueError as err:  # a value the plan itself refuses (`KernelPlan.pdl_off`'s names)
        raise ValueError(f"MOELORA_PLAN item {item!r}: {err}") from None


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


TUNED = with_overrides(KernelPlan(), os.environ.get("MOELORA_PLAN", ""))
_AT_START = replace(TUNED)  # TUNED as the process started (MOELORA_PLAN applied), for `use_plan`


def use_plan(spec: str) -> KernelPlan:
    """Make the process's plan `with_overrides(<the plan at start-up>, spec)` ("" restores it) and return it.

    TUNED is changed in place: every op reads it when called (its `plan` argument's default is TUNED, and
    nothing caches a choice made from it), so the next call takes the new plan. For comparing plans in one
    process (`moelora bench latency --plan-variants`): the same weights, memory and warm caches for every
    variant. A captured CUDA graph keeps the kernels it was captured with, so the caller captures again
    (`Engine.use_plan`). A bad spec is refused before anything changes."""
    new = with_overrides(_AT_START, spec)
    for f in dataclasses.fields(KernelPlan):
        object.__setattr__(TUNED, f.name, getattr(new, f.name))  # (frozen: nothing else may change it)
    return TUNED
