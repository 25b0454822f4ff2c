"""The dense MLP's activation, silu(gate) * up, in one launch (`chunk`, `silu` and the product were two)."""

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
