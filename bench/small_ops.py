"""Small per-layer ops: the PyTorch twins (eager torch) against the Triton kernels (issue 7); the dense MLP's
silu * up, the gated shared expert's add, and linear attention's gates and gated norm.

Qwen3-30B-A3B shapes: hidden 2048, 32 query heads, 4 KV heads, head_dim 128, bf16, KV blocks of 16
tokens; q, k and v are column slices of one projection, as the attention block has them. For each op and
token count: microseconds per call of the twin and of the kernel, timed with CUDA events over
back-to-back eager calls (launch overhead included) and under CUDA-graph replay (what a decode step
pays), and the kernel's GB/s over the bytes it must read and write (graph time). Each kernel is first
checked against its twin (max abs error; write_kv must be exact).
    python bench/small_ops.py --tokens 64,2048,8192 --json out.json
    python bench/small_ops.py --tiny     # tiny shapes; on CPU in Triton's interpreter, to check the script
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
from timing import events_us, graph_us

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.language is imported

from moelora.layers.rotary import RotaryEmbedding
from moelora.ops.torch import activation as twin_act
from moelora.ops.torch import attention as twin_attention
from moelora.ops.torch import delta as twin_delta
from moelora.ops.torch import norm as twin_norm
from moelora.ops.torch import rotary as twin_rotary
from moelora.ops.torch import router as twin_router
from moelora.ops.triton import activation as kern_act
from moelora.ops.triton import delta as kern_delta
from moelora.ops.triton import kv_write as kern_kv
from moelora.ops.triton import norm as kern_norm
from moelora.ops.triton import rotary as kern_rotary
from moelora.ops.triton import router as kern_router

EPS = 1e-6


@dataclass(frozen=True)
class Shapes:
    hidden: int
    hq: int
    hkv: int
    d: int
    page: int
    experts: int
    top_k: int


QWEN3 = Shapes(hidden=2048, hq=32, hkv=4, d=128, page=16, experts=128, top_k=8)
TINY = Shapes(hidden=96, hq=4, hkv=2, d=32, page=4, experts=8, top_k=2)
# The dense MLP's intermediate (a shared expert's) and Qwen3.5-35B-A3B's linear-attention value heads.
MLP_INTER, LINEAR_HEADS, LINEAR_DV = 512, 32, 128


@dataclass(frozen=True)
class Case:
    op: str
    twin: Callable[[], object]
    kernel: Callable[[], object]
    nbytes: int  # bytes the op must read and write
    written: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (kernel's, twin's) if in place
    compare: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None  # outputs -> compared values


@dataclass
class Row:
    op: str
    tokens: int
    twin_us: float
    kernel_us: float
    twin_graph_us: float | None
    kernel_graph_us: float | None
    gbps: float
    max_err: float


def as_list(out: object) -> list[torch.Tensor]:
    """An op's returned tensors (none for an op that writes in place)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out) if isinstance(out, tuple) else []


