"""RMSNorm, optionally fused with the residual add before it (and with the LoRA shrink of the linear layer
after it, `add_norm_shrink`), and linear attention's gated RMSNorm (times silu of a gate): one program per
row, the row in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.dense_lora import DenseLora
from moelora.ops.plan import TUNED
from moelora.ops.triton.common import after_previous, dependent_launch, stacked_lanes_in_rank, valid_slot


@triton.jit
def _summed(x_ptr, r_ptr, row, s_x, s_r, cols, ok, s_dtype: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Row `row`'s x + residual at `cols` (in x's dtype, as the twin's `x + residual`), or x."""
    s = tl.load(x_ptr + row * s_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * s_r + cols, mask=ok, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(s_dtype)
    return s


@triton.jit
def norm_weighted(s, w_ptr, rstd, cols, ok, WEIGHT_FIRST: tl.constexpr):
    """weight * the normalised row s at `cols`, in fp32 (before the cast to the output's dtype)."""
    normed = s.to(tl.float32) * rstd
    if not WEIGHT_FIRST:
        normed = normed.to(s.dtype).to(tl.float32)  # cast to x's dtype before the weight, as HF does
    return tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32) * normed


@triton.jit
def _norm_row(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, row, n, eps, s_x, s_r, store, HAS_RESIDUAL: tl.constexpr,
              WEIGHT_FIRST: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Row `row`'s rstd; where `store` also its sum (with a residual) and its normed row stored. Every kernel
    here takes a row's rstd from this one reduction, so that the same row gets the same bits in each."""
    i = tl.arange(0, BLOCK_N)
    ok = i < n
    s = _summed(x_ptr, r_ptr, row, s_x, s_r, i, ok, s_ptr.dtype.element_ty, HAS_RESIDUAL)
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / n + eps)
    if store:
        if HAS_RESIDUAL:
            tl.store(s_ptr + row * n + i, s, mask=ok)
        y = norm_weighted(s, w_ptr, rstd, i, ok, WEIGHT_FIRST)
        tl.store(y_ptr + row * n + i, y.to(y_ptr.dtype.element_ty), mask=ok)
    return rstd


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, n, eps, s_x, s_r,
    HAS_RESIDUAL: tl.constexpr, WEIGHT_FIRST: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    after_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    _norm_row(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, row, n, eps, s_x, s_r, True, HAS_RESIDUAL, WEIGHT_FIRST,
              BLOCK_N)  # fmt: skip


