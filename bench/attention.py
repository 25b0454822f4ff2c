"""Attention timings on GPU against the bandwidth floor (decode) and flash SDPA (prefill) (issue 7).

Qwen3-30B-A3B head shapes: 32 query heads, 4 KV heads, head_dim 128, bf16, KV blocks of 16 tokens
scattered at random. Decode: B sequences of one context length each, one query token each, timed under
CUDA-graph replay (20 calls per graph); share of 3.0 TB/s (the issue's H100 figure) and of the device
copy bandwidth measured in the same run, over the K/V bytes read. Prefill: one prompt of T tokens, causal;
the paged kernel, the dense (cacheless) kernel, and flash SDPA on the same dense problem with the KV heads
expanded. Run a subset with the flags, e.g.
    python bench/attention.py --batches 16,64 --contexts 8192 --prefill 2048 --sweep --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import TypeVar

import torch
import torch.nn.functional as F
from timing import events_us, graph_us
from torch.nn.attention import SDPBackend, sdpa_kernel

from moelora.ops.plan import TUNED, AttnDecodeTiles
from moelora.ops.torch import attention as twin
from moelora.ops.triton import attention as kern
from moelora.ops.triton.attn_decode import num_splits, paged_decode
from moelora.ops.triton.attn_prefill import PrefillTiles, prefill_tiles

HQ, HKV, D, PAGE = 32, 4, 128, 16
SCALE = D**-0.5
ISSUE_TBPS = 3.0
T = TypeVar("T")


@dataclass
class DecodeRow:
    batch: int
    context: int
    splits: int
    graph_us: float
    eager_us: float
    tbps: float
    share_3tbps: float
    share_copy: float


@dataclass
class PrefillRow:
    tokens: int
    prefix: int
    paged_us: float
    dense_us: float
    sdpa_us: float
    paged_vs_sdpa: float
    paged_tflops: float


def copy_tbps() -> float:
    """Device-to-device copy bandwidth, bytes read + written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = events_us(lambda: dst.copy_(src), 10)
    return 2 * src.numel() / us / 1e6


