"""Tile sweeps behind `bench/moe_lora.py --sweep`: the grouped-GEMM and decode tile tables (base MoE and
each --lora pool), and the dense multi-LoRA tile table with the q/k/v stacked shrink against one call per
part. Prints one table row per configuration."""

from __future__ import annotations

import argparse
from dataclasses import replace
from functools import partial

import torch
from moe_lora import SHAPES, lora_buffers, route
from timing import graph_us

from moelora import ops
from moelora.ops.plan import DecodeTiles, KernelPlan, LoraTiles, Tiles
from moelora.ops.triton.tiles import moe_tiles, use_decode_path

SWEEP = (
    Tiles(32, 64, 64, 4, 3),
    Tiles(64, 64, 64, 4, 3),
    Tiles(64, 128, 64, 4, 4),
    Tiles(128, 128, 64, 8, 3, group_m=1 << 20),  # row blocks fastest: the order before grouping
    Tiles(128, 128, 64, 8, 3, group_m=8),
    Tiles(128, 128, 64, 8, 3, group_m=32),
    Tiles(128, 128, 32, 8, 5),
)
DECODE_SWEEP = (
    DecodeTiles(8, 256, 4),
    DecodeTiles(8, 512, 4),
    DecodeTiles(16, 128, 4),
    DecodeTiles(16, 256, 4),
    DecodeTiles(16, 256, 8),
    DecodeTiles(32, 128, 4),
)
DOWN_SWEEP = (  # the down GEMV's tiles (`decode_down_tiles`), the gate/up's as planned
    DecodeTiles(8, 128, 4),
    DecodeTiles(16, 256, 4),
    DecodeTiles(32, 128, 4),
)
LORA_SWEEP = (
    LoraTiles(16, 128, 256, 64, 4, 2),
    LoraTiles(16, 128, 512, 64, 4, 2),
    LoraTiles(16, 64, 128, 64, 4, 2),
    LoraTiles(16, 256, 1 << 30, 64, 4, 3),
    LoraTiles(32, 128, 512, 128, 4, 3),
    LoraTiles(64, 128, 1 << 30, 128, 4, 3),
    LoraTiles(64, 128, 512, 128, 4, 3),
)


