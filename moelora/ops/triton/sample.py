"""The sampler's exponential race in one pass over the vocabulary: each program takes a chunk of one
row's columns, makes their noise (uint32 hashes, as the twin's int64 ones) and keeps the best q / e;
the chunks' winners are reduced on the host side of the op (two small launches). Instead of the twin's
ten integer passes over [R, V] int64 and its exp, noise and division tensors."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from moelora.ops.torch.sample import COLUMN_SALT, MULT, signed32

BLOCK = 1024  # columns per step
CHUNK = 8192  # columns per program


@triton.jit
def _hash32(x, M0: tl.constexpr, M1: tl.constexpr):
    """The twin's hash32 on uint32 lanes (multiplication wraps at 2^32 as the twin's mask does)."""
    x = x ^ (x >> 16)
    x = x * tl.full((), M0, tl.int32).to(tl.uint32, bitcast=True)
    x = x ^ (x >> 16)
    x = x * tl.full((), M1, tl.int32).to(tl.uint32, bitcast=True)
    return x ^ (x >> 15)


@triton.jit
def _race_kernel(
    logits_ptr, top_ptr, temp_ptr, row_hash_ptr, best_ptr, index_ptr, vocab, chunks, s_row,
    FROM_LOGITS: tl.constexpr, SALT: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    c = tl.program_id(1)
    row = tl.load(row_hash_ptr + r).to(tl.uint32, bitcast=True)
    top = tl.load(top_ptr + r)
    temp = tl.load(temp_ptr + r)
    best = tl.full([BLOCK], -1.0, tl.float32)
    at = tl.zeros([BLOCK], dtype=tl.int32)
    for k0 in range(0, CHUNK, BLOCK):
        col = c * CHUNK + k0 + tl.arange(0, BLOCK)
        ok = col < vocab
        x = tl.load(logits_ptr + r.to(tl.int64) * s_row + col, mask=ok, other=0.0)
        q = x
        if FROM_LOGITS:
            q = tl.exp((x - top) / temp)
        salt = tl.full((), SALT, tl.int32).to(tl.uint32, bitcast=True)
        bits = _hash32(row ^ _hash32(col.to(tl.uint32) + salt, M0, M1), M0, M1)
        u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23: exact, as the twin's
        # libdevice's log on the GPU, not tl.log: the fast log's absolute error (about 2^-22) is most of
        # -log(u) for u near 1, the very columns that win a race (the interpreter's log is exact).
        e = -tl.log(u) if INTERPRETED else -libdevice.log(u)
        score = tl.where(ok, q / e, -1.0)
        # Strictly better only: a lane keeps its first column of a tie (its columns increase).
        better = score > best
        best = tl.where(better, score, best)
        at = tl.where(better, col, at)
    top_score = tl.max(best)
    first = tl.min(tl.where(best == top_score, at, vocab))
    tl.store(best_ptr + r * chunks + c, top_score)
    tl.store(index_ptr + r * chunks + c, first)


def race_argmax(
    x: torch.Tensor,
    top: torch.Tensor,
    temperature: torch.Tensor,
    row_hashes: torch.Tensor,
    from_logits: bool,
) -> torch.Tensor:
    """Same signature and semantics as `moelora.ops.torch.sample.race_argmax`."""
    rows, vocab = x.shape
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    if x.stride(1) != 1:
        x = x.contiguous()
    chunks = triton.cdiv(vocab, CHUNK)
    best = torch.empty(rows, chunks, dtype=torch.float32, device=x.device)
    index = torch.empty(rows, chunks, dtype=torch.int32, device=x.device)
    _race_kernel[(rows, chunks)](
        x, top.contiguous(), temperature.contiguous(), row_hashes.contiguous(), best, index, vocab, chunks,
        x.stride(0), FROM_LOGITS=from_logits, SALT=signed32(COLUMN_SALT), M0=MULT[0], M1=MULT[1],
        CHUNK=CHUNK, BLOCK=BLOCK, INTERPRETED=os.environ.get("TRITON_INTERPRET") == "1",
    )  # fmt: skip
    # The first chunk holding the row's best score: torch's argmax takes the first of equal maxima.
    return index.gather(1, best.argmax(dim=1, keepdim=True))[:, 0].to(torch.int64)
