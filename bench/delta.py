"""Linear attention's kernels (Qwen3-Next / Qwen3.5-MoE, issue #23) on GPU, against their floors.

Qwen3.5-35B-A3B's shapes: 16 key heads and 32 value heads of 128, conv channels 8,192 of width 4, bf16
inputs, fp32 states. Rows:
- prefill: the chunked gated delta rule over S sequences of N tokens (default tiles and precision, each
  chunk's (I + A)^-1 solved in the walk instead of its own launch (`split False`), and chunk and value-tile
  sizes swept), and the causal convolution over the same
  tokens; floor: the larger of the bytes read and written (q, k, v, g, beta in, the output and the final
  states out) at the measured rate and the chunked form's products at the measured dense GEMM rate;
- decode: the one-token steps for B sequences, under CUDA-graph replay; floor: each sequence's state read
  and written back (the delta rule's [32, 128, 128] fp32 matrix: 2 MiB a sequence a layer, both ways).
Each kernel's output is checked against the PyTorch twin on a small case first.
    python bench/delta.py [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
from timing import events_us, graph_us
from triton.runtime.errors import OutOfResources

from moelora.benchmark.floors import Ceilings, measure_ceilings
from moelora.ops.plan import DeltaTiles, KernelPlan
from moelora.ops.torch import delta as twin
from moelora.ops.triton import delta as kern
from moelora.ops.triton import delta_prefill as prefill

HK, HV, DK, DV, CONV, WIDTH = 16, 32, 128, 128, 8192, 4
LAYERS = 30  # Qwen3.5-35B-A3B's linear-attention layers


@dataclass
class Row:
    kind: str
    shape: str
    variant: str
    us: float
    floor_us: float

    @property
    def share(self) -> float:
        return self.floor_us / self.us


def inputs(tokens: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(tokens, HK, DK, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(tokens, HK, DK, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(tokens, HV, DV, device="cuda", dtype=torch.bfloat16, generator=g)
    gate = -torch.rand(tokens, HV, device="cuda", generator=g) * 0.5
    beta = torch.rand(tokens, HV, device="cuda", generator=g).to(torch.bfloat16)
    return q, k, v, gate, beta


def check() -> None:
    """Each kernel against its twin on a small case (three sequences, a partial last chunk)."""
    lens = (5, 40, 17)
    q, k, v, gate, beta = inputs(sum(lens), seed=1)
    for chunk, block_v, split in ((16, 32, True), (32, 64, False), (64, 32, True)):
        plan = KernelPlan(delta=DeltaTiles(chunk=chunk, block_v=block_v, split=split))
        got, got_s = prefill.gated_delta_rule(q, k, v, gate, beta, lens, None, plan)
        want, want_s = twin.gated_delta_rule(q, k, v, gate, beta, lens)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got_s, want_s, atol=1e-3, rtol=1e-3)
    x = torch.randn(sum(lens), CONV, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(CONV, WIDTH, device="cuda", dtype=torch.bfloat16)
    for a, b in zip(prefill.causal_conv(x, w, lens), twin.causal_conv(x, w, lens), strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def chunk_flops(tokens: int, chunk: int) -> int:
    """Multiply-adds x 2 of the chunked form: per token and value head, the state's three products
    (q S, w S, k^T delta: Dk x Dv each) and the chunk's five (k k^T, T k, T v, q k^T, intra delta)."""
    return tokens * HV * 2 * (3 * DK * DV + chunk * (3 * DK + 2 * DV))


def prefill_rows(ceilings: Ceilings) -> list[Row]:
    rows = []
    variants = [DeltaTiles(), DeltaTiles(split=False)]
    variants += [DeltaTiles(chunk=c, block_v=b) for c in (16, 32, 64) for b in (32, 64, 128)]
    variants += [DeltaTiles(chunk=c, split=False) for c in (32, 64)]
    for seqs, n in ((1, 2048), (16, 512), (64, 128)):
        tokens, lens = seqs * n, (n,) * seqs
        q, k, v, gate, beta = inputs(tokens)
        moved = tokens * (2 * HK * DK * 2 + 2 * HV * DV * 2 + HV * 4 + HV * 2) + seqs * HV * DK * DV * 4
        for variant in variants:
            run = partial(
                prefill.gated_delta_rule, q, k, v, gate, beta, lens, None, KernelPlan(delta=variant)
            )
            floor = max(moved / ceilings.bytes_per_s, chunk_flops(tokens, 16) / (ceilings.gemm_flops or 1e30))
            name = f"chunk {variant.chunk}, block_v {variant.block_v or 'auto'}, split {variant.split}"
            try:
                us = events_us(run, 10)
            except OutOfResources as e:  # a tile too large for the SM's shared memory: not a candidate
                print(f"{seqs}x{n} {name}: skipped ({e})")
                continue
            rows.append(Row("prefill", f"{seqs}x{n}", name, us, floor * 1e6))
        x = torch.randn(tokens, CONV, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(CONV, WIDTH, device="cuda", dtype=torch.bfloat16)
        conv_bytes = 2 * tokens * CONV * 2 + seqs * CONV * (WIDTH - 1) * 2
        us = events_us(partial(prefill.causal_conv, x, w, lens), 10)
        rows.append(Row("prefill conv", f"{seqs}x{n}", "", us, conv_bytes / ceilings.bytes_per_s * 1e6))
    return rows


def layered_us(calls: list[Callable[[], object]]) -> float:
    """Microseconds per call of a CUDA graph that makes each of `calls` once."""
    steps = itertools.cycle(calls)
    return graph_us(lambda: next(steps)(), calls=len(calls))


def decode_rows(bandwidth: float) -> list[Row]:
    """Each replay steps LAYERS layers, each with its own states (as a model does: the card's L2 would
    otherwise hold a small batch's states from one replay to the next)."""
    rows = []
    for batch in (1, 16, 64, 256):
        q, k, v, gate, beta = inputs(batch)
        slots = torch.arange(batch, device="cuda")
        moved = batch * (2 * HV * DK * DV * 4 + 2 * HK * DK * 2 + 2 * HV * DV * 2)
        states = [torch.zeros(batch, HV, DK, DV, device="cuda") for _ in range(LAYERS)]
        us = layered_us([partial(kern.gated_delta_step, q, k, v, gate, beta, s, slots) for s in states])
        rows.append(Row("decode step", f"B={batch}", "", us, moved / bandwidth * 1e6))
        del states
        x = torch.randn(batch, CONV, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(CONV, WIDTH, device="cuda", dtype=torch.bfloat16)
        conv_bytes = batch * (2 * CONV * 2 + 2 * CONV * (WIDTH - 1) * 2)
        shape = (batch, CONV, WIDTH - 1)
        conv = [torch.zeros(shape, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
        us = layered_us([partial(kern.causal_conv_step, x, w, s, slots) for s in conv])
        rows.append(Row("decode conv step", f"B={batch}", "", us, conv_bytes / bandwidth * 1e6))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args()
    check()
    ceilings = measure_ceilings(torch.device("cuda"), torch.bfloat16)
    bandwidth = ceilings.bytes_per_s
    rows = prefill_rows(ceilings) + decode_rows(bandwidth)
    rate = f"{bandwidth / 1e12:.2f} TB/s"
    gemm = f"{(ceilings.gemm_flops or 0) / 1e12:.0f} TFLOP/s"
    print(f"\n{torch.cuda.get_device_name()}; floors at {rate} (the faster of copy and read) and {gemm}")
    print("| kernel | shape | variant | us | floor us | floor / us |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.kind} | {r.shape} | {r.variant} | {r.us:.1f} | {r.floor_us:.1f} | {r.share:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
