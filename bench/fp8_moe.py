"""FP8 routed experts (`--quantization fp8`, issue #27) against bf16, one MoE layer under CUDA-graph replay.

Qwen3-30B-A3B's shape (H 2048, I 768, 128 experts, top 8), uniform random routing. Per M tokens: the bf16
MoE and the FP8 one (W8A16: each weight tile dequantised in registers, a scale per row and 128 input
columns), each without and with 8 adapters of rank 16 (a new adapter every 4 tokens); their ratio; the
byte floors of the experts the batch touches (bf16: 2 bytes a weight; FP8: 1 byte plus 4 per 128 of
scales) at the measured rate. Each replay runs LAYERS layers, each with its own weights, as a model does
(one layer's touched experts would otherwise stay in L2 from one replay to the next). The FP8 output is
checked against the twin on the dequantised weights first. From 8 tokens also W8A8 (the aligned path's
GEMMs with FP8 activations, each row quantised per 128 columns in a pass of its own; the plan's
`fp8_act_table` tiles), checked against the twin quantising the activations the same way. The default plan
takes W8A8 from `KernelPlan.fp8_activation_rows` mean rows per expert, W8A16 below.
    python bench/fp8_moe.py [--m 1,8,32,128,2048] [--json out.json]
    python bench/fp8_moe.py --sweep [--m 1,8,32,128,512,2048]   # decode GEMV steps; W8A8 tiles
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
from timing import graph_us

from moelora import ops
from moelora.benchmark.floors import measure_ceilings
from moelora.ops.expert_extras import ExpertExtras, ExpertScales
from moelora.ops.expert_lora import ExpertLora
from moelora.ops.plan import TUNED, KernelPlan, Tiles
from moelora.ops.torch import lora as lora_twin
from moelora.ops.torch import moe as twin
from moelora.ops.torch.fp8 import quantize_rows
from moelora.ops.triton.tiles import use_decode_path

H, INTER, E, K = 2048, 768, 128, 8
LAYERS = 4
GROUP = 128
W8A16 = replace(TUNED, fp8_activation_rows=None)  # the weight tiles dequantised, activations in bf16
W8A8 = replace(TUNED, fp8_activation_rows=0.0)  # FP8 activations wherever the aligned path runs
W8A8_FROM = 8  # the decode path (fewer tokens) multiplies in bf16 whatever the plan


@dataclass
class Row:
    m: int
    lora: str
    bf16_us: float
    fp8_us: float
    bf16_floor_us: float
    fp8_floor_us: float
    w8a8_us: float | None = None

    @property
    def ratio(self) -> float:
        return self.fp8_us / self.bf16_us


@dataclass
class Layer:
    w_gu: torch.Tensor
    w_dn: torch.Tensor
    q_gu: torch.Tensor
    q_dn: torch.Tensor
    extras: ExpertExtras


def make_layer(seed: int) -> Layer:
    g = torch.Generator(device="cuda").manual_seed(seed)
    w_gu = (torch.randn(E, 2 * INTER, H, device="cuda", generator=g) * H**-0.5).to(torch.bfloat16)
    w_dn = (torch.randn(E, H, INTER, device="cuda", generator=g) * INTER**-0.5).to(torch.bfloat16)
    (q_gu, s_gu), (q_dn, s_dn) = quantize_rows(w_gu, GROUP), quantize_rows(w_dn, GROUP)
    return Layer(w_gu, w_dn, q_gu, q_dn, ExpertExtras(None, None, None, ExpertScales(s_gu, s_dn, GROUP)))


def adapters(slots: int, rank: int) -> ExpertLora:
    d = dict(dtype=torch.bfloat16, device="cuda")
    a_gu, b_gu = (
        torch.randn(slots, E, 2, rank, H, **d) * H**-0.5,
        torch.randn(slots, E, 2, INTER, rank, **d) * 0.1,
    )
    a_dn, b_dn = (
        torch.randn(slots, E, rank, INTER, **d) * INTER**-0.5,
        torch.randn(slots, E, H, rank, **d) * 0.1,
    )
    return ExpertLora(a_gu, b_gu, a_dn, b_dn)


def layered_us(calls: list[Callable[[], object]]) -> float:
    steps = itertools.cycle(calls)
    return graph_us(lambda: next(steps)(), calls=len(calls))


def check(layer: Layer, lora: ExpertLora) -> None:
    """FP8 kernels against the twin on the dequantised weights, at M = 1 (decode path) and 256, and W8A8
    at 256 (with and without adapters) against the twin quantising the activations."""
    for m, w8a8 in ((1, False), (256, False), (256, True)):
        x = torch.randn(m, H, dtype=torch.bfloat16, device="cuda")
        ids = torch.randint(0, E, (m, K), device="cuda", dtype=torch.int32)
        weights = torch.rand(m, K, device="cuda").to(torch.bfloat16)
        slot = (torch.arange(m, device="cuda") % 8).to(torch.int32)
        w, plan = (layer.q_gu, layer.q_dn), W8A8 if w8a8 else W8A16
        pairs = [
            (ops.fused_moe(x, *w, ids, weights, plan, layer.extras),
             twin.fused_moe(x, *w, ids, weights, layer.extras, fp8_activations=w8a8)),
            (ops.fused_moe_lora(x, *w, ids, weights, slot, lora, plan, layer.extras),
             lora_twin.fused_moe_lora(x, *w, ids, weights, slot, lora, layer.extras, fp8_activations=w8a8)),
        ]  # fmt: skip
        for got, want in pairs:
            # bf16 outputs, h rounded to bf16 in between: a few elements differ by a last bit or two (with
            # W8A8 such a bit can move an activation to the next FP8 value)
            error = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert error < (2e-2 if w8a8 else 1e-2), (m, w8a8, error)


def rows(ms: list[int], bandwidth: float) -> list[Row]:
    layers = [make_layer(seed) for seed in range(LAYERS)]
    lora = adapters(8, 16)
    check(layers[0], lora)
    out = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for m in ms:
        x = torch.randn(m, H, dtype=torch.bfloat16, device="cuda")
        logits = torch.randn(m, E, generator=gen, device="cuda")
        top, ids = torch.softmax(logits, -1).topk(K, dim=-1)
        ids, weights = ids.to(torch.int32), (top / top.sum(-1, keepdim=True)).to(torch.bfloat16)
        slot = ((torch.arange(m, device="cuda") // 4) % 8).to(torch.int32)
        touched = ids.unique().numel()
        bf16_floor = touched * 3 * H * INTER * 2 / bandwidth * 1e6
        fp8_floor = touched * 3 * (H * INTER + (H * INTER // GROUP) * 4) / bandwidth * 1e6
        for name in ("base", "8x16"):
            timed = []
            variants = [(False, TUNED), (True, W8A16)] + ([(True, W8A8)] if m >= W8A8_FROM else [])
            for fp8, plan in variants:
                lora_slot = slot if name != "base" else None
                timed.append(layered_us(layer_calls(layers, x, ids, weights, lora_slot, lora, plan, fp8)))
            w8a8 = timed[2] if len(timed) > 2 else None
            out.append(Row(m, name, timed[0], timed[1], bf16_floor, fp8_floor, w8a8))
        torch.cuda.empty_cache()
    return out


# W8A8 tile candidates (`--sweep`): (block_m, block_n, warps, stages, down_n). The gate/up tile is
# block_m x 2 block_n (gate and up interleaved); two fp32 accumulators of it must fit the registers.
SWEEP = [
    (16, 64, 4, 3, 0), (16, 128, 4, 3, 0), (32, 64, 4, 3, 0), (32, 128, 4, 3, 0), (64, 64, 4, 3, 0),
    (64, 64, 4, 4, 128), (64, 64, 4, 3, 128), (64, 128, 8, 3, 256), (128, 64, 8, 3, 128),
    (128, 64, 8, 4, 128), (128, 64, 4, 3, 128), (128, 128, 8, 3, 128),
]  # fmt: skip


def layer_calls(
    layers: list[Layer],
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    slot: torch.Tensor | None,
    lora: ExpertLora,
    plan: KernelPlan,
    fp8: bool,
) -> list[Callable[[], object]]:
    """One MoE call per layer (FP8 or bf16 weights), with the adapters when `slot` is given."""
    out: list[Callable[[], object]] = []
    for layer in layers:
        w = (layer.q_gu, layer.q_dn) if fp8 else (layer.w_gu, layer.w_dn)
        extras = layer.extras if fp8 else None
        if slot is None:
            out.append(partial(ops.fused_moe, x, *w, ids, weights, plan, extras))
        else:
            out.append(partial(ops.fused_moe_lora, x, *w, ids, weights, slot, lora, plan, extras))
    return out


def candidates(m: int) -> list[tuple[str, KernelPlan, bool]]:
    """(label, plan, FP8 weights) to time at M tokens: on the decode path the GEMVs' K step over FP8
    weights (`DecodeTiles.fp8_block_k`: one 128-column group, or 2, 4 or 8) and their sums per step or after
    the loop (`step_sum`, bf16 too), steps over several groups also summed a group at a time
    (`fp8_group_sums`), the long steps also on 32 rows a program; on the aligned path
    each W8A8 tile candidate as the whole `fp8_act_table`, W8A8 forced."""
    if use_decode_path(m * K, E, K, TUNED):
        out = []
        for step, step_sum in itertools.product((0, 256, 512, 1024), (False, True)):
            sums = dict(step_sum=step_sum, fp8_step_sum=step_sum)
            gate_up = replace(TUNED.decode_tiles, fp8_block_k=step, **sums)
            down = replace(TUNED.decode_down_tiles, fp8_block_k=step, **sums)
            plan = replace(W8A16, decode_tiles=gate_up, decode_down_tiles=down)
            out.append((f"fp8 step {step or GROUP}{' step sums' if step_sum else ''}", plan, True))
            if step == 0 and step_sum:
                out.append(("bf16 step sums", plan, False))
            if step >= 256 and step_sum:  # each group's products summed, then scaled (`fp8_group_sums`)
                grouped = replace(
                    plan,
                    decode_tiles=replace(gate_up, fp8_group_sums=True),
                    decode_down_tiles=replace(down, fp8_group_sums=True),
                )
                out.append((f"fp8 step {step} group sums", grouped, True))
            if step >= 512 and step_sum:  # twice the rows a program: half the programs, each twice the bytes
                wide = replace(plan, decode_tiles=replace(gate_up, block_n=32))
                wide = replace(wide, decode_down_tiles=replace(down, block_n=32))
                out.append((f"fp8 step {step} step sums, 32 rows", wide, True))
        return out
    out = []
    for bm, bn, warps, stages, down_n in SWEEP:
        tiles = Tiles(bm, bn, GROUP, warps, stages, down_n=down_n)
        label = f"w8a8 {bm}x{bn} w{warps} s{stages} d{down_n or bn}"
        out.append((label, replace(W8A8, fp8_act_table=((float("inf"), tiles),)), True))
    return out


def sweep(ms: list[int]) -> None:
    """Each candidate (`candidates`) per M without and with 8 adapters; the bf16 and W8A16 times beside
    it, and the longest kernels (torch profile)."""
    layers = [make_layer(seed) for seed in range(LAYERS)]
    lora = adapters(8, 16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    print("| M | LoRA | tiles | us | / bf16 | / W8A16 | longest kernels, us |")
    print("|---|---|---|---|---|---|---|")
    for m in ms:
        x = torch.randn(m, H, dtype=torch.bfloat16, device="cuda")
        top, ids = torch.softmax(torch.randn(m, E, generator=gen, device="cuda"), -1).topk(K, dim=-1)
        ids, weights = ids.to(torch.int32), (top / top.sum(-1, keepdim=True)).to(torch.bfloat16)
        slot = ((torch.arange(m, device="cuda") // 4) % 8).to(torch.int32)
        for name in ("base", "8x16"):
            calls = partial(layer_calls, layers, x, ids, weights, slot if name != "base" else None, lora)
            bf16, w8a16 = layered_us(calls(TUNED, False)), layered_us(calls(W8A16, True))
            for label, plan, fp8 in candidates(m):
                try:
                    us = layered_us(calls(plan, fp8))
                    split = kernel_split(calls(plan, fp8))
                except Exception as e:  # a candidate that does not fit (shared memory, registers)
                    print(f"| {m} | {name} | {label} | {type(e).__name__} | | | |", flush=True)
                    continue
                print(f"| {m} | {name} | {label} | {us:.1f} | {us / bf16:.2f} | {us / w8a16:.2f} | {split} |",
                      flush=True)  # fmt: skip


def kernel_split(calls: list[Callable[[], object]]) -> str:
    """The four longest kernels of a replay of `calls`, us per call."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            for call in calls:
                call()
        torch.cuda.synchronize()
    times = [(e.key, e.device_time_total / (5 * len(calls))) for e in prof.key_averages()]
    return ", ".join(f"{key.strip('_')[:16]} {us:.0f}" for key, us in sorted(times, key=lambda t: -t[1])[:4])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", default="1,8,32,128,2048", help="comma list of token counts")
    p.add_argument("--json", help="write the rows here too")
    p.add_argument("--sweep", action="store_true", help="time tile candidates instead (`candidates`)")
    args = p.parse_args()
    if args.sweep:
        sweep([int(v) for v in args.m.split(",")])
        return
    ceilings = measure_ceilings(torch.device("cuda"), torch.bfloat16)
    table = rows([int(v) for v in args.m.split(",")], ceilings.bytes_per_s)
    print(f"\n{torch.cuda.get_device_name()}; floors at {ceilings.bytes_per_s / 1e12:.2f} TB/s")
    print("| M | LoRA | bf16 us | W8A16 us | W8A16 / bf16 | W8A8 us | W8A8 / bf16 | bf16 floor us "
          "| FP8 floor us | FP8 floor / faster FP8 us |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        share = r.fp8_floor_us / min(r.fp8_us, r.w8a8_us or r.fp8_us)
        w8a8 = f"{r.w8a8_us:.1f} | {r.w8a8_us / r.bf16_us:.2f}" if r.w8a8_us is not None else "- | -"
        print(
            f"| {r.m} | {r.lora} | {r.bf16_us:.1f} | {r.fp8_us:.1f} | {r.ratio:.2f} | {w8a8} | "
            f"{r.bf16_floor_us:.1f} | {r.fp8_floor_us:.1f} | {share:.0%} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in table], f, indent=1)


if __name__ == "__main__":
    main()