def make_cases(s: Shapes, t: int, dtype: torch.dtype, dev: str) -> list[Case]:
    """The ops on one random problem of t tokens (seeded by t)."""
    g = torch.Generator().manual_seed(t)

    def rnd(*shape: int, offset: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) + offset).to(dtype).to(dev)

    x, r, w = rnd(t, s.hidden), rnd(t, s.hidden), rnd(s.hidden, offset=1.0)  # [T, H] x2, [H]
    q, k, v = rnd(t, (s.hq + 2 * s.hkv) * s.d).split([s.hq * s.d, s.hkv * s.d, s.hkv * s.d], dim=-1)
    q, k, v = q.view(t, s.hq, s.d), k.view(t, s.hkv, s.d), v.view(t, s.hkv, s.d)  # [T, heads, D]
    qw, kw = rnd(s.d, offset=1.0), rnd(s.d, offset=1.0)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, s.d, 2).float() / s.d)
    positions = torch.randint(0, 32768, (t,), generator=g).to(dev)
    cos, sin = RotaryEmbedding(inv_freq.tolist(), 1.0).to(dev).cos_sin(positions, dtype)  # [T, D] x2
    blocks = 2 * -(-t // s.page)
    caches = [rnd(blocks, s.page, s.hkv, s.d) for _ in range(2)]  # [blocks, page, Hkv, D]: kernel's k, v
    caches += [c.clone() for c in caches]  # the twin's
    slots = torch.randperm(blocks * s.page, generator=g)[:t].to(dev)
    logits = rnd(t, s.experts)
    e = x.element_size()
    hidden, heads, rope, kv = (
        t * s.hidden * e,
        t * (s.hq + s.hkv) * s.d * e,
        2 * t * s.d * e,
        t * s.hkv * s.d * e,
    )

    gate_up = rnd(t, 2 * MLP_INTER)
    heads_o, heads_z = rnd(t * LINEAR_HEADS, LINEAR_DV), rnd(t * LINEAR_HEADS, LINEAR_DV)
    norm_w = rnd(LINEAR_DV, offset=1.0)
    a, b = rnd(t, 2 * LINEAR_HEADS).split([LINEAR_HEADS, LINEAR_HEADS], dim=-1)
    a_log, dt_bias = rnd(LINEAR_HEADS), rnd(LINEAR_HEADS)
    calls = [
        ("silu(gate) * up", lambda m: m.silu_mul(gate_up), twin_act, kern_act, 3 * t * MLP_INTER * e),
        (
            "shared expert's gated add",
            lambda m: m.add_gated(x, r, logits[:, :1]),
            twin_act,
            kern_act,
            3 * hidden + t * e,
        ),
        (
            "gated rms_norm (linear attention)",
            lambda m: m.gated_rms_norm(heads_o, heads_z, norm_w, EPS),
            twin_norm,
            kern_norm,
            3 * t * LINEAR_HEADS * LINEAR_DV * e,
        ),
        (
            "delta rule gates (linear attention)",
            lambda m: m.delta_gates(a, b, a_log, dt_bias),
            twin_delta,
            kern_delta,
            t * LINEAR_HEADS * (3 * e + 4),
        ),
        ("rms_norm", lambda m: m.rms_norm(x, w, EPS), twin_norm, kern_norm, 2 * hidden),
        ("residual add + rms_norm", lambda m: m.rms_norm(x, w, EPS, r), twin_norm, kern_norm, 4 * hidden),
        ("rotary q, k", lambda m: m.rotary(q, k, cos, sin), twin_rotary, kern_rotary, 2 * heads + rope),
        (
            "q/k norm + rotary",
            lambda m: m.qk_norm_rotary(q, k, qw, kw, EPS, cos, sin),
            twin_rotary,
            kern_rotary,
            2 * heads + rope,
        ),
        (
            "router top-k (softmax, top-k, renormalise)",
            lambda m: m.route(logits, s.top_k, True, False),
            twin_router,
            kern_router,
            t * (s.experts + s.top_k) * e + t * s.top_k * 4,
        ),
    ]
    cases = [Case(op, partial(f, tw), partial(f, kern), n) for op, f, tw, kern, n in calls[:-1]]

    def chosen(out: list[torch.Tensor]) -> list[torch.Tensor]:
        """The router's choice, blind to ties (bf16 logits tie often, and a tie may go either way): the
        chosen logits and the weights, each token's sorted."""
        ids, w = out
        return [logits.gather(1, ids.long()).sort(dim=1).values, w.sort(dim=1).values]

    op, f, tw, kern, n = calls[-1]
    cases.append(Case(op, partial(f, tw), partial(f, kern), n, compare=chosen))
    # The decode step's post-attention norm and router in one launch (up to 16 tokens; more: two)
    router_w = rnd(s.experts, s.hidden) * s.hidden**-0.5

    def normed(out: list[torch.Tensor]) -> list[torch.Tensor]:
        """h, the sums and the weights (sorted: blind to ties) of `add_norm_router`."""
        w, _, h, sums = out
        return [h, sums, w.sort(dim=1).values]

    def norm_router(m):
        return m.add_norm_router(x, r, w, EPS, False, router_w, s.top_k, True, False)

    n = 4 * hidden + s.experts * s.hidden * e + t * s.top_k * 8
    op = "residual add + rms_norm + router + top-k"
    cases.append(
        Case(op, partial(norm_router, twin_router), partial(norm_router, kern_router), n, compare=normed)
    )
    write_kv = Case(
        "write_kv",
        lambda: twin_attention.write_kv(k, v, caches[2], caches[3], slots),
        lambda: kern_kv.write_kv(k, v, caches[0], caches[1], slots),
        4 * kv + slots.element_size() * t,
        (caches[:2], caches[2:]),
    )
    return [*cases, write_kv]


def max_err(case: Case) -> float:
    ours, ref = as_list(case.kernel()), as_list(case.twin())
    if case.written is not None:
        ours, ref = case.written
    if case.compare is not None:
        ours, ref = case.compare(ours), case.compare(ref)
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(ours, ref, strict=True))


def bench(case: Case, tokens: int, reps: int) -> Row:
    err = max_err(case)
    twin_us, kernel_us = events_us(case.twin, reps), events_us(case.kernel, reps)
    cuda = torch.cuda.is_available()
    twin_graph = graph_us(case.twin, calls=20) if cuda else None
    kernel_graph = graph_us(case.kernel, calls=20) if cuda else None
    us = kernel_graph if kernel_graph is not None else kernel_us
    return Row(case.op, tokens, twin_us, kernel_us, twin_graph, kernel_graph, case.nbytes / us / 1e3, err)


def fmt(us: float | None) -> str:
    return "-" if us is None else f"{us:.1f}"


def print_table(rows: list[Row]) -> None:
    print("\n| op | tokens | twin us | kernel us | twin graph us | kernel graph us | kernel GB/s | max err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r.op} | {r.tokens} | {r.twin_us:.1f} | {r.kernel_us:.1f} | {fmt(r.twin_graph_us)} | "
            f"{fmt(r.kernel_graph_us)} | {r.gbps:.0f} | {r.max_err:.2e} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="64,2048,8192", help="token counts, comma-separated")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and token counts (CPU: the interpreter)")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny to check the script on CPU")
    shapes, tokens = (TINY, [1, 7]) if args.tiny else (QWEN3, [int(t) for t in args.tokens.split(",")])
    dtype = torch.bfloat16 if cuda else torch.float16  # the interpreter has no bf16 arithmetic
    dev = "cuda" if cuda else "cpu"
    where = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    print(f"{where}: {shapes}, {dtype}", flush=True)
    rows = [bench(c, t, 100 if cuda else 2) for t in tokens for c in make_cases(shapes, t, dtype, dev)]
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