@triton.jit
def _add_norm_shrink_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, slot_ptr, a_ptr, rank_ptr, xa_ptr, n, eps, s_x, s_r, num_tokens,
    num_slots, lanes, part_rank, sa_s, sa_l, sa_k, s_rs, s_rp,
    WEIGHT_FIRST: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, BLOCK_L: tl.constexpr,
    PDL: tl.constexpr, STORE: tl.constexpr,
):  # fmt: skip
    """Program (row t, input chunk c): the norm of row t (stored by chunk 0's program where STORE), and
    xa[c, t, l] = a[s, l, cols] @ y[t, cols] over the chunk's columns for t's slot s (nothing for a row
    without one); lane l is part l // part_rank's lane l % part_rank, read below the slot's rank rounded up
    to 8."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    # Before the wait: the token's slot and its adapter's A over the chunk. The step writes slot ids and
    # adapter weights before its first kernel, and no kernel writes them.
    s = valid_slot(tl.load(slot_ptr + row), num_slots)
    lane = tl.arange(0, BLOCK_L)
    l_ok = stacked_lanes_in_rank(lane, (lane < lanes) & (s < num_slots), part_rank, rank_ptr + s * s_rs, s_rp)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    c_ok = cols < n
    a = tl.load(
        a_ptr
        + tl.where(s < num_slots, s, 0).to(tl.int64) * sa_s
        + lane[:, None] * sa_l
        + cols[None, :] * sa_k,
        mask=l_ok[:, None] & c_ok[None, :],
        other=0.0,
    )
    after_previous(PDL)
    rstd = _norm_row(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, row, n, eps, s_x, s_r, STORE and chunk == 0, True,
                     WEIGHT_FIRST, BLOCK_N)  # fmt: skip
    if s < num_slots:
        # the chunk's normed columns as stored (the same elementwise steps), rounded to y's dtype
        part = _summed(x_ptr, r_ptr, row, s_x, s_r, cols, c_ok, s_ptr.dtype.element_ty, True)
        y = norm_weighted(part, w_ptr, rstd, cols, c_ok, WEIGHT_FIRST)
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
        xa = tl.sum(a.to(tl.float32) * y[None, :], axis=1)
        tl.store(xa_ptr + (chunk * num_tokens + row) * lanes + lane, xa, mask=lane < lanes)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as [R, N] with unit stride over N (a view where possible)."""
    rows = t.reshape(-1, n)
    return rows if rows.stride(1) == 1 else rows.contiguous()


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    """t [..., N] as [T, H, N] with unit stride over N: H the second-to-last dimension (1 for a 2-D t), a
    view where the leading dimensions merge (a head-split view of a wider row, as linear attention's z)."""
    t3 = t.reshape(-1, 1, n) if t.dim() < 3 else t.flatten(0, -3)
    return t3 if t3.stride(2) == 1 else t3.contiguous()


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    weight_first: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same signature and Semantics as `moelora.ops.torch.norm.rms_norm`."""
    xr, rr, y, s = _norm_buffers("rms_norm", x, weight, residual, weight_first)
    n, block_n = x.shape[-1], triton.next_power_of_2(x.shape[-1])
    pdl = dependent_launch(x.device, TUNED.pdl_for("norm"))
    _rms_norm_kernel[(xr.shape[0],)](
        xr, rr, weight.contiguous(), y, s, n, eps, xr.stride(0), rr.stride(0),
        HAS_RESIDUAL=residual is not None, WEIGHT_FIRST=weight_first, BLOCK_N=block_n, PDL=pdl,
        num_warps=_norm_warps(block_n), launch_pdl=pdl,
    )  # fmt: skip
    return y if residual is None else (y, s)


def _norm_buffers(
    op: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    weight_first: bool,
    store: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x's rows, residual's rows, y, s) of an RMSNorm launch, the shapes checked: y in the twin's dtype,
    s the sum with the residual (x itself without one); without `store` y is empty (of y's dtype, which
    the shrink rounds the normed row to) and s is x: neither is written."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"{op}: weight {tuple(weight.shape)} for rows of {n} (x {tuple(x.shape)})")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"{op}: residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
        )
    xr = _rows(x, n)
    rr = xr if residual is None else _rows(residual, n)
    y_dtype = x.dtype if weight_first else torch.promote_types(weight.dtype, x.dtype)
    if not store:
        return xr, rr, torch.empty(0, dtype=y_dtype, device=x.device), x
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    s = x if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    return xr, rr, y, s


def _norm_warps(block_n: int) -> int:
    """Warps of a program holding a row: the same in every norm kernel, so a row's reduction (and so its
    bits) is the same in each."""
    return min(16, max(1, block_n // 256))


@triton.jit
def _gated_rms_norm_kernel(x_ptr, z_ptr, w_ptr, y_ptr, n, heads, eps, s_xt, s_xh, s_zt, s_zh,
                           ROUND: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Row (t, h) of x and z viewed as [T, heads, N] (any strides over T and heads)."""
    row = tl.program_id(0).to(tl.int64)
    t, h = row // heads, row % heads
    i = tl.arange(0, BLOCK_N)
    ok = i < n
    x = tl.load(x_ptr + t * s_xt + h * s_xh + i, mask=ok, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)  # cast to x's dtype before the weight, as HF does
    w = tl.load(w_ptr + i, mask=ok, other=0.0)
    weighted = w.to(tl.float32) * normed
    if ROUND:  # the weight's product in x's dtype where that is the promoted one (the twin's `weight * n`)
        weighted = weighted.to(x.dtype).to(tl.float32)
    z = tl.load(z_ptr + t * s_zt + h * s_zh + i, mask=ok, other=0.0).to(tl.float32)
    y = weighted * (z / (1.0 + tl.exp(-z)))
    tl.store(y_ptr + row * n + i, y.to(y_ptr.dtype.element_ty), mask=ok)