def lora_times(moe: tuple, bufs: dict, reps: int, plan: KernelPlan) -> str:
    """Base + LoRA time of each pool in `bufs` ((adapters, rank) -> buffers), a new adapter every 4 tokens."""
    out = []
    for (s, r), buf in bufs.items():
        slot = ((torch.arange(moe[0].shape[0], device="cuda") // 4) % s).to(torch.int32)
        fn = partial(ops.fused_moe_lora, *moe, slot, buf, plan=plan)
        out.append(f"lora {s}x{r} {graph_us(fn, reps=reps):.0f}")
    return "; ".join(out)


def sweep(name: str, ms: list[int], args: argparse.Namespace) -> None:
    """Base MoE and MoE-LoRA (each --lora spec) time per tile configuration (the tables patched to one
    entry), to fill the tile tables: the grouped-GEMM table, or the decode tiles where M takes that path."""
    hidden, inter, num_experts, k = SHAPES[name]
    dt = dict(dtype=torch.bfloat16, device="cuda")
    w_gu = torch.randn(num_experts, 2 * inter, hidden, **dt) * hidden**-0.5
    w_dn = torch.randn(num_experts, hidden, inter, **dt) * inter**-0.5
    loras = [(int(a), int(r)) for a, r in (spec.split("x") for spec in args.lora.split(","))]
    bufs = {(s, r): lora_buffers(s, num_experts, hidden, inter, r) for s, r in loras}
    gen = torch.Generator(device="cuda").manual_seed(0)
    plan: KernelPlan = args.plan
    for m in ms:
        x = torch.randn(m, hidden, **dt)
        ids, weights = route(m, num_experts, k, gen)
        flops = 2 * m * k * 3 * hidden * inter
        decode = use_decode_path(m * k, num_experts, k, plan)
        moe = (x, w_gu, w_dn, ids, weights)

        if decode:  # the aligned path at the same M, for reference
            aligned_plan = replace(plan, decode_pairs=0)
            us = graph_us(partial(ops.fused_moe, *moe, plan=aligned_plan), reps=args.reps)
            aligned = moe_tiles(m * k, num_experts, 0, aligned_plan)
            lora = lora_times(moe, bufs, args.reps, aligned_plan)
            print(f"| sweep | {name} | {m} | aligned {aligned} | {us:.0f} | | {lora} |")
        configs = [("", t) for t in DECODE_SWEEP] + [("down ", t) for t in DOWN_SWEEP] if decode else []
        for what, t in configs or [("", t) for t in SWEEP]:
            if isinstance(t, Tiles):
                if t.block_m > 2 * m * k:
                    continue
                one = replace(plan, moe_table=((float("inf"), t, t),))
            elif what:
                one = replace(plan, decode_down_tiles=t)
            else:
                one = replace(plan, decode_tiles=t)
            label = f"| sweep | {name} | {m} | {what}{t} |"
            try:
                reps = max(5, args.reps // 2)
                us = graph_us(partial(ops.fused_moe, *moe, plan=one), reps=reps)
                tflops = flops / us / 1e6
                print(
                    f"{label} {us:.0f} | {tflops:.0f} TFLOP/s | {lora_times(moe, bufs, reps, one)} |",
                    flush=True,
                )
            except Exception as err:  # a configuration the compiler refuses (shared memory, registers)
                print(f"{label} failed: {str(err).splitlines()[0][:80]} |", flush=True)


def sweep_dense(args: argparse.Namespace) -> None:
    """Dense multi-LoRA (`add_lora`, q projection of Qwen3-30B-A3B: 2048 -> 4096) per tile configuration;
    4 adapters of rank 16 and 16 of rank 64, a new adapter every 4 tokens up to 64 tokens, every 128 above."""
    d_in, d_out = 2048, 4096
    for num_tokens in (1, 16, 64, 2048, 8192):
        x = torch.randn(num_tokens, d_in, dtype=torch.bfloat16, device="cuda")
        y = torch.randn(num_tokens, d_out, dtype=torch.bfloat16, device="cuda")
        seg = 4 if num_tokens <= 64 else 128
        for s, r in ((4, 16), (16, 64)):
            a = torch.randn(s, r, d_in, dtype=torch.bfloat16, device="cuda") * d_in**-0.5
            b = torch.randn(s, d_out, r, dtype=torch.bfloat16, device="cuda") * r**-0.5
            slot = ((torch.arange(num_tokens, device="cuda") // seg) % s).to(torch.int32)
            floor = (num_tokens * (d_in + 2 * d_out) + s * r * (d_in + d_out)) * 2 / (args.tbps * 1e12) * 1e6
            for t in LORA_SWEEP:
                one = replace(args.plan, lora_table=((float("inf"), t),))
                label = f"| dense | {num_tokens} | {s}x{r} | {t} |"
                try:
                    fn = partial(ops.add_lora, y, x, a, b, slot, plan=one)
                    us = graph_us(fn, reps=max(5, args.reps // 2))
                    print(f"{label} {us:.1f} | floor {floor:.1f} |", flush=True)
                except Exception as err:
                    print(f"{label} failed: {str(err).splitlines()[0][:80]} |", flush=True)
            qkv(x, slot, s, r, args)


def qkv(x: torch.Tensor, slot: torch.Tensor, s: int, r: int, args: argparse.Namespace) -> None:
    """q/k/v LoRA of Qwen3-30B-A3B (4096 + 512 + 512 outputs): one stacked shrink vs one add_lora per part."""
    sizes = (4096, 512, 512)
    a = torch.randn(s, 3, r, x.shape[1], dtype=torch.bfloat16, device="cuda") * x.shape[1] ** -0.5
    b = torch.randn(s, sum(sizes), r, dtype=torch.bfloat16, device="cuda") * r**-0.5
    y = torch.randn(x.shape[0], sum(sizes), dtype=torch.bfloat16, device="cuda")

    def per_part() -> None:
        offset = 0
        for p, n in enumerate(sizes):
            ops.add_lora(
                y[:, offset : offset + n], x, a[:, p], b[:, offset : offset + n], slot, plan=args.plan
            )
            offset += n

    reps = max(5, args.reps // 2)
    stacked = graph_us(partial(ops.add_lora_parts, y, x, a, b, slot, sizes, plan=args.plan), reps=reps)
    parts = graph_us(per_part, reps=reps)
    print(f"| qkv | {x.shape[0]} | {s}x{r} | stacked {stacked:.1f} | per part {parts:.1f} |", flush=True)