def paged_cache(k: torch.Tensor, v: torch.Tensor, lens: list[int], g: torch.Generator):
    """K/V [sum(lens), HKV, D] scattered into shuffled blocks -> (k_cache, v_cache, block_tables)."""
    need = [-(-n // PAGE) for n in lens]
    order = torch.randperm(sum(need), generator=g).cuda()
    k_cache = torch.empty(sum(need), PAGE, HKV, D, dtype=k.dtype, device="cuda")
    v_cache = torch.empty_like(k_cache)
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32, device="cuda")
    first, tok = 0, 0
    for b, n in enumerate(lens):
        blocks = order[first : first + need[b]]
        tables[b, : need[b]] = blocks.int()
        slots = (blocks[:, None] * PAGE + torch.arange(PAGE, device="cuda")).flatten()[:n]
        k_cache.view(-1, HKV, D)[slots] = k[tok : tok + n]
        v_cache.view(-1, HKV, D)[slots] = v[tok : tok + n]
        first, tok = first + need[b], tok + n
    return k_cache, v_cache, tables


def decode_problem(batch: int, context: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    blocks = batch * context // PAGE
    k_cache = torch.randn(blocks, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(blocks, generator=g).int().view(batch, -1).cuda()
    q = torch.randn(batch, HQ, D, generator=g).bfloat16().cuda()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, tables, lens


def bench_decode(batch: int, context: int, copy: float, tiles: AttnDecodeTiles) -> DecodeRow:
    q, k_cache, v_cache, tables, lens = decode_problem(batch, context)
    splits = num_splits(batch, HKV, tables.shape[1] * PAGE, q.device, tiles)
    us = graph_us(lambda: paged_decode(q, k_cache, v_cache, tables, lens, SCALE, None, tiles), calls=20)
    seq_lens, kv_lens = (1,) * batch, (context,) * batch
    eager = events_us(
        lambda: kern.paged_attention(q, k_cache, v_cache, tables, seq_lens, kv_lens, SCALE, None), 20
    )
    tbps = 2 * batch * context * HKV * D * 2 / us / 1e6
    return DecodeRow(batch, context, splits, us, eager, tbps, tbps / ISSUE_TBPS, tbps / copy)


def check_decode(batch: int, context: int) -> float:
    """Max abs error of the kernel against the twin (bf16 in, fp32 softmax both)."""
    q, k_cache, v_cache, tables, _ = decode_problem(batch, context, seed=1)
    args = (q, k_cache, v_cache, tables, (1,) * batch, (context,) * batch, SCALE, None)
    return (kern.paged_attention(*args).float() - twin.paged_attention(*args).float()).abs().max().item()


def sweep_decode(cases: list[tuple[int, int]]) -> list[dict]:
    """Tile and split-count variants on each case; each checked against the default tiles' output."""
    rows = []
    variants = [
        replace(TUNED.attn_decode_tiles, block_n=bn, warps=w, stages=s)
        for bn in (32, 64, 128)
        for w, s in ((4, 2), (4, 3), (8, 3))
    ]
    for batch, context in cases:
        q, k_cache, v_cache, tables, lens = decode_problem(batch, context)
        ref = paged_decode(q, k_cache, v_cache, tables, lens, SCALE, None).float()
        base = num_splits(batch, HKV, context, q.device, TUNED.attn_decode_tiles)
        for tiles in variants:
            for splits in sorted({max(1, base // 2), base, base * 2}):
                fn = partial(paged_decode, q, k_cache, v_cache, tables, lens, SCALE, None, tiles, splits)
                err = (fn().float() - ref).abs().max().item()
                us = graph_us(fn, calls=10, reps=5)
                tbps = 2 * batch * context * HKV * D * 2 / us / 1e6
                rows.append({"batch": batch, "context": context, **asdict(tiles), "splits": splits, "us": us,
                             "tbps": tbps, "err": err})  # fmt: skip
        best = min(
            (r for r in rows if r["batch"] == batch and r["context"] == context), key=lambda r: r["us"]
        )
        print(f"decode sweep B={batch} ctx={context}: best {best}", flush=True)
    return rows


def prefill_problem(tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, HQ, D, generator=g).bfloat16().cuda()
    k = torch.randn(tokens, HKV, D, generator=g).bfloat16().cuda()
    v = torch.randn(tokens, HKV, D, generator=g).bfloat16().cuda()
    return q, k, v, g


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Flash SDPA on the dense problem, KV heads expanded beforehand (not timed)."""
    q4 = q.transpose(0, 1).unsqueeze(0)
    k4 = k.repeat_interleave(HQ // HKV, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    v4 = v.repeat_interleave(HQ // HKV, dim=1).transpose(0, 1).unsqueeze(0).contiguous()

    def run() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=SCALE)

    return run


def causal_tflops(tokens: int, prefix: int, us: float) -> float:
    pairs = tokens * prefix + tokens * (tokens + 1) / 2
    return 4 * pairs * HQ * D / us / 1e6


def bench_prefill(tokens: int, prefix: int) -> PrefillRow:
    q, k, v, g = prefill_problem(tokens + prefix)
    k_cache, v_cache, tables = paged_cache(k, v, [tokens + prefix], g)
    qn = q[prefix:]
    paged = events_us(
        lambda: kern.paged_attention(
            qn, k_cache, v_cache, tables, (tokens,), (tokens + prefix,), SCALE, None
        ),
        10,
    )
    dense = sdpa = float("nan")
    if prefix == 0:
        dense = events_us(lambda: kern.prefill_attention(q, k, v, (tokens,), SCALE, None), 10)
        sdpa = events_us(sdpa_flash(q, k, v), 10)
    return PrefillRow(tokens, prefix, paged, dense, sdpa, paged / sdpa, causal_tflops(tokens, prefix, paged))


def check_prefill(tokens: int) -> float:
    q, k, v, g = prefill_problem(tokens, seed=1)
    k_cache, v_cache, tables = paged_cache(k, v, [tokens], g)
    ref = sdpa_flash(q, k, v)()[0].transpose(0, 1).float()
    got = kern.paged_attention(q, k_cache, v_cache, tables, (tokens,), (tokens,), SCALE, None).float()
    dense = kern.prefill_attention(q, k, v, (tokens,), SCALE, None).float()
    return max((got - ref).abs().max().item(), (dense - ref).abs().max().item())


def sweep_prefill(tokens: int) -> list[dict]:
    q, k, v, g = prefill_problem(tokens)
    k_cache, v_cache, tables = paged_cache(k, v, [tokens], g)
    ref = sdpa_flash(q, k, v)()[0].transpose(0, 1).float()
    sdpa = events_us(sdpa_flash(q, k, v), 10)
    rows = []
    for t in [PrefillTiles(128, 64, 8, 3), PrefillTiles(128, 128, 8, 3), PrefillTiles(64, 64, 4, 3),
              PrefillTiles(128, 64, 4, 3), PrefillTiles(128, 32, 4, 3), PrefillTiles(64, 128, 4, 3),
              PrefillTiles(128, 64, 8, 4), PrefillTiles(64, 64, 4, 4)]:  # fmt: skip
        fn = lambda t=t: kern.varlen(q, k_cache, v_cache, tables, (tokens,), (tokens,), SCALE, None, t)  # noqa: E731
        try:
            err = (fn().float() - ref).abs().max().item()
            us = events_us(fn, 10)
        except Exception as exc:  # a tile that does not fit shared memory: report and go on
            print(f"prefill tiles {t}: {type(exc).__name__}: {exc}", flush=True)
            continue
        rows.append({"tokens": tokens, **asdict(t), "us": us, "vs_sdpa": us / sdpa, "err": err})
        print(f"prefill sweep T={tokens} {t}: {us:.1f} us ({us / sdpa:.2f}x sdpa) err {err:.2e}", flush=True)
    return rows


def section(name: str, fn: Callable[[], T]) -> T | list:
    """fn(), or [] after printing its error: one failing case must not cost the others' numbers."""
    try:
        return fn()
    except Exception:
        print(f"--- {name} failed:\n{traceback.format_exc()}", flush=True)
        return []


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=ints, default=[1, 16, 64, 256], help="decode batch sizes ('' for none)")
    ap.add_argument("--contexts", type=ints, default=[2048, 8192], help="decode context lengths")
    ap.add_argument("--prefill", type=ints, default=[2048, 8192], help="prefill prompt lengths ('' for none)")
    ap.add_argument(
        "--prefix", type=int, default=6144, help="cached prefix for one extra prefill row (0: none)"
    )
    ap.add_argument("--sweep", action="store_true", help="also sweep decode and prefill tiles")
    ap.add_argument("--json", help="write all rows to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU")
    copy = copy_tbps()
    print(
        f"{torch.cuda.get_device_name()}: copy {copy:.2f} TB/s; decode tiles {TUNED.attn_decode_tiles}",
        flush=True,
    )
    out: dict = {"device": torch.cuda.get_device_name(), "copy_tbps": copy}
    section("check", lambda: print(f"check: decode max err {check_decode(16, 2000):.2e}, "
                                   f"prefill max err {check_prefill(3000):.2e}", flush=True))  # fmt: skip
    if args.sweep:
        out["decode_sweep"] = section(
            "decode sweep", lambda: sweep_decode([(16, 8192), (64, 8192), (1, 8192)])
        )
        out["prefill_sweep"] = section(
            "prefill sweep", lambda: [r for t in args.prefill for r in sweep_prefill(t)]
        )
    decode = [
        row
        for c in args.contexts
        for b in args.batches
        for row in section(
            f"decode {b}x{c}", lambda b=b, c=c: [asdict(bench_decode(b, c, copy, TUNED.attn_decode_tiles))]
        )
    ]
    prefill_cases = [(t, 0) for t in args.prefill] + ([(2048, args.prefix)] if args.prefix else [])
    prefill = [
        row
        for t, p in prefill_cases
        for row in section(f"prefill {t}+{p}", lambda t=t, p=p: [asdict(bench_prefill(t, p))])
    ]
    out.update(decode=decode, prefill=prefill, prefill_tiles=asdict(prefill_tiles(D)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print("\n| B | context | splits | graph us | eager us | TB/s | of 3.0 TB/s | of copy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in decode:
        print(f"| {r['batch']} | {r['context']} | {r['splits']} | {r['graph_us']:.1f} | "
              f"{r['eager_us']:.1f} | {r['tbps']:.2f} | {r['share_3tbps']:.0%} | "
              f"{r['share_copy']:.0%} |")  # fmt: skip
    print("\n| T | prefix | paged us | dense us | flash SDPA us | paged / SDPA | paged TFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in prefill:
        print(f"| {r['tokens']} | {r['prefix']} | {r['paged_us']:.1f} | {r['dense_us']:.1f} | "
              f"{r['sdpa_us']:.1f} | {r['paged_vs_sdpa']:.2f} | {r['paged_tflops']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
