"""The MLPs' elementwise steps in one launch each: the dense MLP's silu(gate) * up (silu and the product were
two), and the gated shared expert's add to the routed sum (sigmoid, product and sum were three)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(gu_ptr, h_ptr, inter, s_gu, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < inter
    gate = tl.load(gu_ptr + t * s_gu + i, mask=ok, other=0.0)
    up = tl.load(gu_ptr + t * s_gu + inter + i, mask=ok, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)  # rounded, as the twin's F.silu
    tl.store(h_ptr + t * inter + i, (silu * up).to(h_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Same signature and Semantics as `moelora.ops.torch.activation.silu_mul`."""
    tokens, width = gate_up.shape
    if width % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"silu_mul: gate_up {tuple(gate_up.shape)} must be [T, 2I], unit stride over 2I")
    inter = width // 2
    h = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if tokens:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(tokens, triton.cdiv(inter, block))](
            gate_up, h, inter, gate_up.stride(0), BLOCK=block, num_warps=4
        )
    return h


@triton.jit
def _add_gated_kernel(base_ptr, x_ptr, gate_ptr, y_ptr, hidden, s_base, s_x, s_gate, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < hidden
    base = tl.load(base_ptr + t * s_base + i, mask=ok, other=0.0)
    x = tl.load(x_ptr + t * s_x + i, mask=ok, other=0.0).to(tl.float32)
    logit = tl.load(gate_ptr + t * s_gate)
    # each step rounded to the dtype, as the twin's: sigmoid, the product, the sum
    gate = (1.0 / (1.0 + tl.exp(-logit.to(tl.float32)))).to(logit.dtype).to(tl.float32)
    gated = (gate * x).to(base.dtype).to(tl.float32)
    tl.store(y_ptr + t * hidden + i, (base.to(tl.float32) + gated).to(y_ptr.dtype.element_ty), mask=ok)


def add_gated(base: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Same signature and Semantics as `moelora.ops.torch.activation.add_gated`."""
    tokens, hidden = base.shape
    if (
        x.shape != base.shape
        or gate.shape != (tokens, 1)
        or x.dtype != base.dtype
        or gate.dtype != base.dtype
    ):
        raise ValueError(
            f"add_gated: base {tuple(base.shape)} {base.dtype}, x {tuple(x.shape)} {x.dtype}, gate "
            f"{tuple(gate.shape)} {gate.dtype}: base and x [T, H], gate [T, 1], one dtype"
        )
    if base.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("add_gated: unit stride over the hidden size")
    y = torch.empty(tokens, hidden, dtype=base.dtype, device=base.device)
    if tokens:
        block = min(1024, triton.next_power_of_2(hidden))
        _add_gated_kernel[(tokens, triton.cdiv(hidden, block))](
            base, x, gate, y, hidden, base.stride(0), x.stride(0), gate.stride(0), BLOCK=block, num_warps=4
        )
    return y
