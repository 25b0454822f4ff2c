"""Activations in FP8 for the W8A8 grouped GEMMs (`KernelPlan.fp8_activation_rows`): each row quantised
per group of columns in one pass before the GEMM, so that its K loop loads FP8 tiles as they are, with one
scale a row a step (quantising inside the loop, once per output tile, took 2.6x the W8A16 GEMM's time on
the H200: docs/benchmarks.md, 2026-12-05)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.torch.fp8 import FP8


@triton.jit
def quantize_rows(t, MODE: tl.constexpr):
    """(t [M, K] in e4m3, each row divided by its scale; the scales [M] fp32: the row's largest magnitude
    over 448, 1 for a zero row), as `ops.torch.fp8.quantize_rows` over one group of K columns, rounding
    to nearest, ties to even. MODE 2 (the interpreter, whose cast to e4m3 does not round to nearest)
    rounds to the e4m3 grid first (3 mantissa bits; below 2^-6 the subnormals' spacing): the cast is
    then exact."""
    f = t.to(tl.float32)
    amax = tl.max(tl.abs(f), axis=1)
    scale = tl.where(amax > 0, amax / 448.0, 1.0)
    v = tl.clamp(f / scale[:, None], -448.0, 448.0)
    if MODE == 2:
        a = tl.abs(v)
        ulp = tl.exp2(tl.floor(tl.log2(tl.maximum(a, 0.015625))) - 3.0)
        y = a / ulp  # exact (a power of two); to the nearest integer, ties to even as the GPU's cast
        f = tl.floor(y)
        up = (y - f > 0.5) | ((y - f == 0.5) & (f - 2.0 * tl.floor(f * 0.5) == 1.0))
        a = tl.where(up, f + 1.0, f) * ulp
        v = tl.where(v < 0, -a, a)
    return v.to(tl.float8e4nv), scale


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, xs_ptr, rows, cols, sx_r, sx_c, sq_r, ss_r,
                     GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
                     MODE: tl.constexpr):  # fmt: skip
    """Rows pid0 * BLOCK_T.. over group pid1 (columns past `cols`, or past the group, read as zeros)."""
    r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.program_id(1)
    c = g * GROUP + tl.arange(0, BLOCK_G)
    r_ok = r < rows
    mask = r_ok[:, None] & ((tl.arange(0, BLOCK_G) < GROUP) & (c < cols))[None, :]
    t = tl.load(x_ptr + r[:, None].to(tl.int64) * sx_r + c[None, :] * sx_c, mask=mask, other=0.0)
    q, scale = quantize_rows(t, MODE)
    tl.store(q_ptr + r[:, None].to(tl.int64) * sq_r + c[None, :], q, mask=mask)
    tl.store(xs_ptr + r.to(tl.int64) * ss_r + g, scale, mask=r_ok)


def quantize_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [R, C] in e4m3, each row divided by its scale per group of `group` columns; the scales
    [R, cdiv(C, group)] fp32: the group's largest magnitude over 448, 1 for a zero group), rounding to
    nearest: `ops.torch.fp8.quantize_rows` of x, as the W8A8 twins quantise (`fake_quantize`)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_activations: x {tuple(x.shape)} needs 2 dims")
    rows, cols = x.shape
    groups = triton.cdiv(cols, group)
    q = torch.empty(rows, cols, dtype=FP8, device=x.device)
    scales = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
    block_g = triton.next_power_of_2(group)
    block_t = max(1, min(64, 4096 // block_g))
    if rows:
        _quantize_kernel[(triton.cdiv(rows, block_t), groups)](
            x, q, scales, rows, cols, *x.stride(), q.stride(0), scales.stride(0),
            GROUP=group, BLOCK_T=block_t, BLOCK_G=block_g, MODE=1 if x.is_cuda else 2,
        )  # fmt: skip
    return q, scales