def add_norm_shrink(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor,
    weight_first: bool,
    lora: DenseLora,
    token_slot: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same signature and Semantics as `moelora.ops.torch.norm.add_norm_shrink` (rows of a token without
    a slot are left unwritten in xa). One launch: one program per (row, chunk of `chunk` columns)."""
    return _norm_shrink(x, weight, eps, residual, weight_first, lora, token_slot, chunk, True)


def norm_shrink(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor,
    weight_first: bool,
    lora: DenseLora,
    token_slot: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """Same signature and Semantics as `moelora.ops.torch.norm.norm_shrink`: `add_norm_shrink`'s launch,
    storing neither the norm's output nor the sum."""
    return _norm_shrink(x, weight, eps, residual, weight_first, lora, token_slot, chunk, False)[2]


def _norm_shrink(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor,
    weight_first: bool,
    lora: DenseLora,
    token_slot: torch.Tensor,
    chunk: int,
    store: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, xa) of `add_norm_shrink`; without `store` y and s are placeholders, never written."""
    n = x.shape[-1]
    num_slots, parts, rank = lora.a.shape[:3]
    if x.dim() != 2 or lora.a.shape[3] != n or token_slot.shape != (x.shape[0],) or chunk & (chunk - 1):
        raise ValueError(
            f"add_norm_shrink: x {tuple(x.shape)}, A {tuple(lora.a.shape)}, token_slot "
            f"{tuple(token_slot.shape)}, chunk {chunk}: x [T, N], A [S, P, R, N], token_slot [T], chunk a "
            "power of 2"
        )
    xr, rr, y, s = _norm_buffers("add_norm_shrink", x, weight, residual, weight_first, store)
    chunks = triton.cdiv(n, chunk)
    lanes = parts * rank
    xa = torch.empty(chunks, x.shape[0], lanes, dtype=torch.float32, device=x.device)
    a = lora.a.reshape(num_slots, lanes, n)
    block_n = triton.next_power_of_2(n)
    pdl = dependent_launch(x.device, TUNED.pdl_for("norm"))
    _add_norm_shrink_kernel[(x.shape[0], chunks)](
        xr, rr, weight.contiguous(), y, s, token_slot, a, lora.rank, xa, n, eps, xr.stride(0), rr.stride(0),
        x.shape[0], num_slots, lanes, rank, *a.stride(), *lora.rank.stride(),
        WEIGHT_FIRST=weight_first, BLOCK_N=block_n, CHUNK=chunk,
        BLOCK_L=max(16, triton.next_power_of_2(lanes)), PDL=pdl, STORE=store, num_warps=_norm_warps(block_n),
        launch_pdl=pdl,
    )  # fmt: skip
    return y, s, xa


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same signature and Semantics as `moelora.ops.torch.norm.gated_rms_norm`."""
    n = x.shape[-1]
    if weight.shape != (n,) or gate.shape != x.shape:
        raise ValueError(
            f"gated_rms_norm: x {tuple(x.shape)}, gate {tuple(gate.shape)}, weight {tuple(weight.shape)}: "
            f"x and gate [..., N], weight [N]"
        )
    xr, zr = _heads(x, n), _heads(gate, n)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_n = triton.next_power_of_2(n)
    _gated_rms_norm_kernel[(x.numel() // max(n, 1),)](
        xr, zr, weight.contiguous(), y, n, xr.shape[1], eps, *xr.stride()[:2], *zr.stride()[:2],
        ROUND=torch.promote_types(weight.dtype, x.dtype) == x.dtype, BLOCK_N=block_n,
        num_warps=_norm_warps(block_n),
    )  # fmt: skip
    return y
