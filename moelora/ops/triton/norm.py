"""RMSNorm, optionally fused with the residual add before it: one program per row, the row in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, n, eps, s_x, s_r,
    HAS_RESIDUAL: tl.constexpr, WEIGHT_FIRST: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
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
    _rms_norm_kernel[(xr.shape[0],)](
        xr, rr, weight.contiguous(), y, s, n, eps, xr.stride(0), rr.stride(0),
        HAS_RESIDUAL=residual is not None, WEIGHT_FIRST=weight_first, BLOCK_N=block_n,
        num_warps=min(16, max(1, block_n // 256)),
    )  # fmt: skip
    return y if residual is None else (y, s)
