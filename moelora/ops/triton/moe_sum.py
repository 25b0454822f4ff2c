"""Router-weighted sum of each token's expert outputs, skipping choices that did not run here (GPT-OSS's
down bias added to each choice's output first)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sum_kernel(
    d_ptr, ids_ptr, w_ptr, y_ptr, bias_ptr, hidden, num_experts, s_id_t, s_id_k, s_w_t, s_w_k, s_bias_e,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < hidden
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(0, TOP_K):
        e = tl.load(ids_ptr + t * s_id_t + j * s_id_k)
        ok = (e >= 0) & (e < num_experts)
        w = tl.where(ok, tl.load(w_ptr + t * s_w_t + j * s_w_k).to(tl.float32), 0.0)
        d = tl.load(d_ptr + (t * TOP_K + j) * hidden + n, mask=n_ok & ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            e64 = tl.where(ok, e, 0).to(tl.int64)
            d += tl.load(bias_ptr + e64 * s_bias_e + n, mask=n_ok & ok, other=0.0).to(tl.float32)
        acc += d * w
    tl.store(y_ptr + t * hidden + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


def moe_sum(
    d: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    b_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """-> y [T, H]: y[t] = sum_j weights[t, j] * (d[t * k + j] + b_down[e]) over choices with ids e in
    [0, E_loc), fp32 (b_down [E_loc, H] or None: no bias)."""
    num_tokens, top_k = local_ids.shape
    hidden = d.shape[1]
    y = torch.empty(num_tokens, hidden, dtype=d.dtype, device=d.device)
    block_n = min(1024, triton.next_power_of_2(hidden))
    _sum_kernel[(num_tokens, triton.cdiv(hidden, block_n))](
        d, local_ids, weights, y, d if b_down is None else b_down, hidden, num_experts,
        *local_ids.stride(), *weights.stride(), 0 if b_down is None else b_down.stride(0),
        TOP_K=top_k, BLOCK_N=block_n, HAS_BIAS=b_down is not None,
    )  # fmt: skip
    return y
