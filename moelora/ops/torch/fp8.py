"""FP8 (float8_e4m3fn) weights with a scale per row and group of input columns: quantising at load
(`--quantization fp8`) and the twin's dequantisation.

W [..., N, K] is cut into groups of `group` columns; each row's group gets scale = amax / 448 (the
largest e4m3 value; 1 for an all-zero group), and W8 = round(W / scale) in e4m3. A scale per row, not per
128 x 128 block, keeps every slice along the rows exact and costs 4 bytes per `group` weights (3% of the
FP8 bytes at 128).
"""

from __future__ import annotations

import torch

from moelora.ops.expert_extras import ExpertExtras
from moelora.ops.torch import acc_dtype

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def quantize_rows(w: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (W8 [..., N, K] float8_e4m3fn, scales [..., N, ceil(K / group)] fp32) of w [..., N, K]."""
    *lead, rows, cols = w.shape
    groups = -(-cols // group)
    padded = torch.zeros(*lead, rows, groups * group, dtype=torch.float32, device=w.device)
    padded[..., :cols] = w.float()
    blocks = padded.view(*lead, rows, groups, group)
    amax = blocks.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    w8 = (blocks / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return w8.view(*lead, rows, groups * group)[..., :cols].contiguous(), scales


def _per_column(scales: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """scales [..., N, ceil(K / group)] as fp32 [..., N, K]: each column its group's scale."""
    return scales.float().repeat_interleave(group, dim=-1)[..., :cols]


def quantize_with(w: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """W8 = round(w / scale) in e4m3 with given scales [..., N, ceil(K / group)] (saturating at 448)."""
    return (w.float() / _per_column(scales, group, w.shape[-1])).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_rows(w8: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """W [..., N, K] in `dtype`: W8 * its scales (the product in fp32, then rounded once)."""
    return (w8.float() * _per_column(scales, group, w8.shape[-1])).to(dtype)


def fake_quantize(x: torch.Tensor, group: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] as the FP8 products of W8A8 kernels see it: quantised per row and group of `group`
    columns, dequantised back to `dtype` (x's by default)."""
    x8, scales = quantize_rows(x, group)
    return dequantize_rows(x8, scales, group, dtype or x.dtype)


def expert_weights(
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    extras: ExpertExtras | None,
    dtype: torch.dtype,
    fp8_activations: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed experts' weights as the twins use them: FP8 weights (`extras.scales`) dequantised to
    `dtype` (W8A16: the kernels multiply them rounded so), or with `fp8_activations` to its accumulation
    dtype (W8A8: the kernels scale the FP8 products in fp32); others as they are."""
    scales = extras.scales if extras is not None else None
    if scales is None:
        return w_gate_up, w_down
    to = acc_dtype(dtype) if fp8_activations else dtype
    return (
        dequantize_rows(w_gate_up, scales.gate_up, scales.group, to),
        dequantize_rows(w_down, scales.down, scales.group, to),
    )


def expert_inputs(x: torch.Tensor, extras: ExpertExtras | None, fp8: bool, acc: torch.dtype) -> torch.Tensor:
    """x in the accumulation dtype `acc` as FP8 experts' products take it: with `fp8` (W8A8) quantised
    per row and scale group, X8 * scale not rounded to x's dtype (the kernels scale the FP8 products in
    fp32); else x as it is."""
    if not fp8 or extras is None or extras.scales is None:
        return x.to(acc)
    return fake_quantize(x, extras.scales.group, acc)
