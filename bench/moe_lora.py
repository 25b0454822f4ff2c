"""MoE and MoE-LoRA layer timings under CUDA-graph replay, against byte floors (issue 6).

Rows: model shape x M tokens x (adapters, rank); uniform random routing, a new adapter every 4 tokens.
Per row: base MoE (Triton), torch._grouped_mm MoE (the bar, when available), MoE with per-expert LoRA,
the LoRA delta (total - base, alignment included), its byte floor (LoRA weights of the (adapter, expert)
pairs the batch touches, at --tbps) and the share of the floor reached. Run a subset with the flags, e.g.
    python bench/moe_lora.py --models qwen3 --m 1,8,32 --lora 4x16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timing import graph_us

from moelora import ops
from moelora.ops.triton import moe as triton_moe
from moelora.ops.triton import tiles
from moelora.ops.triton.tiles import DecodeTiles, LoraTiles, Tiles, moe_tiles

SHAPES = {  # name: (H, I, E, top-k)
    "qwen3": (2048, 768, 128, 8),
    "mixtral": (4096, 14336, 8, 2),
}


@dataclass
class Row:
    model: str
    m: int
    adapters: int
    rank: int
    base_us: float
    grouped_mm_us: float
    total_us: float
    lora_us: float
    lora_floor_us: float
    lora_share: float
    base_floor_us: float
    align_us: float


def grouped_mm_moe(x, w_gu_t, w_dn_t, ids, weights, num_experts):
    """Torch MoE over torch._grouped_mm: sort pairs by expert, two grouped GEMMs, weighted scatter-add."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    offs = torch.searchsorted(flat[order], torch.arange(1, num_experts + 1, device=x.device)).to(torch.int32)
    xs = x[order // k]
    gu = torch._grouped_mm(xs, w_gu_t, offs=offs)
    inter = gu.shape[1] // 2
    h = F.silu(gu[:, :inter]) * gu[:, inter:]
    d = torch._grouped_mm(h, w_dn_t, offs=offs) * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, order // k, d)


def route(m: int, num_experts: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(m, num_experts, generator=gen, device="cuda")
    w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return ids.to(torch.int32), (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)


def lora_buffers(s: int, e: int, h: int, i: int, r: int, used: int = 0) -> tuple[torch.Tensor, ...]:
    """Random adapter buffers of rank r; with `used`, lanes from there up are zero (a lower-rank adapter)."""
    dt = dict(dtype=torch.bfloat16, device="cuda")
    a_gu, b_gu = torch.randn(s, e, 2, r, h, **dt) * h**-0.5, torch.randn(s, e, 2, i, r, **dt) * r**-0.5
    a_dn, b_dn = torch.randn(s, e, r, i, **dt) * i**-0.5, torch.randn(s, e, h, r, **dt) * r**-0.5
    if 0 < used < r:
        for a, b in ((a_gu, b_gu), (a_dn, b_dn)):
            a[..., used:, :] = 0
            b[..., used:] = 0
    return a_gu, b_gu, a_dn, b_dn


def bench_model(name: str, ms: list[int], loras: list[tuple[int, int]], args: argparse.Namespace):
    hidden, inter, num_experts, _ = SHAPES[name]
    dt = dict(dtype=torch.bfloat16, device="cuda")
    w_gu = torch.randn(num_experts, 2 * inter, hidden, **dt) * hidden**-0.5
    w_dn = torch.randn(num_experts, hidden, inter, **dt) * inter**-0.5
    bufs = {(s, r): lora_buffers(s, num_experts, hidden, inter, r, args.used_rank) for s, r in loras}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for m in ms:
        yield from bench_m(name, m, w_gu, w_dn, bufs, gen, args)
        torch.cuda.empty_cache()


def bench_m(name, m, w_gu, w_dn, bufs, gen, args):
    """Rows of one model and token count: the base MoE once, then each (adapters, rank)."""
    hidden, inter, num_experts, k = SHAPES[name]
    x = torch.randn(m, hidden, dtype=torch.bfloat16, device="cuda")
    ids, weights = route(m, num_experts, k, gen)
    reps = args.reps if m <= 512 else max(5, args.reps // 4)
    base = graph_us(partial(ops.fused_moe, x, w_gu, w_dn, ids, weights), reps=reps)
    try:
        gmm_fn = partial(grouped_mm_moe, x, w_gu.transpose(1, 2), w_dn.transpose(1, 2), ids, weights)
        gmm = graph_us(partial(gmm_fn, num_experts), reps=reps)
    except (RuntimeError, AttributeError) as err:  # not every build has it
        print(f"# torch._grouped_mm: {str(err).splitlines()[0]}", file=sys.stderr)
        gmm = float("nan")
    base_floor = ids.unique().numel() * 3 * hidden * inter * 2 / (args.tbps * 1e12) * 1e6
    for (s, r), (a_gu, b_gu, a_dn, b_dn) in bufs.items():
        block_m = moe_tiles(m * k, num_experts, s).block_m
        slot = ((torch.arange(m, device="cuda") // 4) % s).to(torch.int32)
        # --used-rank: adapters of that rank in the pool of rank r (lanes above it zero, skipped by rank).
        used = min(args.used_rank or r, r)
        slot_rank = torch.full((s,), used, dtype=torch.int32, device="cuda")
        lora_fn = partial(ops.fused_moe_lora, x, w_gu, w_dn, ids, weights, slot)
        total = graph_us(partial(lora_fn, a_gu, b_gu, a_dn, b_dn, slot_rank), reps=reps)
        align = graph_us(partial(ops.moe_align, ids, slot, num_experts, s, block_m), reps=reps)
        pairs = (slot.long()[:, None] * num_experts + ids.long()).unique().numel()
        floor = pairs * 2 * used * (3 * hidden + 3 * inter) / (args.tbps * 1e12) * 1e6
        lora = total - base
        yield Row(name, m, s, r, base, gmm, total, lora, floor, floor / max(lora, 1e-3), base_floor, align)


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
LORA_SWEEP = (
    LoraTiles(16, 128, 256, 64, 4, 2),
    LoraTiles(16, 128, 512, 64, 4, 2),
    LoraTiles(16, 64, 128, 64, 4, 2),
    LoraTiles(16, 256, 1 << 30, 64, 4, 3),
    LoraTiles(32, 128, 512, 128, 4, 3),
    LoraTiles(64, 128, 1 << 30, 128, 4, 3),
    LoraTiles(64, 128, 512, 128, 4, 3),
)


def lora_times(moe: tuple, bufs: dict, reps: int) -> str:
    """Base + LoRA time of each pool in `bufs` ((adapters, rank) -> buffers), a new adapter every 4 tokens."""
    out = []
    for (s, r), buf in bufs.items():
        slot = ((torch.arange(moe[0].shape[0], device="cuda") // 4) % s).to(torch.int32)
        fn = partial(ops.fused_moe_lora, *moe, slot, *buf)
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
    saved = tiles._MOE_TABLE, tiles.DECODE_TILES
    for m in ms:
        x = torch.randn(m, hidden, **dt)
        ids, weights = route(m, num_experts, k, gen)
        flops = 2 * m * k * 3 * hidden * inter
        decode = tiles.use_decode_path(m * k, num_experts, k)
        moe = (x, w_gu, w_dn, ids, weights)

        if decode:  # the aligned path at the same M, for reference
            triton_moe.use_decode_path = lambda *_: False
            us = graph_us(partial(ops.fused_moe, x, w_gu, w_dn, ids, weights), reps=args.reps)
            aligned = moe_tiles(m * k, num_experts)
            lora = lora_times(moe, bufs, args.reps)
            print(f"| sweep | {name} | {m} | aligned {aligned} | {us:.0f} | | {lora} |")
            triton_moe.use_decode_path = tiles.use_decode_path
        for t in DECODE_SWEEP if decode else SWEEP:
            if isinstance(t, Tiles):
                if t.block_m > 2 * m * k:
                    continue
                tiles._MOE_TABLE = ((float("inf"), t, t),)
            else:
                tiles.DECODE_TILES = t
            label = f"| sweep | {name} | {m} | {t} |"
            try:
                reps = max(5, args.reps // 2)
                us = graph_us(partial(ops.fused_moe, x, w_gu, w_dn, ids, weights), reps=reps)
                tflops = flops / us / 1e6
                print(
                    f"{label} {us:.0f} | {tflops:.0f} TFLOP/s | {lora_times(moe, bufs, reps)} |", flush=True
                )
            except Exception as err:  # a configuration the compiler refuses (shared memory, registers)
                print(f"{label} failed: {str(err).splitlines()[0][:80]} |", flush=True)
        tiles._MOE_TABLE, tiles.DECODE_TILES = saved


def sweep_dense(args: argparse.Namespace) -> None:
    """Dense multi-LoRA (`add_lora`, q projection of Qwen3-30B-A3B: 2048 -> 4096) per tile configuration;
    4 adapters of rank 16 and 16 of rank 64, a new adapter every 4 tokens up to 64 tokens, every 128 above."""
    d_in, d_out = 2048, 4096
    saved = tiles._LORA_TABLE
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
                tiles._LORA_TABLE = ((float("inf"), t),)
                label = f"| dense | {num_tokens} | {s}x{r} | {t} |"
                try:
                    us = graph_us(partial(ops.add_lora, y, x, a, b, slot), reps=max(5, args.reps // 2))
                    print(f"{label} {us:.1f} | floor {floor:.1f} |", flush=True)
                except Exception as err:
                    print(f"{label} failed: {str(err).splitlines()[0][:80]} |", flush=True)
            tiles._LORA_TABLE = saved
            qkv(x, slot, s, r, args)
    tiles._LORA_TABLE = saved


def qkv(x: torch.Tensor, slot: torch.Tensor, s: int, r: int, args: argparse.Namespace) -> None:
    """q/k/v LoRA of Qwen3-30B-A3B (4096 + 512 + 512 outputs): one stacked shrink vs one add_lora per part."""
    sizes = (4096, 512, 512)
    a = torch.randn(s, 3, r, x.shape[1], dtype=torch.bfloat16, device="cuda") * x.shape[1] ** -0.5
    b = torch.randn(s, sum(sizes), r, dtype=torch.bfloat16, device="cuda") * r**-0.5
    y = torch.randn(x.shape[0], sum(sizes), dtype=torch.bfloat16, device="cuda")

    def per_part() -> None:
        offset = 0
        for p, n in enumerate(sizes):
            ops.add_lora(y[:, offset : offset + n], x, a[:, p], b[:, offset : offset + n], slot)
            offset += n

    reps = max(5, args.reps // 2)
    stacked = graph_us(partial(ops.add_lora_parts, y, x, a, b, slot, sizes), reps=reps)
    parts = graph_us(per_part, reps=reps)
    print(f"| qkv | {x.shape[0]} | {s}x{r} | stacked {stacked:.1f} | per part {parts:.1f} |", flush=True)


def profile(name: str, ms: list[int], loras: list[tuple[int, int]]) -> None:
    """Per-kernel GPU time (us per call, eager) of the base MoE and the MoE-LoRA, to see where time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    hidden, inter, num_experts, k = SHAPES[name]
    dt = dict(dtype=torch.bfloat16, device="cuda")
    w_gu = torch.randn(num_experts, 2 * inter, hidden, **dt) * hidden**-0.5
    w_dn = torch.randn(num_experts, hidden, inter, **dt) * inter**-0.5
    gen = torch.Generator(device="cuda").manual_seed(0)
    calls = 10
    for m in ms:
        x = torch.randn(m, hidden, **dt)
        ids, weights = route(m, num_experts, k, gen)
        fns = {"base": partial(ops.fused_moe, x, w_gu, w_dn, ids, weights)}
        for s, r in loras:
            slot = ((torch.arange(m, device="cuda") // 4) % s).to(torch.int32)
            fns[f"lora {s}x{r}"] = partial(
                ops.fused_moe_lora,
                x,
                w_gu,
                w_dn,
                ids,
                weights,
                slot,
                *lora_buffers(s, num_experts, hidden, inter, r),
            )
        for label, fn in fns.items():
            fn()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
            times: dict[str, float] = {}
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    times[ev.name[:60]] = times.get(ev.name[:60], 0.0) + ev.device_time / calls
            body = "; ".join(f"{n} {t:.1f}" for n, t in sorted(times.items(), key=lambda kv: -kv[1]))
            print(f"| profile | {name} | {m} | {label} | {sum(times.values()):.1f} us | {body} |", flush=True)


def dense_tflops() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    us = graph_us(lambda: a @ a, reps=10)
    return 2 * 8192**3 / (us * 1e-6) / 1e12


def fmt(r: Row) -> str:
    return (
        f"| {r.model} | {r.adapters}, {r.rank} | {r.m} | {r.base_us:.0f} | {r.grouped_mm_us:.0f} | "
        f"{r.total_us:.0f} | {r.lora_us:.0f} | {r.align_us:.0f} | {r.lora_floor_us:.1f} | "
        f"{100 * r.lora_share:.0f}% | {r.base_floor_us:.0f} |"
    )


HEADER = (
    "| model | adapters, rank | M | base MoE | grouped_mm MoE | base+LoRA | LoRA delta | align | "
    "LoRA floor | share | base byte floor |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3,mixtral", help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--m", default="1,8,32,128,512,2048,8192", help="comma list of token counts")
    p.add_argument("--lora", default="4x16,16x64", help="comma list of ADAPTERSxRANK")
    p.add_argument("--reps", type=int, default=40, help="graph replays per timing (fewer for large M)")
    p.add_argument("--tbps", type=float, default=3.0, help="bandwidth of the byte floors, TB/s")
    p.add_argument("--json", default="", help="append one JSON line per row to this file")
    p.add_argument("--sweep", default="", help="comma list of M: time the base MoE per tile config instead")
    p.add_argument("--profile", action="store_true", help="per-kernel GPU times (eager) instead of rows")
    p.add_argument(
        "--expand",
        type=int,
        default=tiles.EXPAND_16BIT,
        help="LoRA expand of 16-bit weights: 1 one dot, 2 hi + lo",
    )
    p.add_argument(
        "--down-apart",
        type=int,
        default=-1,
        help="down LoRA expand: 1 bucketed kernel, 0 in the down GEMM's epilogue, -1 by the shape rule",
    )
    p.add_argument(
        "--used-rank", type=int, default=0, help="adapters of this rank in the --lora pools (padding skipped)"
    )
    args = p.parse_args()
    tiles.EXPAND_16BIT = args.expand
    tiles.DOWN_EXPAND_APART = None if args.down_apart < 0 else bool(args.down_apart)
    ms = [int(v) for v in args.m.split(",")]
    loras = [(int(a), int(r)) for a, r in (spec.split("x") for spec in args.lora.split(","))]
    t0 = time.time()
    card = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    print(f"# {card}; times in us, floors at {args.tbps} TB/s")
    print(f"# dense bf16 GEMM 8192^3: {dense_tflops():.0f} TFLOP/s", flush=True)
    if args.profile:
        for name in args.models.split(","):
            profile(name, ms, loras)
        return
    if args.sweep:
        for name in args.models.split(","):
            sweep(name, [int(v) for v in args.sweep.split(",")], args)
        sweep_dense(args)
        return
    rows = []
    for name in args.models.split(","):
        for row in bench_model(name, ms, loras, args):
            rows.append(row)
            print(fmt(row), f"({time.time() - t0:.0f} s)", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(asdict(row)) + "\n")
    print(HEADER)
    for row in rows:
        print(fmt(row))


if __name__ == "__main__":
    main()
