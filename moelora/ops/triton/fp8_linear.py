"""FP8 linear weights (`RowScales`) past the one-launch layer's tokens: a grouped-tile GEMM scaling each
weight tile in registers (`fp8_matmul`), and the 16-bit copy cuBLAS takes for long prefills
(`dequantize`); `check_scales`, the launchers' check of a weight's scales."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.fp8 import RowScales
from moelora.ops.plan import TUNED, KernelPlan
from moelora.ops.triton.common import grouped_pid, num_sms
from moelora.ops.triton.tiles import dot_precision


def check_scales(weight: torch.Tensor, scales: RowScales) -> None:
    """ValueError unless `scales` fit the FP8 `weight` as the kernels read them."""
    rows, cols = weight.shape
    groups = triton.cdiv(cols, scales.group)
    table = scales.table
    if weight.dtype != torch.float8_e4m3fn or table.dtype != torch.float32:
        raise ValueError(
            f"FP8 linear: weight {weight.dtype} and scales {table.dtype}, need float8_e4m3fn, fp32"
        )
    if tuple(table.shape) != (rows, groups) or table.stride(1) != 1 or scales.group < 16:
        raise ValueError(
            f"FP8 linear: scales {list(table.shape)} (strides {table.stride()}) in groups of {scales.group} "
            f"for a weight {[rows, cols]}: need [{rows}, {groups}], unit stride over the groups, groups >= 16"
        )


@triton.jit
def _dequantize_kernel(w_ptr, sc_ptr, y_ptr, rows, cols, sw_n, ss_n, sy_n,
                       GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """y[n, k] = w[n, k] * sc[n, k // GROUP] over one tile (in one group: BLOCK_K <= GROUP)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    n_ok = n < rows
    mask = n_ok[:, None] & (k < cols)[None, :]
    w = tl.load(w_ptr + n[:, None].to(tl.int64) * sw_n + k[None, :], mask=mask, other=0.0)
    scale = tl.load(sc_ptr + n.to(tl.int64) * ss_n + k0 // GROUP, mask=n_ok, other=0.0)
    y = (w.to(tl.float32) * scale[:, None]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + n[:, None].to(tl.int64) * sy_n + k[None, :], y, mask=mask)


def dequantize(weight: torch.Tensor, scales: RowScales, dtype: torch.dtype) -> torch.Tensor:
    """The FP8 `weight` [N, K] times its rows' scales, in `dtype` (a new tensor): what cuBLAS multiplies
    where the one launch does not take the tokens."""
    check_scales(weight, scales)
    if weight.stride(1) != 1:
        raise ValueError(f"FP8 linear: the weight needs unit stride over its columns, got {weight.stride()}")
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=dtype, device=weight.device)
    block_n, block_k = 32, min(128, scales.group)
    grid = (triton.cdiv(rows, block_n), triton.cdiv(cols, block_k))
    _dequantize_kernel[grid](
        weight, scales.table, out, rows, cols, weight.stride(0), scales.table.stride(0), out.stride(0),
        GROUP=scales.group, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


@triton.jit
def _fp8_matmul_kernel(
    x_ptr, w_ptr, sc_ptr, bias_ptr, y_ptr, num_tokens, out_dim, sx_t, sx_k, sw_n, sw_k, ss_n, sy_t, sy_n,
    IN_DIM: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of y = x @ (w * sc)^T + bias: each FP8 weight tile times its rows'
    scales in x's dtype (a K step within one group: BLOCK_K <= GROUP), fp32 accumulation."""
    num_m, num_n = tl.cdiv(num_tokens, BLOCK_M), tl.cdiv(out_dim, BLOCK_N)
    pid_m, pid_n = grouped_pid(tl.program_id(0), num_m, num_n, GROUP_M)
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok, n_ok = t < num_tokens, n < out_dim
    kk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + t[:, None].to(tl.int64) * sx_t + kk[None, :] * sx_k
    w_ptrs = w_ptr + n[None, :].to(tl.int64) * sw_n + kk[:, None] * sw_k
    s_ptrs = sc_ptr + n.to(tl.int64) * ss_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, IN_DIM, BLOCK_K):
        k_ok = kk < IN_DIM - k0
        xk = tl.load(x_ptrs, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        wk = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        scale = tl.load(s_ptrs + k0 // GROUP, mask=n_ok, other=0.0)
        wk = (wk.to(tl.float32) * scale[None, :]).to(xk.dtype)
        acc = tl.dot(xk, wk, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * sx_k
        w_ptrs += BLOCK_K * sw_k
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + t[:, None].to(tl.int64) * sy_t + n[None, :] * sy_n
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


def filled_block_n(block_n: int, row_blocks: int, out_dim: int, sms: int) -> int:
    """The GEMM's output columns a tile: `block_n`, halved down to 32 while the grid would leave SMs idle.
    At a few dozen tokens one row block of 128-wide tiles is 40 programs for Qwen3-30B-A3B's q/k/v (5,120
    columns) on 132 SMs; 32-wide tiles make 160."""
    while block_n > 32 and row_blocks * triton.cdiv(out_dim, block_n) < sms:
        block_n //= 2
    return block_n


def fp8_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: RowScales,
    bias: torch.Tensor | None,
    plan: KernelPlan = TUNED,
) -> torch.Tensor:
    """y [T, out] = x @ (weight * scales)^T + bias in x's dtype: x [T, in]; weight [out, in] FP8 with
    its `scales`; the tiles `plan.fp8_gemm_tiles` (K step cut to the scales' group, narrower tiles where
    the grid would not fill the card: `filled_block_n`)."""
    check_scales(weight, scales)
    num_tokens, in_dim = x.shape
    out_dim = weight.shape[0]
    t = plan.fp8_gemm_tiles
    block_m = min(t.block_m, max(16, triton.next_power_of_2(num_tokens)))
    block_k = min(t.block_k, scales.group, max(16, triton.next_power_of_2(in_dim)))
    row_blocks = triton.cdiv(num_tokens, block_m)
    block_n = filled_block_n(t.block_n, row_blocks, out_dim, num_sms(x.device))
    y = torch.empty(num_tokens, out_dim, dtype=x.dtype, device=x.device)
    grid = (row_blocks * triton.cdiv(out_dim, block_n),)
    _fp8_matmul_kernel[grid](
        x, weight, scales.table, weight if bias is None else bias, y, num_tokens, out_dim,
        *x.stride(), *weight.stride(), scales.table.stride(0), *y.stride(),
        IN_DIM=in_dim, GROUP=scales.group, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_M=t.group_m, PRECISION=dot_precision(x.dtype),
        num_warps=t.warps, num_stages=t.stages,
    )  # fmt: skip
    return y
