"""Linear attention's kernels (Qwen3-Next / Qwen3.5-MoE, issue #23) on GPU, against their byte floors.

Qwen3.5-35B-A3B's shapes: 16 key heads and 32 value heads of 128, conv channels 8,192 of width 4, bf16
inputs, fp32 states. Rows:
- prefill: the chunked gated delta rule over S sequences of N tokens (chunk and value-tile sizes swept),
  and the causal convolution over the same tokens; floor: the bytes read and written (q, k, v, g, beta in,
  the output and the final states out) at the measured copy rate;
- decode: the one-token steps for B sequences, under CUDA-graph replay; floor: each sequence's state read
  and written back (the delta rule's [32, 128, 128] fp32 matrix: 2 MiB a sequence a layer, both ways).
Each kernel's output is checked against the PyTorch twin on a small case first.
    python bench/delta.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from functools import partial

import torch
from timing import events_us, graph_us

from moelora.benchmark.floors import measure_ceilings
from moelora.ops.torch import delta as twin
from moelora.ops.triton import delta as kern

HK, HV, DK, DV, CONV, WIDTH = 16, 32, 128, 128, 8192, 4


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
    for chunk, block_v in ((16, 32), (32, 64)):
        got, got_s = kern.gated_delta_rule(q, k, v, gate, beta, lens, chunk=chunk, block_v=block_v)
        want, want_s = twin.gated_delta_rule(q, k, v, gate, beta, lens)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got_s, want_s, atol=1e-3, rtol=1e-3)
    x = torch.randn(sum(lens), CONV, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(CONV, WIDTH, device="cuda", dtype=torch.bfloat16)
    for a, b in zip(kern.causal_conv(x, w, lens), twin.causal_conv(x, w, lens), strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def prefill_rows(bandwidth: float) -> list[Row]:
    rows = []
    for seqs, n in ((1, 2048), (16, 512), (64, 128)):
        tokens, lens = seqs * n, (n,) * seqs
        q, k, v, gate, beta = inputs(tokens)
        moved = tokens * (2 * HK * DK * 2 + 2 * HV * DV * 2 + HV * 4 + HV * 2) + seqs * HV * DK * DV * 4
        for chunk in (16, 32):
            for block_v in (32, 64, 128):
                run = partial(kern.gated_delta_rule, q, k, v, gate, beta, lens, chunk=chunk, block_v=block_v)
                variant = f"chunk {chunk}, block_v {block_v}"
                rows.append(
                    Row("prefill", f"{seqs}x{n}", variant, events_us(run, 10), moved / bandwidth * 1e6)
                )
        x = torch.randn(tokens, CONV, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(CONV, WIDTH, device="cuda", dtype=torch.bfloat16)
        conv_bytes = 2 * tokens * CONV * 2 + seqs * CONV * (WIDTH - 1) * 2
        us = events_us(partial(kern.causal_conv, x, w, lens), 10)
        rows.append(Row("prefill conv", f"{seqs}x{n}", "", us, conv_bytes / bandwidth * 1e6))
    return rows


def decode_rows(bandwidth: float) -> list[Row]:
    rows = []
    for batch in (1, 16, 64, 256):
        q, k, v, gate, beta = inputs(batch)
        states = torch.zeros(batch, HV, DK, DV, device="cuda")
        slots = torch.arange(batch, device="cuda")
        moved = batch * (2 * HV * DK * DV * 4 + 2 * HK * DK * 2 + 2 * HV * DV * 2)
        us = graph_us(partial(kern.gated_delta_step, q, k, v, gate, beta, states, slots), calls=20)
        rows.append(Row("decode step", f"B={batch}", "", us, moved / bandwidth * 1e6))
        x = torch.randn(batch, CONV, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(CONV, WIDTH, device="cuda", dtype=torch.bfloat16)
        conv_states = torch.zeros(batch, CONV, WIDTH - 1, device="cuda", dtype=torch.bfloat16)
        conv_bytes = batch * (2 * CONV * 2 + 2 * CONV * (WIDTH - 1) * 2)
        us = graph_us(partial(kern.causal_conv_step, x, w, conv_states, slots), calls=20)
        rows.append(Row("decode conv step", f"B={batch}", "", us, conv_bytes / bandwidth * 1e6))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args()
    check()
    ceilings = measure_ceilings(torch.device("cuda"), torch.bfloat16)
    bandwidth = ceilings.bytes_per_s
    rows = prefill_rows(bandwidth) + decode_rows(bandwidth)
    rate = f"{bandwidth / 1e12:.2f} TB/s"
    print(f"\n{torch.cuda.get_device_name()}; floors at {rate} (the faster of copy and read)")
    print("| kernel | shape | variant | us | floor us | floor / us |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.kind} | {r.shape} | {r.variant} | {r.us:.1f} | {r.floor_us:.1f} | {r.share:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
