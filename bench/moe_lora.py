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
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from timing import graph_us

from moelora import ops
from moelora.ops.expert_lora import ExpertLora
from moelora.ops.plan import TUNED, KernelPlan
from moelora.ops.triton.tiles import moe_tiles

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


def lora_buffers(s: int, e: int, h: int, i: int, r: int, used: int = 0) -> ExpertLora:
    """Random adapter buffers of rank r; with `used`, lanes from there up are zero (a lower-rank adapter)."""
    dt = dict(dtype=torch.bfloat16, device="cuda")
    a_gu, b_gu = torch.randn(s, e, 2, r, h, **dt) * h**-0.5, torch.randn(s, e, 2, i, r, **dt) * r**-0.5
    a_dn, b_dn = torch.randn(s, e, r, i, **dt) * i**-0.5, torch.randn(s, e, h, r, **dt) * r**-0.5
    if 0 < used < r:
        for a, b in ((a_gu, b_gu), (a_dn, b_dn)):
            a[..., used:, :] = 0
            b[..., used:] = 0
    return ExpertLora(a_gu, b_gu, a_dn, b_dn)


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
    plan: KernelPlan = args.plan
    base = graph_us(partial(ops.fused_moe, x, w_gu, w_dn, ids, weights, plan=plan), reps=reps)
    try:
        gmm_fn = partial(grouped_mm_moe, x, w_gu.transpose(1, 2), w_dn.transpose(1, 2), ids, weights)
        gmm = graph_us(partial(gmm_fn, num_experts), reps=reps)
    except (RuntimeError, AttributeError) as err:  # not every build has it
        print(f"# torch._grouped_mm: {str(err).splitlines()[0]}", file=sys.stderr)
        gmm = float("nan")
    base_floor = ids.unique().numel() * 3 * hidden * inter * 2 / (args.tbps * 1e12) * 1e6
    for (s, r), buf in bufs.items():
        block_m = moe_tiles(m * k, num_experts, s, plan).block_m
        slot = ((torch.arange(m, device="cuda") // 4) % s).to(torch.int32)
        # --used-rank: adapters of that rank in the pool of rank r (lanes above it zero, skipped by rank).
        used = min(args.used_rank or r, r)
        slot_rank = torch.full((s,), used, dtype=torch.int32, device="cuda")
        lora_fn = partial(ops.fused_moe_lora, x, w_gu, w_dn, ids, weights, slot, replace(buf, rank=slot_rank))
        total = graph_us(partial(lora_fn, plan=plan), reps=reps)
        align = graph_us(partial(ops.moe_align, ids, slot, num_experts, s, block_m), reps=reps)
        pairs = (slot.long()[:, None] * num_experts + ids.long()).unique().numel()
        floor = pairs * 2 * used * (3 * hidden + 3 * inter) / (args.tbps * 1e12) * 1e6
        lora = total - base
        yield Row(name, m, s, r, base, gmm, total, lora, floor, floor / max(lora, 1e-3), base_floor, align)


def profile(
    name: str, ms: list[int], loras: list[tuple[int, int]], plan: KernelPlan, ncu: bool = False
) -> None:
    """Per-kernel GPU time (us per call, eager) of the base MoE and the MoE-LoRA, to see where time goes.
    With `ncu`, one warm eager call of each inside cudaProfilerStart/Stop instead, for
    `ncu --profile-from-start off` (labels on stdout in call order)."""
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
        fns = {"base": partial(ops.fused_moe, x, w_gu, w_dn, ids, weights, plan=plan)}
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
                lora_buffers(s, num_experts, hidden, inter, r),
                plan=plan,
            )
        for label, fn in fns.items():
            fn()
            torch.cuda.synchronize()
            if ncu:
                print(f"# ncu call: {name} M={m} {label}", flush=True)
                torch.cuda.profiler.start()
                fn()
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
                continue
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
            kernels = sorted(
                (ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda ev: ev.time_range.start,
            )
            labels = kernel_labels([ev.name[:60] for ev in kernels], calls)
            times: dict[str, float] = {}
            for kernel, ev in zip(labels, kernels, strict=True):
                times[kernel] = times.get(kernel, 0.0) + ev.device_time / calls
            body = "; ".join(f"{n} {t:.1f}" for n, t in sorted(times.items(), key=lambda kv: -kv[1]))
            print(f"| profile | {name} | {m} | {label} | {sum(times.values()):.1f} us | {body} |", flush=True)


def kernel_labels(names: list[str], calls: int) -> list[str]:
    """A label per kernel launch of `calls` identical calls (names in launch order): the name, numbered
    by its place in the call ("#1", "#2") where one call launches it more than once (the two MoE-LoRA
    shrinks), so that their times stay apart. Plain names if the calls differ."""
    per_call = len(names) // max(1, calls)
    first = names[:per_call]
    if per_call == 0 or names != first * calls:
        return names
    seen: dict[str, int] = {}
    numbered = []
    for name in first:
        seen[name] = seen.get(name, 0) + 1
        numbered.append(f"{name} #{seen[name]}" if first.count(name) > 1 else name)
    return numbered * calls


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


# Flags that force a kernel variant or path for A/B runs: (flag, the `KernelPlan` field it sets, its type,
# what it picks). -1 leaves the shape rule.
OVERRIDES = (
    ("--down-apart", "down_expand_apart", bool, "down LoRA expand: 1 bucketed kernel, 0 in the down GEMM"),
    ("--decode-pairs", "decode_pairs", int, "at most this many (token, choice) pairs take the decode path"),
    ("--shrink-splits", "shrink_splits", int, "input splits of the MoE-LoRA shrink (aligned path)"),
    (
        "--down-shrink-in-gate-up",
        "down_shrink_in_gate_up",
        bool,
        "down LoRA shrink: 1 in the gate/up GEMM, 0 apart",
    ),
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
        "--ncu",
        action="store_true",
        help="one eager call per row inside cudaProfilerStart/Stop, for ncu --profile-from-start off",
    )
    p.add_argument(
        "--expand",
        type=int,
        default=TUNED.expand_16bit,
        help="LoRA expand of 16-bit weights: 1 one dot, 2 hi + lo",
    )
    for flag, _, _, what in OVERRIDES:
        p.add_argument(flag, type=int, default=-1, help=f"{what}; -1: the shape rule")
    p.add_argument(
        "--used-rank", type=int, default=0, help="adapters of this rank in the --lora pools (padding skipped)"
    )
    args = p.parse_args()
    fields = {"expand_16bit": args.expand}
    for flag, name, kind, _ in OVERRIDES:
        value = getattr(args, flag[2:].replace("-", "_"))
        fields[name] = None if value < 0 else kind(value)
    args.plan = KernelPlan(**fields)  # every kernel call of this run takes it
    ms = [int(v) for v in args.m.split(",")]
    loras = [(int(a), int(r)) for a, r in (spec.split("x") for spec in args.lora.split(","))]
    t0 = time.time()
    card = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    print(f"# {card}; times in us, floors at {args.tbps} TB/s")
    print(f"# dense bf16 GEMM 8192^3: {dense_tflops():.0f} TFLOP/s", flush=True)
    if args.profile or args.ncu:
        for name in args.models.split(","):
            profile(name, ms, loras, args.plan, args.ncu)
        return
    if args.sweep:
        from moe_sweep import sweep, sweep_dense  # imports this module's shapes and buffers

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
