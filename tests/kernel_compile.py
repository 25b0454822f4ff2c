"""Compiles every Triton kernel for the GPU (Hopper, sm_90) in bf16 with the shipped tile configurations;
prints one line per failure and exits non-zero if any. Run without TRITON_INTERPRET (the tests run it in a
subprocess, as their conftest turns the interpreter on):  python -m tests.kernel_compile

The interpreter runs the kernels' Python, not Triton's compiler, so errors the compiler raises (a variable
that changes type inside an `if`, a tile needing more shared memory than the chip has) pass every CPU test
and fail only on the GPU. Compiling for the target needs no GPU: Triton's wheel brings the assembler.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moelora.ops.plan import TUNED
from moelora.ops.triton import (
    activation,
    align,
    attn_decode,
    attn_prefill,
    delta,
    delta_prefill,
    fp8_act,
    fp8_linear,
    kv_write,
    linear,
    lora_expand,
    lora_shrink,
    mla,
    moe_decode_down,
    moe_decode_gate_up,
    moe_down,
    moe_expand,
    moe_gate_up,
    moe_shrink,
    moe_sum,
    norm,
    rotary,
    router,
    sample,
)

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED = 232448  # bytes of shared memory a program may use on an H100/H200 (227 KiB)
INT_PTRS = {"ids_ptr", "slot_ptr", "counts_ptr", "bucket_ptr", "rank_ptr", "start_ptr", "seg_ptr"}
INT_PTRS |= {"sorted_ptr", "block_expert_ptr", "bt_ptr", "lens_ptr", "meta_ptr", "tile_ptr", "count_ptr"}
INT_PTRS |= {"ticket_ptr", "shrunk_ptr", "exited_ptr", "pair_count_ptr", "busy_ptr", "tile_count_ptr"}
INT_PTRS |= {"row_hash_ptr", "index_ptr", "starts_ptr", "chunks_ptr", "oslot_ptr", "orank_ptr"}
INT_PTRS |= {"route_count_ptr", "rid_ptr"}
FP32_PTRS = {"xa_ptr", "part_ptr", "ha_ptr", "hp_ptr", "out_ptr", "lse_ptr", "cos_ptr", "sin_ptr"}
FP32_PTRS |= {"xs_ptr", "hs_ptr", "oxa_ptr", "rp_ptr", "rs_ptr"}
FP32_PTRS |= {"logits_ptr", "top_ptr", "temp_ptr", "best_ptr", "state_ptr", "final_ptr", "sc_ptr", "m_ptr"}
FLOATS = {"qk_scale", "eps", "scaling", "in_eps"}
# Run-time strides that are 1 on the GPU (the contiguous dimension of x, the weights, the LoRA A and B, the
# outputs): Triton's launcher specializes an int equal to 1 as a constant, and pointers as 16-byte aligned;
# without both, loads compile unvectorized and unpipelined, and registers, spills and shared memory are
# not what the GPU gets.
ONES = {"sx_k", "sw_k", "sa_k", "sd_k", "sb_r", "swr_k", "sy_n", "soa_k"}
# and strides the launcher finds divisible by 16 at the shipped shapes (rows of x, the weights, the LoRA A
# and B): a hint of 16 as it gives them (other ints, such as the router's top-k stride, are left unhinted)
DIV16 = {"sx_t", "sw_e", "sw_n", "sa_s", "sa_e", "sa_h", "sa_r", "sb_s", "sb_e", "sb_h", "sb_n", "sd_s"}
DIV16 |= {"sd_e", "sd_r", "sy_t", "swr_e", "sa_l"}  # sa_l: a stacked A's lane rows (the linear layer's)
DIV16 |= {"s_in_t"}  # the rows of the residual the linear layer's input norm adds
Case = tuple[Callable, dict, int] | tuple[Callable, dict, int, int]  # kernel, constexprs, warps[, stages]


def compile_for_hopper(kernel, constexprs: dict, warps: int = 4, stages: int = 3) -> Any:
    """Pointers are bf16 unless named as int or fp32 buffers; `*_desc` arguments are bf16 tensor descriptors
    of the block shape constexprs["descs"][name] (pointers when not given); other run-time arguments i32.
    constexprs["fp8"] (taken out): the expert weights (`w_ptr`, `w_desc`) are FP8 (e4m3);
    constexprs["fp8_acts"] (taken out): the names of FP8 activations (W8A8's `x_ptr`, `h_ptr`, `h_desc`).
    A kernel that can be a programmatic dependent launch compiles as one (PDL on) unless told."""
    signature, constants, attrs = {}, {}, {}
    if "PDL" in kernel.arg_names:
        constexprs.setdefault("PDL", True)
    descs = constexprs.pop("descs", {})
    fp8 = constexprs.pop("fp8", False)
    fp8_names = {"w_ptr", "w_desc"} if fp8 else set()
    fp8_names |= set(constexprs.pop("fp8_acts", ()))
    for i, name in enumerate(kernel.arg_names):
        weight = "fp8e4nv" if name in fp8_names else "bf16"
        if name in constexprs:
            signature[name] = "constexpr"
            constants[(i,)] = constexprs[name]
        elif name in descs:
            signature[name] = f"tensordesc<{weight}[{', '.join(map(str, descs[name]))}]>"
        elif name.endswith("_ptr") or name.endswith("_desc"):
            signature[name] = "*i32" if name in INT_PTRS else "*fp32" if name in FP32_PTRS else f"*{weight}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ONES:
            signature[name] = "constexpr"
            constants[(i,)] = 1
        elif name in DIV16:
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.isupper():
            raise ValueError(f"{kernel.__name__}: no value for constexpr {name}")
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    options = {"num_warps": warps, "num_stages": stages, "launch_pdl": bool(constexprs.get("PDL"))}
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=HOPPER, options=options)
    if compiled.metadata.shared > HOPPER_SHARED:
        raise ValueError(
            f"needs {compiled.metadata.shared} bytes of shared memory, the SM has {HOPPER_SHARED}"
        )
    return compiled


def registers(compiled: Any) -> tuple[int, int]:
    """(registers a thread, bytes of spill stores) of a compiled kernel, from Triton's own ptxas run on its
    PTX (`-v`): what the GPU's driver would report, seen without one."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        run = subprocess.run(
            [str(ptxas), "-v", "--gpu-name=sm_90a", str(ptx), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.search(r"(\d+) bytes spill stores", run.stderr)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0


def moe_cases() -> Iterator[Case]:
    """The grouped GEMMs at every entry of the tile table, with and without LoRA (rank 16 and 64); FP8
    weights times x's dtype (W8A16) or FP8 activations (W8A8: K steps of one 128-column group)."""
    for _, base, lora in TUNED.moe_table:
        for t, has_lora in ((base, False), (lora, True)):
            for rank in (16, 64) if has_lora else (16,):
                common = dict(HAS_LORA=has_lora, HAS_RANK=has_lora, EXPAND=1, BLOCK_M=t.block_m)
                common |= dict(BLOCK_N=t.block_n, BLOCK_K=t.block_k, BLOCK_R=rank, GROUP_M=t.group_m)
                common |= dict(PRECISION="tf32", PARTS=8 if has_lora and t.block_m == 16 else 1)
                unscaled = dict(HAS_SCALE=False, GROUP=1, ACT_FP8=0)
                for down_shrink in (False, True) if has_lora and t.block_m == 16 else (False,):
                    gate_up = dict(HIDDEN=2048, DOWN_SHRINK=down_shrink, IL_EXPAND=rank <= 16, **common)
                    plain = gate_up | dict(HAS_BIAS=False, CLAMPED=False)
                    yield moe_gate_up._gate_up_kernel, plain | unscaled, t.warps
                    fp8 = dict(HAS_SCALE=True, GROUP=128, BLOCK_K=min(t.block_k, 128), fp8=True, ACT_FP8=0)
                    yield moe_gate_up._gate_up_kernel, plain | fp8, t.warps
                    w8a8 = dict(BLOCK_K=128, ACT_FP8=True, fp8_acts=("x_ptr",))
                    yield moe_gate_up._gate_up_kernel, plain | fp8 | w8a8, t.warps
                # GPT-OSS's biases and clamped SwiGLU (HIDDEN 2880: not a multiple of the K step)
                gpt_oss = dict(gate_up, HIDDEN=2880, HAS_BIAS=True, CLAMPED=True)
                yield moe_gate_up._gate_up_kernel, gpt_oss | unscaled, t.warps
                d = t.for_down(rank if has_lora else 0)  # rank is a power of 2: its BLOCK_R
                persistent = d.tma_down and not has_lora
                down = {**common, "INTER": 768, "BLOCK_N": d.block_n, "PIPELINED": True}
                down |= {"PERSISTENT": persistent, "BLOCKS_PAD": 1024 if persistent else 1}
                for tma in (True, False) if d.tma_down else (False,):
                    for scaled, act in ((False, 0), (True, 0), (True, 1)):
                        block_k = 128 if act else min(d.block_k, 128) if scaled else d.block_k
                        descs = {"h_desc": [d.block_m, block_k], "w_desc": [d.block_n, block_k]}
                        down |= {"TMA": tma, "descs": descs if tma else {}, "BLOCK_K": block_k}
                        down |= dict(
                            HAS_SCALE=scaled, GROUP=128 if scaled else 1, fp8=scaled, ACT_FP8=bool(act)
                        )
                        down |= dict(fp8_acts=("h_ptr", "h_desc") if act else ())
                        stages = min(d.stages, 3) if block_k > d.block_k else d.stages  # as moe_down
                        yield moe_down._down_kernel, dict(down), t.warps, stages
    # W8A8 takes the tiles of its own table (base and LoRA alike)
    for _, t in TUNED.fp8_act_table:
        for has_lora in (False, True):
            common = dict(HAS_LORA=has_lora, HAS_RANK=has_lora, EXPAND=1, BLOCK_M=t.block_m, BLOCK_R=16)
            common |= dict(BLOCK_N=t.block_n, BLOCK_K=128, GROUP_M=t.group_m, PRECISION="tf32", PARTS=1)
            common |= dict(HAS_SCALE=True, GROUP=128, fp8=True, ACT_FP8=True)
            gate_up = dict(HIDDEN=2048, DOWN_SHRINK=False, IL_EXPAND=True, HAS_BIAS=False, CLAMPED=False)
            yield moe_gate_up._gate_up_kernel, common | gate_up | dict(fp8_acts=("x_ptr",)), t.warps
            d = t.for_down(16 if has_lora else 0)
            down = dict(INTER=768, PIPELINED=True, PERSISTENT=False, BLOCKS_PAD=1, TMA=False, descs={})
            down |= dict(fp8_acts=("h_ptr", "h_desc"))
            yield moe_down._down_kernel, common | down | dict(BLOCK_N=d.block_n), t.warps, d.stages
    for halves, gather in ((2, True), (1, False)):
        for block_m, block_r in ((16, 32), (64, 128)):
            in_dim = 2048 if gather else 768
            shrink = dict(IN_DIM=in_dim, CHUNK=256 if block_m == 16 else in_dim, HALVES=halves, GATHER=gather)
            shrink |= dict(HAS_RANK=True)
            shrink |= dict(BLOCK_M=block_m, BLOCK_K=TUNED.shrink_k, BLOCK_R=block_r, PRECISION="tf32")
            yield moe_shrink._shrink_kernel, shrink, 4
    for rank in (16, 64):
        expand = dict(HIDDEN=2048, TILES=4, PARTS=3, HAS_RANK=True, EXPAND=TUNED.expand_16bit, BLOCK_M=64)
        expand |= dict(BLOCK_N=TUNED.expand_n)
        expand |= dict(BLOCK_R=rank)
        expand |= dict(PRECISION="tf32")
        yield moe_expand._expand_kernel, expand, 4
    yield align._count_kernel, dict(HAS_SLOT=True, BLOCK=1024), 4
    yield align._prefix_kernel, dict(E_PAD=128, C_PAD=32, BUSY_PAD=2048), 4
    yield align._scatter_kernel, dict(BLOCK=1024, BLOCKS=64, BLOCK_M=16, E_PAD=128), 4
    # all four in one program (`align_one_launch`): Qwen3's 128 experts, 8 slots, 64 tokens of top 8
    one = dict(HAS_SLOT=True, BLOCK=512, BLOCKS=64, BLOCK_M=16, E_PAD=128, C_PAD=16, BUSY_PAD=512)
    yield align._align_one_kernel, one, 4
    for has_bias in (False, True):
        yield moe_sum._sum_kernel, dict(TOP_K=8, BLOCK_N=1024, HAS_BIAS=has_bias), 4
    for top_k, experts in ((8, 128), (2, 8)):
        route = dict(TOP_K=top_k, K_PAD=top_k, RENORMALIZE=True, BLOCK_T=min(16, 4096 // experts))
        route |= dict(BLOCK_E=experts)
        yield router._route_kernel, route, 4
        one = dict(IN_DIM=2048, SPLITS=16, K_CHUNK=128, TOP_K=top_k, K_PAD=top_k, RENORMALIZE=True)
        one |= dict(BLOCK_T=16, BLOCK_E=max(16, experts), BLOCK_K=128, PRECISION="tf32", DOT=True)
        one |= dict(NORM=False, WEIGHT_FIRST=False, NORM_K=512, LINE=64, LINES=2)
        yield router._router_kernel, one, 4
        yield router._router_kernel, one | dict(NORM=True), 4  # the post-attention norm in it
        # one token: products in registers, 64 columns a program (new dicts: the ones above were yielded)
        single = one | dict(BLOCK_T=1, K_CHUNK=64, SPLITS=32, BLOCK_K=64, DOT=False, NORM_K=2048, LINES=1)
        yield router._router_kernel, single, 4
        yield router._router_kernel, single | dict(NORM=True), 4
    # DeepSeek-V3 (256 experts in 8 groups), GLM-4.5 (128, one group), DeepSeek-V2 (160 in 8, softmax),
    # Kimi-K2 (384, one group)
    forms = ((256, 8, 4, 8, True), (128, 1, 1, 8, True), (160, 8, 3, 6, False), (384, 1, 1, 8, True))
    for experts, groups, topk_groups, k, sigmoid in forms:
        block_e = triton.next_power_of_2(experts)
        grouped = dict(SIGMOID=sigmoid, GROUPS=groups, G_PAD=triton.next_power_of_2(groups))
        grouped |= dict(TOPK_GROUPS=topk_groups, TOP_K=k, K_PAD=triton.next_power_of_2(k), RENORMALIZE=True)
        grouped |= dict(BLOCK_T=max(1, min(16, 4096 // block_e)), BLOCK_E=block_e)
        yield router._grouped_route_kernel, grouped, 4


def decode_cases() -> Iterator[Case]:
    t, d = TUNED.decode_tiles, TUNED.decode_down_tiles
    for has_lora, step_sum in itertools.product((False, True), (False, True)):
        tiles = dict(HAS_LORA=has_lora, HAS_RANK=has_lora, BLOCK_N=t.block_n, BLOCK_K=t.block_k, BLOCK_R=64)
        gate_up = dict(HIDDEN=2048, SPLITS=8, CHUNK=256, SHRINK_K=64, N_TILES=48, STEP_SUM=step_sum, **tiles)
        gate_up |= dict(AHEAD=False)
        down = dict(HAS_LORA=has_lora, HAS_RANK=has_lora, BLOCK_N=d.block_n, BLOCK_K=d.block_k, BLOCK_R=64)
        down |= dict(STEP_SUM=step_sum, SHRINK_PARTS=48, AHEAD=False)
        # each step's loads a step ahead (`decode_common.ahead_mode`; with LoRA `lora_ahead`), and not
        ahead = (False, True)
        for gpt_oss, a in itertools.product((False, True), ahead):  # GPT-OSS's biases and clamped SwiGLU
            extras = dict(HAS_BIAS=gpt_oss, CLAMPED=gpt_oss, HAS_SCALE=False, GROUP=1, AHEAD=a)
            yield moe_decode_gate_up._decode_gate_up_kernel, gate_up | extras, t.warps
            down_case = dict(INTER=2880 if gpt_oss else 768, TOP_K=8, HAS_BIAS=gpt_oss, **down)
            down_case |= dict(LINE=64, LINES=64 if gpt_oss else 16, AHEAD=a)  # (LINE: the PDL prefetch's)
            yield moe_decode_down._decode_down_kernel, down_case | dict(HAS_SCALE=False, GROUP=1), d.warps
        # FP8 experts (scales per row and 128 columns): K steps of one group, or over 2, 4 or 8 groups
        # (`DecodeTiles.fp8_block_k`; 1,024 is shipped, with the groups summed apart)
        fp8 = dict(HAS_BIAS=False, CLAMPED=False, HAS_SCALE=True, GROUP=128, fp8=True)
        down_case = dict(INTER=768, TOP_K=8, HAS_BIAS=False, HAS_SCALE=True, GROUP=128, fp8=True, **down)
        down_case |= dict(LINE=128, LINES=8)
        for step in (128, 256, 512, 1024):
            yield moe_decode_gate_up._decode_gate_up_kernel, gate_up | fp8 | dict(BLOCK_K=step), t.warps
            yield moe_decode_down._decode_down_kernel, down_case | dict(BLOCK_K=step), d.warps
            if step_sum and step > 128:  # each group's products summed, then scaled (`fp8_group_sums`)
                for a in ahead:
                    sums = dict(BLOCK_K=step, STEP_SUM=2, AHEAD=a)
                    yield moe_decode_gate_up._decode_gate_up_kernel, gate_up | fp8 | sums, t.warps
                    yield moe_decode_down._decode_down_kernel, down_case | sums, d.warps
            if step == 128 and not has_lora:  # steps in one group, a step ahead
                one = dict(BLOCK_K=step, AHEAD=True)
                yield moe_decode_gate_up._decode_gate_up_kernel, gate_up | fp8 | one, t.warps
                yield moe_decode_down._decode_down_kernel, down_case | one, d.warps


def dense_lora_cases() -> Iterator[Case]:
    for _, t in TUNED.lora_table:
        shrink = dict(IN_DIM=2048, K_CHUNK=min(t.k_chunk, 2048), BLOCK_M=t.block_m, BLOCK_K=t.shrink_k)
        shrink |= dict(BLOCK_R=64, PRECISION="tf32", HAS_RANK=True)
        yield lora_shrink._lora_shrink_kernel, shrink, t.warps
        expand = dict(SPLITS=8, BLOCK_M=t.block_m, BLOCK_N=t.expand_n, BLOCK_R=64, SLOT_GROUP=2)
        expand |= dict(EXPAND=1, PRECISION="tf32", HAS_RANK=True, END0=4096, END1=4608, END2=1 << 30)
        yield lora_expand._lora_expand_kernel, expand, t.warps


def linear_cases() -> Iterator[Case]:
    """The one-launch linear layer at Qwen3's q/k/v (3 parts, 3 splits) and o (8 splits) shapes, with and
    without LoRA, at 1 and 16 tokens (one 16-row block) and at the plan's most tokens; FP8 weights (their
    own `fp8_linear_tiles`, K steps of one 128-column group) up to the plan's most FP8 tokens; past them
    the FP8 GEMM; the FP8 weight's dequantisation."""
    t = TUNED.linear_tiles
    most = max(16, triton.next_power_of_2(TUNED.linear_tokens))
    most_fp8 = max(16, triton.next_power_of_2(TUNED.fp8_linear_tokens))
    variants = [(False, block_m) for block_m in sorted({16, most})]
    variants += [(True, block_m) for block_m in sorted({16, most_fp8})]
    for (in_dim, parts, splits), has_lora, (fp8, block_m) in itertools.product(
        ((2048, 3, 3), (4096, 1, 8)), (False, True), variants
    ):
        tiles = (TUNED.fp8_linear_tiles or t) if fp8 else t  # an FP8 weight's own tiles
        case = dict(IN_DIM=in_dim, HAS_BIAS=not has_lora, HAS_LORA=has_lora, HAS_RANK=has_lora)
        case |= dict(HAS_SCALE=fp8, GROUP=128 if fp8 else 1, fp8=fp8)
        case |= dict(SPLITS=splits, K_CHUNK=in_dim // splits // tiles.block_k * tiles.block_k + tiles.block_k)
        chunks = in_dim // tiles.shrink_chunk
        case |= dict(NUM_SLOTS=8, SHRINKS=8 * chunks, CHUNKS=chunks, SHRINK_CHUNK=tiles.shrink_chunk)
        case |= dict(PARTS=parts)
        case |= dict(END0=4096, END1=4608, END2=1 << 30, BLOCK_M=block_m, BLOCK_N=tiles.block_n)
        case |= dict(BLOCK_K=tiles.block_k, BLOCK_R=16, BLOCK_L=64 if parts == 3 else 16)
        case |= dict(EXPAND=1, SLOT_GROUP=8)
        line = 128 if fp8 else 64  # weights a cache line holds (the prefetch's step under PDL)
        case |= dict(PRECISION="tf32", LINE=line, LINES=triton.next_power_of_2(-(-case["K_CHUNK"] // line)))
        case |= dict(EARLY=False, ROUTE=False, ROUTE_T=1, BLOCK_E=16, TOP_K=1, K_PAD=1, RENORMALIZE=False)
        case |= dict(WEIGHT_FIRST=False, NORM_K=16, ROUTE_LINES=1, ROUTE_DIM=1, ROUTE_TILES=1)
        case |= dict(NORM=False, NORM_RES=False, NORM_WF=False, NORM_CHUNK=2048)
        yield linear._linear_kernel, case | dict(FOLD=False, XA_READY=False), tiles.warps, tiles.stages
        if parts == 3 and block_m == 16:  # q/k/v with the input norm and its residual add in the launch
            norm = dict(NORM=True, NORM_RES=True, FOLD=False)
            yield linear._linear_kernel, case | norm | dict(XA_READY=False), tiles.warps, tiles.stages
            if has_lora:  # given the shrink by `norm.norm_shrink`
                ready = case | norm | dict(XA_READY=True, SHRINKS=0, EARLY=True)
                yield linear._linear_kernel, ready, tiles.warps, tiles.stages
        for rows in (1, 16) if parts == 1 and block_m == 16 else ():
            # o, then the norm and Qwen3's router (128 experts, top 8) in its launch, for 1 and 16 tokens
            route = dict(ROUTE=True, ROUTE_T=rows, BLOCK_E=128, TOP_K=8, K_PAD=8, RENORMALIZE=True)
            route |= dict(
                NORM_K=8192 // rows, ROUTE_LINES=1, ROUTE_DIM=2048, ROUTE_TILES=2048 // tiles.block_n
            )
            yield (
                linear._linear_kernel,
                case | route | dict(FOLD=False, XA_READY=False),
                tiles.warps,
                tiles.stages,
            )
            if has_lora:  # given o's shrink by the decode attention
                ready = case | route | dict(FOLD=False, XA_READY=True, SHRINKS=0, EARLY=True)
                yield linear._linear_kernel, ready, tiles.warps, tiles.stages
        if has_lora:  # the shrink from the norm before (`norm.add_norm_shrink`): no shrink programs
            ready = case | dict(FOLD=False, XA_READY=True, SHRINKS=0)
            # B and xa loaded before the GEMV (`linear_expand_early`), and after it (slots past one group)
            yield linear._linear_kernel, ready | dict(EARLY=True), tiles.warps, tiles.stages
            yield linear._linear_kernel, ready, tiles.warps, tiles.stages
        if fp8:  # each step's dot scaled instead of the weight tile (`fp8_linear_scale_dots`)
            yield (
                linear._linear_kernel,
                case | dict(FOLD=False, XA_READY=False, HAS_SCALE=2),
                tiles.warps,
                tiles.stages,
            )
        if fp8 and block_m == 16:  # the most stages `bench/linear.py --sweep --fp8` tries (shared memory)
            yield linear._linear_kernel, case | dict(FOLD=False, XA_READY=False, BLOCK_N=128), tiles.warps, 8
        if has_lora and block_m == 16:  # one token: the shrink folded into the GEMV (`linear_fold_steps`)
            yield (
                linear._linear_kernel,
                case | dict(FOLD=True, XA_READY=False, SHRINKS=0),
                tiles.warps,
                tiles.stages,
            )
    g = TUNED.fp8_gemm_tiles
    # 40 to 64 tokens of Qwen3's q/k/v: tiles narrowed to fill the card (`fp8_linear.filled_block_n`)
    narrow = {fp8_linear.filled_block_n(g.block_n, rows, 5120, 132) for rows in (1, 2)}
    for block_m, has_bias, block_n in [(16, False, g.block_n), (g.block_m, True, g.block_n)] + [
        (g.block_m, False, n) for n in sorted(narrow - {g.block_n})
    ]:
        gemm = dict(IN_DIM=2048, GROUP=128, HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n)
        gemm |= dict(BLOCK_K=min(g.block_k, 128), GROUP_M=g.group_m, PRECISION="tf32", fp8=True)
        yield fp8_linear._fp8_matmul_kernel, gemm, g.warps, g.stages
    yield fp8_linear._dequantize_kernel, dict(GROUP=128, BLOCK_N=32, BLOCK_K=128, fp8=True), 4
    yield fp8_act._quantize_kernel, dict(GROUP=128, BLOCK_T=32, BLOCK_G=128, MODE=1, fp8_acts=("q_ptr",)), 4


def attention_and_small_op_cases() -> Iterator[Case]:
    head = dict(HEAD_DIM=128, BLOCK_D=128, PAGE=16, HAS_WINDOW=False, IEEE=False, PIPELINED=True)
    for sinks in (False, True):
        decode = dict(GROUP=8, GROUP_PAD=16, BLOCK_N=64, WRITE_LSE=True, HAS_SINKS=sinks)
        decode |= dict(ROTATE=False, QK_NORM=0, ROT=128)
        decode |= dict(O_SLOTS=0, O_HAS_RANK=False, GROUP_P2=1, BLOCK_R=16, O_LINE=1, O_LINES=16)
        yield attn_decode._decode_kernel, head | decode, 4
        # o's LoRA shrink in the launch (`o_shrink_tokens`): 8 slots of rank 16, 8 heads a group
        o_shrink = dict(O_SLOTS=8, O_HAS_RANK=True, GROUP_P2=8, BLOCK_R=16, O_LINE=64, O_LINES=256)
        yield attn_decode._decode_kernel, head | decode | o_shrink | dict(ROTATE=True, QK_NORM=1), 4
        # the norm and rotary embedding inside (`rotary_in_decode`): Qwen3's q/k norm; GPT-OSS's sinks
        # without one; a zero-centred norm and a quarter of the head rotated (Qwen3.5's full attention)
        yield attn_decode._decode_kernel, head | decode | dict(ROTATE=True, QK_NORM=0 if sinks else 1), 4
        yield attn_decode._decode_kernel, head | decode | dict(ROTATE=True, QK_NORM=2, ROT=32), 4
        prefill = dict(
            GROUP=8, PAGED=True, BLOCK_M=64, BLOCK_N=64, HAS_SINKS=sinks, HEAD_DV=128, BLOCK_DV=128
        )
        yield attn_prefill._prefill_kernel, head | prefill, 4
    # latent attention's expanded prefill: keys of 192 (DeepSeek's 128 + 64), values of 128, its tiles
    t = attn_prefill.prefill_tiles(192)
    expanded = dict(head, HEAD_DIM=192, BLOCK_D=256, HEAD_DV=128, BLOCK_DV=128, GROUP=1, PAGED=False)
    expanded |= dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, HAS_SINKS=False)
    yield attn_prefill._prefill_kernel, expanded, t.warps, t.stages
    latent = dict(RANK=512, ROPE=64, BLOCK_R=512, BLOCK_D=64, PAGE=16, BLOCK_H=16, BLOCK_N=32)
    for write_lse in (False, True):
        yield mla._latent_decode_kernel, latent | dict(WRITE_LSE=write_lse, IEEE=False, PIPELINED=True), 4, 2
    yield kv_write._write_kv_kernel, dict(BLOCK=512), 4
    # Qwen3-Next's linear attention: 128-wide key and value heads; its conv over 8,192 channels, width 4
    step = dict(DK=128, DV=128, BLOCK_K=128, BLOCK_V=32, INTERPRETED=False)
    for gates in (False, True):  # with the gates found from the projections a and b in the launch
        yield delta._delta_step_kernel, step | dict(GATES=gates), 4
    yield delta._conv_step_kernel, dict(WIDTH=4, BLOCK_C=256, BLOCK_W=4), 4
    for chunk in (16, 32, 64):
        chunked = dict(DK=128, DV=128, BLOCK_K=128, BLOCK_V=32, CHUNK=chunk, PRECISION="tf32x3")
        yield (
            delta_prefill._delta_inverse_kernel,
            dict(DK=128, BLOCK_K=128, CHUNK=chunk, PRECISION="tf32x3"),
            4,
        )
        for has_initial, split in itertools.product((False, True), (False, True)):
            yield delta_prefill._delta_chunk_kernel, chunked | dict(HAS_INITIAL=has_initial, SPLIT=split), 4
    for has_initial in (False, True):
        conv = dict(WIDTH=4, BLOCK_C=128, BLOCK_T=16, BLOCK_W=4, HAS_INITIAL=has_initial)
        yield delta_prefill._conv_kernel, conv, 4
    yield delta._gates_kernel, dict(INTERPRETED=False, BLOCK=1024), 4
    for weight_first in (False, True):
        yield norm._rms_norm_kernel, dict(HAS_RESIDUAL=True, WEIGHT_FIRST=weight_first, BLOCK_N=2048), 4
        # q/k/v's LoRA shrink in the input norm's launch: 3 parts of rank 16, or 256 lanes
        for block_l, chunk in ((64, 256), (256, 64)):
            for store in (True, False):  # `add_norm_shrink`, `norm_shrink`
                shrink = dict(
                    WEIGHT_FIRST=weight_first, BLOCK_N=2048, CHUNK=chunk, BLOCK_L=block_l, STORE=store
                )
                yield norm._add_norm_shrink_kernel, shrink, 8
    yield norm._gated_rms_norm_kernel, dict(ROUND=True, BLOCK_N=128), 1
    yield activation._silu_mul_kernel, dict(BLOCK=1024), 4
    yield activation._add_gated_kernel, dict(BLOCK=1024), 4
    for to_cache in (False, True):
        yield rotary._rotary_kernel, dict(HAS_NORM=True, TO_CACHE=to_cache, BLOCK_H=4, BLOCK_HALF=64), 4
    for from_logits in (False, True):
        race = dict(FROM_LOGITS=from_logits, SALT=sample.signed32(sample.COLUMN_SALT), M0=sample.MULT[0])
        race |= dict(M1=sample.MULT[1], CHUNK=sample.CHUNK, BLOCK=sample.BLOCK, INTERPRETED=False)
        yield sample._race_kernel, race, 4


def all_cases() -> list[Case]:
    return [
        *moe_cases(),
        *decode_cases(),
        *dense_lora_cases(),
        *linear_cases(),
        *attention_and_small_op_cases(),
    ]


@functools.cache
def _cases() -> list[Case]:
    """`all_cases()`, built once per worker process."""
    return all_cases()


def compile_case(index: int, regs_of: str | None) -> str:
    """Compile case `index` of `all_cases()` (in a worker process: kernels do not pickle): "" if it
    compiles, else the failure; with `regs_of` (a kernel name part) the registers line of a match."""
    kernel, constexprs, warps, *stages = _cases()[index]
    keys = ("BLOCK", "HAS", "ACT", "STEP")
    shown = {k: v for k, v in constexprs.items() if k.isupper() and k.startswith(keys)}
    try:
        compiled = compile_for_hopper(kernel, dict(constexprs), warps, *stages)
    except Exception as err:  # report every failing kernel, not only the first
        return f"FAILED {kernel.__name__} {constexprs} warps={warps}: {str(err)[-800:]}"
    if regs_of is not None and regs_of in kernel.__name__:
        regs, spill = registers(compiled)
        return f"{kernel.__name__} warps={warps} {shown}: {regs} registers, {spill} bytes spilled"
    return ""


def main() -> int:
    """Compile every case, on every core; with `--regs [NAME]` also print the registers and spills of
    each whose kernel name contains NAME: python -m tests.kernel_compile --regs decode."""
    regs_of = None
    if "--regs" in sys.argv:
        regs_of = sys.argv[sys.argv.index("--regs") + 1] if sys.argv[-1] != "--regs" else ""
    count = len(all_cases())
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        lines = list(pool.map(compile_case, range(count), itertools.repeat(regs_of)))
    for line in lines:
        if line:
            print(line)
    failed = sum(line.startswith("FAILED") for line in lines)
    print(f"{count - failed} of {count} kernels compiled for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
