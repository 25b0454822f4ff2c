"""The linear layers of a decode step: cuBLAS plus the dense LoRA kernels against the one-launch linear
layer (`ops/triton/linear.py`), Qwen3-30B-A3B shapes (q/k/v 2048 -> 4096 + 512 + 512, o 4096 -> 2048,
router 2048 -> 128), bf16.

Each row times a CUDA graph of one call per layer over `--layers` layers with distinct weights (more
bytes than the L2 holds, as in a model's step), median of 7 replays, per layer. Adapters: 8 slots of
rank 16 on every part, the batch's tokens spread over min(T, 8) of them ("lora") or none ("base").
Floor: the bytes that must be read (weights, the adapters' A and B, x, y) at --bandwidth. Each
one-launch result is first checked against cuBLAS plus the LoRA twin.

    python bench/linear.py                 # the rows
    python bench/linear.py --sweep         # tile variants of the one-launch layer at 1 and 16 tokens
    python bench/linear.py --sweep --per-sm 1 2 3 4   # the shipped tiles' input splits only (short)
    python bench/linear.py --lora-sweep    # tile variants of the dense LoRA kernels past the one launch
    python bench/linear.py --fp8           # FP8 weights (one launch, or dequantised for cuBLAS) vs bf16
    python bench/linear.py --sweep --fp8   # tile variants of the one launch with FP8 weights
    python bench/linear.py --norm          # the input norm's launch against the norm inside q/k/v
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace

import torch
from timing import graph_us

from moelora.ops.dense_lora import DenseLora
from moelora.ops.fp8 import RowScales
from moelora.ops.input_norm import InputNorm
from moelora.ops.plan import TUNED, KernelPlan, LoraTiles
from moelora.ops.torch import lora as twin
from moelora.ops.torch.fp8 import quantize_rows
from moelora.ops.triton import linear as kern
from moelora.ops.triton.norm import rms_norm
from moelora.ops.triton.tiles import lora_tiles

SHAPES = {"qkv": (2048, (4096, 512, 512)), "o": (4096, (2048,)), "router": (2048, (128,))}
SLOTS, RANK = 8, 16


class Layer:
    def __init__(self, g: torch.Generator, in_dim: int, sizes: tuple[int, ...]) -> None:
        out = sum(sizes)
        self.w = (torch.randn(out, in_dim, generator=g) * in_dim**-0.5).to("cuda", torch.bfloat16)
        a = torch.randn(SLOTS, len(sizes), RANK, in_dim, generator=g) * in_dim**-0.5
        b = torch.randn(SLOTS, out, RANK, generator=g) * RANK**-0.5
        rank = torch.full((SLOTS, len(sizes)), RANK, dtype=torch.int32)
        self.lora = DenseLora(a.to("cuda", torch.bfloat16), b.to("cuda", torch.bfloat16), rank.cuda())
        w8, table = quantize_rows(self.w, 128)
        self.w8, self.scales = w8, RowScales(table, 128)


def run(layers, x, slot, sizes, one_launch: bool, plan: KernelPlan, fp8: bool = False):
    """One call per layer; slot None: a batch without adapters on layers that have slots."""
    for layer in layers:
        w, scales = (layer.w8, layer.scales) if fp8 else (layer.w, None)
        kern.linear_layer(x, w, None, layer.lora, slot, sizes, one_launch, plan, scales)


def floor_us(
    in_dim: int, sizes: tuple[int, ...], tokens: int, adapters: int, bandwidth: float, fp8: bool = False
) -> float:
    """The bytes' time; FP8 weights at a byte each plus their scales (4 bytes per 128 columns)."""
    out = sum(sizes)
    weights = out * in_dim + out * -(-in_dim // 128) * 4 if fp8 else out * in_dim * 2
    lora = adapters * RANK * (len(sizes) * in_dim + out) * 2
    return (weights + lora + tokens * (in_dim + out) * 2) / bandwidth * 1e6


def rows(args) -> None:
    g = torch.Generator().manual_seed(0)
    # one token on an adapter: also the one launch with its shrink in programs of their own (unfolded)
    unfolded = replace(TUNED, linear_fold_steps=0)
    print(
        "| layer | tokens | adapters | cuBLAS + LoRA kernels us | one launch us "
        "| one launch, shrink apart us | floor us | floor / it |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (in_dim, sizes) in SHAPES.items():
        layers = [Layer(g, in_dim, sizes) for _ in range(args.layers)]
        for tokens in args.tokens:
            x = torch.randn(tokens, in_dim, generator=g).to("cuda", torch.bfloat16)
            for with_lora in (False, True):
                adapters = min(tokens, SLOTS) if with_lora else 0
                slot = (torch.arange(tokens) % SLOTS).to("cuda", torch.int32) if with_lora else None
                if not kern.fits(x, len(sizes) * RANK, sizes, TUNED):
                    continue
                lora = layers[0].lora
                ref = twin.linear(x, layers[0].w, None, lora, slot, sizes)
                got = kern.linear_layer(x, layers[0].w, None, lora, slot, sizes, True, TUNED)
                err = (got.float() - ref.float()).abs().max().item()
                assert err < 0.05 * max(1.0, ref.float().abs().max().item()), f"{name} T={tokens}: {err}"
                old = graph_us(lambda: run(layers, x, slot, sizes, False, TUNED)) / args.layers  # noqa: B023
                new = graph_us(lambda: run(layers, x, slot, sizes, True, TUNED)) / args.layers  # noqa: B023
                apart = "-"
                if with_lora and tokens == 1:
                    us = graph_us(lambda: run(layers, x, slot, sizes, True, unfolded)) / args.layers  # noqa: B023
                    apart = f"{us:.2f}"
                fl = floor_us(in_dim, sizes, tokens, adapters, args.bandwidth)
                cells = f"{old:.2f} | {new:.2f} | {apart} | {fl:.2f} | {fl / new:.0%}"
                print(f"| {name} | {tokens} | {adapters} | {cells} |", flush=True)


def norm_rows(args) -> None:
    """The input RMSNorm before q/k/v in a launch of its own (`rms_norm`, then the one launch) against inside
    q/k/v's launch (`linear.norm_linear`, `KernelPlan.norm_linear_tokens`), with and without the residual
    add, each layer's q/k/v then o (o's input: q's output) chained as in a model's step."""
    g = torch.Generator().manual_seed(0)
    (in_q, sizes_q), (in_o, sizes_o) = SHAPES["qkv"], SHAPES["o"]
    qkv = [Layer(g, in_q, sizes_q) for _ in range(args.layers)]
    o = [Layer(g, in_o, sizes_o) for _ in range(args.layers)]
    weights = [1 + 0.1 * torch.randn(in_q, generator=g) for _ in range(args.layers)]
    weights = [w.to("cuda", torch.bfloat16) for w in weights]
    plan = replace(TUNED, norm_linear_tokens=max(args.tokens))

    def step(x: torch.Tensor, res: torch.Tensor | None, inside: bool) -> None:
        for q_layer, o_layer, w in zip(qkv, o, weights, strict=True):
            if inside:
                norm = InputNorm(res, w, 1e-6, False)
                y, _ = kern.norm_linear(x, norm, q_layer.w, None, None, sizes_q, plan)
            else:
                h = rms_norm(x, w, 1e-6, res)
                y = kern.linear(h if res is None else h[0], q_layer.w, None, None, sizes_q, plan)
            x = kern.linear(y[:, : sizes_q[0]], o_layer.w, None, None, sizes_o, plan)

    print(
        "| tokens | residual | norm launch + q/k/v + o us | norm inside q/k/v, + o us "
        "| floor us | floor / it |"
    )
    print("|---|---|---|---|---|---|")
    for tokens, residual in itertools.product(args.tokens, (True, False)):
        x = torch.randn(tokens, in_q, generator=g).to("cuda", torch.bfloat16)
        res = torch.randn(tokens, in_q, generator=g).to("cuda", torch.bfloat16) if residual else None
        norm = InputNorm(res, weights[0], 1e-6, False)
        got, s = kern.norm_linear(x, norm, qkv[0].w, None, None, sizes_q, plan)
        ref, ref_s = twin.norm_linear(x, norm, qkv[0].w, None, None, None, sizes_q)
        err = (got.float() - ref.float()).abs().max().item()
        assert err < 0.05 * max(1.0, ref.float().abs().max().item()), f"T={tokens}: {err}"
        assert torch.equal(s, ref_s), "x + residual"
        apart = graph_us(lambda: step(x, res, False)) / args.layers  # noqa: B023
        inside = graph_us(lambda: step(x, res, True)) / args.layers  # noqa: B023
        fl = sum(floor_us(i, z, tokens, 0, args.bandwidth) for i, z in ((in_q, sizes_q), (in_o, sizes_o)))
        cells = f"{apart:.2f} | {inside:.2f} | {fl:.2f} | {fl / inside:.0%}"
        print(f"| {tokens} | {residual} | {cells} |", flush=True)


def fp8_rows(args) -> None:
    """bf16 as shipped (one launch up to `linear_tokens`, cuBLAS past it) against FP8 weights in the one
    launch (its weight tiles scaled before each dot, or each dot scaled: `fp8_linear_scale_dots`) and
    dequantised for cuBLAS, at each token count, base and with adapters: the data that sets
    `fp8_linear_tokens`."""
    g = torch.Generator().manual_seed(0)
    one = replace(TUNED, fp8_linear_tokens=1 << 20)  # FP8 always in the one launch
    dots = replace(one, fp8_linear_scale_dots=not TUNED.fp8_linear_scale_dots)  # the other scaling
    gemm = replace(TUNED, fp8_linear_tokens=0, fp8_copy_tokens=1 << 30)  # always the Triton GEMM
    copy = replace(TUNED, fp8_linear_tokens=0, fp8_copy_tokens=0)  # always dequantised for cuBLAS
    other = "tile-scaled" if TUNED.fp8_linear_scale_dots else "dot-scaled"
    print(
        f"| layer | tokens | adapters | bf16 us | FP8 one launch us | one launch, {other} us | FP8 GEMM us | "
        "FP8 copy + cuBLAS us | shipped FP8 | floor bf16 / FP8 us | FP8 / bf16 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ("qkv", "o"):
        in_dim, sizes = SHAPES[name]
        layers = [Layer(g, in_dim, sizes) for _ in range(args.layers)]
        for tokens, with_lora in itertools.product(args.fp8_tokens, (False, True)):
            x = torch.randn(tokens, in_dim, generator=g).to("cuda", torch.bfloat16)
            adapters = min(tokens, SLOTS) if with_lora else 0
            slot = None
            if with_lora:  # grouped by adapter, as the scheduler orders a batch
                slot = (torch.arange(tokens) % SLOTS).sort().values.to("cuda", torch.int32)

            def timed(plan: KernelPlan, fp8: bool, x=x, slot=slot, layers=layers, sizes=sizes) -> float:
                return graph_us(lambda: run(layers, x, slot, sizes, True, plan, fp8)) / args.layers

            l0 = layers[0]
            ref = twin.linear(x, l0.w8, None, l0.lora, slot, sizes, l0.scales)
            times = {}
            for label, plan in (("one", one), ("dots", dots), ("gemm", gemm), ("copy", copy)):
                if label in ("one", "dots") and tokens > 128:
                    continue  # one tile holds every token: past 128 its registers spill
                got = kern.linear_layer(x, l0.w8, None, l0.lora, slot, sizes, True, plan, l0.scales)
                err = (got.float() - ref.float()).abs().max().item()
                assert err < 0.05 * max(1.0, ref.float().abs().max().item()), f"{name} {label}: {err}"
                times[label] = timed(plan, True)
            bf16 = timed(TUNED, False)
            if tokens <= TUNED.fp8_linear_tokens:
                shipped = times["one"]
            else:
                shipped = times["gemm" if tokens < TUNED.fp8_copy_tokens else "copy"]
            floors = [floor_us(in_dim, sizes, tokens, adapters, args.bandwidth, f) for f in (False, True)]
            one_us, dots_us = (f"{times[k]:.2f}" if k in times else "-" for k in ("one", "dots"))
            cells = [f"{bf16:.2f}", one_us, dots_us, f"{times['gemm']:.2f}", f"{times['copy']:.2f}"]
            cells += [f"{shipped:.2f}"]
            cells += [f"{floors[0]:.2f} / {floors[1]:.2f}", f"{shipped / bf16:.2f}"]
            print(f"| {name} | {tokens} | {adapters} | " + " | ".join(cells) + " |", flush=True)


def sweep(args) -> None:
    """Tile variants of the one launch (`linear_tiles`; with --fp8 an FP8 weight's `fp8_linear_tiles`:
    K steps of one 128-column scale group, more stages, 27 variants)."""
    g = torch.Generator().manual_seed(0)
    fp8 = args.fp8
    base = (TUNED.fp8_linear_tiles or TUNED.linear_tiles) if fp8 else TUNED.linear_tiles
    variants = [base]
    block_ks, stage_counts = ((128,), (4, 6, 8)) if fp8 else ((64, 128, 256), (3, 4))
    for block_n, block_k, warps, stages, per_sm in itertools.product(
        (32, 64, 128), block_ks, (4,), stage_counts, (1, 2, 4)
    ):
        v = replace(base, block_n=block_n, block_k=block_k, warps=warps, stages=stages)
        v = replace(v, programs_per_sm=per_sm)
        if v != base and block_n * block_k <= 16384:
            variants.append(v)
    if args.per_sm:  # only the shipped tiles' input splits (and K step), a short run
        variants = [base] + [
            replace(base, programs_per_sm=p, block_k=k) for p, k in itertools.product(args.per_sm, (64, 128))
        ]
    results: dict = {}
    for name in ("qkv", "o"):
        in_dim, sizes = SHAPES[name]
        layers = [Layer(g, in_dim, sizes) for _ in range(args.layers)]
        for tokens, with_lora in ((1, False), (1, True), (16, True)):
            x = torch.randn(tokens, in_dim, generator=g).to("cuda", torch.bfloat16)
            slot = (torch.arange(tokens) % SLOTS).to("cuda", torch.int32) if with_lora else None
            for v in variants:
                plan = replace(TUNED, fp8_linear_tiles=v) if fp8 else replace(TUNED, linear_tiles=v)
                try:
                    us = graph_us(lambda: run(layers, x, slot, sizes, True, plan, fp8)) / args.layers  # noqa: B023
                except Exception as err:  # a variant that does not compile is reported, not fatal
                    print(f"skip {v}: {str(err)[:100]}")
                    continue
                results.setdefault(v, {})[(name, tokens, with_lora)] = us
                if args.per_sm:  # a short run: each timing as it comes
                    tile = f"per_sm={v.programs_per_sm} k={v.block_k}"
                    print(f"{name} T={tokens} lora={with_lora} {tile}: {us:.2f} us", flush=True)
    keys = sorted({k for r in results.values() for k in r})
    print("| tiles | " + " | ".join(f"{n} T={t}{' lora' if lo else ''}" for n, t, lo in keys) + " | sum |")
    print("|---" * (len(keys) + 2) + "|")
    ranked = sorted(results.items(), key=lambda kv: sum(kv[1].values()))
    for v, r in ranked[: args.top]:
        cells = " | ".join(f"{r.get(k, float('nan')):.2f}" for k in keys)
        tile = f"{v.block_n}/{v.block_k}/w{v.warps}/s{v.stages}/p{v.programs_per_sm}"
        print(f"| {tile} | {cells} | {sum(r.values()):.2f} |")
    print(f"shipped: {results.get(base)}")


def lora_sweep(args) -> None:
    """cuBLAS plus the dense LoRA shrink and expand (the path of more than `linear_tokens` tokens) with
    variants of the LoRA tiles, every token block holding all 8 adapters (tokens spread round-robin)."""
    g = torch.Generator().manual_seed(0)
    variants = [
        LoraTiles(block_m, 128, k_chunk, expand_n, 4, stages)
        for block_m, k_chunk, expand_n, stages in itertools.product(
            (16, 32, 64), (256, 512, 1024, 1 << 30), (64, 128), (2, 3)
        )
    ]
    for name in ("qkv", "o"):
        in_dim, sizes = SHAPES[name]
        layers = [Layer(g, in_dim, sizes) for _ in range(args.layers)]
        for tokens in args.sweep_tokens:
            x = torch.randn(tokens, in_dim, generator=g).to("cuda", torch.bfloat16)
            slot = torch.arange(tokens) % SLOTS
            if args.grouped:  # the engine's order: a decode batch's tokens grouped by adapter
                slot = slot.sort().values
            slot = slot.to("cuda", torch.int32)
            shipped = lora_tiles(tokens, TUNED)
            times = {}
            for v in [shipped, *variants]:
                plan = KernelPlan(lora_table=((float("inf"), v),))
                times[v] = graph_us(lambda: run(layers, x, slot, sizes, False, plan)) / args.layers  # noqa: B023
            base = graph_us(lambda: run(layers, x, None, sizes, False, TUNED)) / args.layers  # noqa: B023
            best = sorted(times.items(), key=lambda kv: kv[1])[:4]
            cells = ", ".join(f"{v.block_m}/{v.k_chunk}/{v.expand_n}/s{v.stages}: {us:.1f}" for v, us in best)
            print(f"| {name} | {tokens} | {base:.1f} | {times[shipped]:.1f} | {cells} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--layers", type=int, default=16, help="distinct layers a graph (weights past the L2)")
    p.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s of the floor (copy rate)")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--per-sm", type=int, nargs="+", help="--sweep over these programs_per_sm only")
    p.add_argument("--lora-sweep", action="store_true")
    p.add_argument("--grouped", action="store_true", help="--lora-sweep with tokens grouped by adapter")
    p.add_argument("--sweep-tokens", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--fp8", action="store_true", help="FP8 weights against bf16")
    p.add_argument("--norm", action="store_true", help="the input norm's own launch against inside q/k/v")
    p.add_argument("--fp8-tokens", type=int, nargs="+", default=[1, 16, 32, 64, 128, 256, 2048])
    args = p.parse_args()
    if args.norm:
        norm_rows(args)
    elif args.fp8 and not args.sweep:
        fp8_rows(args)
    elif args.lora_sweep:
        head = "| layer | tokens | cuBLAS alone us | + LoRA, shipped tiles us | best 4 (tiles: us) |"
        print(head + "\n|---|---|---|---|---|")
        lora_sweep(args)
    else:
        sweep(args) if args.sweep else rows(args)


if __name__ == "__main__":
    main()
