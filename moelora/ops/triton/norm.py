"""RMSNorm, optionally fused with the residual add before it, and linear attention's gated RMSNorm (times
silu of a gate): one program per row, the row in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.plan import TUNED
from moelora.ops.triton.common import after_previous, dependent_launch


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, n, eps, s_x, s_r,
    HAS_RESIDUAL: tl.constexpr, WEIGHT_FIRST: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    after_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_N)
    ok = i < n
    s = tl.load(x_ptr + row * s_x + i, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        # the add rounds to x's dtype, as the twin's `x + residual` does
        r = tl.load(r_ptr + row * s_r + i, mask=ok, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * n + i, s, mask=ok)
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / n + eps)
    normed = sf * rstd
    if not WEIGHT_FIRST:
        normed = normed.to(s.dtype).to(tl.float32)  # cast to x's dtype before the weight, as HF does
    w = tl.load(w_ptr + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n + i, (w * normed).to(y_ptr.dtype.element_ty), mask=ok)


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
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} for rows of {n} (x {tuple(x.shape)})")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match x "
            f"{tuple(x.shape)} {x.dtype}"
        )
    xr = _rows(x, n)
    rr = xr if residual is None else _rows(residual, n)
    y_dtype = x.dtype if weight_first else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    s = x if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    block_n = triton.next_power_of_2(n)
    pdl = dependent_launch(x.device, TUNED.pdl)
    _rms_norm_kernel[(xr.shape[0],)](
        xr, rr, weight.contiguous(), y, s, n, eps, xr.stride(0), rr.stride(0),
        HAS_RESIDUAL=residual is not None, WEIGHT_FIRST=weight_first, BLOCK_N=block_n, PDL=pdl,
        num_warps=min(16, max(1, block_n // 256)), launch_pdl=pdl,
    )  # fmt: skip
    return y if residual is None else (y, s)


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
        num_warps=min(16, max(1, block_n // 256)),
    )  # fmt: skip
    return y
