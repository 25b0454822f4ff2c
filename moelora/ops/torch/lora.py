"""PyTorch twins of the LoRA ops: dense multi-LoRA and the routed experts with per-expert LoRA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelora.ops.dense_lora import DenseLora
from moelora.ops.expert_extras import ExpertExtras, activation
from moelora.ops.expert_lora import ExpertLora
from moelora.ops.fp8 import RowScales
from moelora.ops.input_norm import InputNorm
from moelora.ops.torch import acc_dtype
from moelora.ops.torch.fp8 import dequantize_rows, expert_inputs, expert_weights
from moelora.ops.torch.norm import rms_norm


def _slots(token_slot: torch.Tensor, num_slots: int) -> list[int]:
    valid = token_slot[(token_slot >= 0) & (token_slot < num_slots)]
    return [int(s) for s in valid.unique().tolist()]


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    token_slot: torch.Tensor,
    slot_rank: torch.Tensor | None = None,
) -> None:
    """Dense multi-LoRA, added in place.

    Shapes: T tokens, S slots, R the pool's rank. y [T, out] (may be a column slice of a wider output);
    x [T, in]; a [S, R, in]; b [S, out, R] (scale folded in, ranks below R zero-padded); token_slot [T] int;
    slot_rank None or [S] int (each slot's rank: its lanes from there up are the zero padding, which
    kernels may skip; the result is the same).

    Semantics: y[t] += b[s] @ (a[s] @ x[t]) for s = token_slot[t] in [0, S); tokens with any other slot
    (-1 for the base model) are left alone. The product is computed in fp32 (fp64 for
    fp64 inputs) and added in y's dtype.
    """
    acc = acc_dtype(x.dtype)
    for s in _slots(token_slot, a.shape[0]):
        rows = (token_slot == s).nonzero().squeeze(1)
        delta = (x[rows].to(acc) @ a[s].to(acc).T) @ b[s].to(acc).T
        y[rows] = (y[rows].to(acc) + delta).to(y.dtype)


def add_lora_parts(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    token_slot: torch.Tensor,
    sizes: tuple[int, ...],
    slot_rank: torch.Tensor | None = None,
) -> None:
    """Dense multi-LoRA of a layer whose output stacks P parts (q/k/v, gate/up), added in place.

    Shapes: y [T, sum(sizes)]; x [T, in]; a [S, P, R, in] (one A per part); b [S, sum(sizes), R] (the
    parts' rows stacked like y's columns); token_slot [T] int; slot_rank None or [S, P] int (as in
    `add_lora`, per part).

    Semantics: part p (columns o_p .. o_p + sizes[p] of y and rows of b) is `add_lora` with a[:, p]:
    y[t, part] += b[s, part] @ (a[s, p] @ x[t]) for s = token_slot[t] in [0, S).
    """
    offset = 0
    for p, n in enumerate(sizes):
        add_lora(y[:, offset : offset + n], x, a[:, p], b[:, offset : offset + n], token_slot)
        offset += n


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: DenseLora | None,
    token_slot: torch.Tensor | None,
    sizes: tuple[int, ...],
    scales: RowScales | None = None,
) -> torch.Tensor:
    """A linear layer with its adapters: y = x @ weight^T + bias in x's dtype, then, for every token with
    a slot s = token_slot[t] in [0, S), the delta of `add_lora_parts` (one A per stacked part, `sizes` the
    parts' output sizes) added in y's dtype. No delta when lora or token_slot is None. With `scales` the
    weight is FP8, dequantised to x's dtype first (W8 times its rows' scales; the LoRA is not quantised).

    Shapes: x [T, in]; weight [out, in]; bias [out] or None; lora: `DenseLora` (a [S, P, R, in],
    b [S, out, R], rank [S, P]); token_slot [T] int. Kernels may add the delta before rounding the base
    product to x's dtype (one rounding instead of two); a token without a slot gets the base product
    only, whatever the other tokens' slots.
    """
    if scales is not None:
        weight = dequantize_rows(weight, scales.table, scales.group, x.dtype)
    y = F.linear(x, weight, bias)
    if lora is None or token_slot is None:
        return y
    if len(sizes) == 1:
        add_lora(y, x, lora.a[:, 0], lora.b, token_slot, lora.rank[:, 0])
    else:
        add_lora_parts(y, x, lora.a, lora.b, token_slot, sizes, lora.rank)
    return y


def norm_linear(
    x: torch.Tensor,
    norm: InputNorm,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: DenseLora | None,
    token_slot: torch.Tensor | None,
    sizes: tuple[int, ...],
    scales: RowScales | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RMSNorm before a layer, then the layer -> (y, s): h = `rms_norm` of x + residual (of x where
    `norm.residual` is None; then s is x itself), y = `linear(h, ...)`. Kernels may compute the norm's rstd
    in another order (an rstd's last bit, so h's rounding) where they fuse the two."""
    out = rms_norm(x, norm.weight, norm.eps, norm.residual, norm.weight_first)
    h, s = (out, x) if isinstance(out, torch.Tensor) else out
    return linear(h, weight, bias, lora, token_slot, sizes, scales), s


def fused_moe_lora(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    token_slot: torch.Tensor,
    lora: ExpertLora,
    extras: ExpertExtras | None = None,
    fp8_activations: bool = False,
) -> torch.Tensor:
    """Routed experts of one MoE layer with per-expert LoRA (the op contract of design.md); `extras`:
    GPT-OSS's biases and activation, FP8 weights' scales (see `ExpertExtras`: neither is part of the LoRA);
    `fp8_activations`: as `moe.fused_moe`'s (the LoRA takes x and h unquantised).

    Shapes: as `fused_moe`, plus token_slot [T] int and the slots' buffers `lora` (see `ExpertLora`:
    a_gu, b_gu, a_dn, b_dn below are its buffers; its ranks only tell kernels which lanes are padding).

    Semantics: for token t, choice j with e = local_ids[t, j] in [0, E_loc) (other ids contribute nothing),
    weight w = weights[t, j] and s = token_slot[t]:
        g = W_gate[e] x + (b_gu[s,e,0] a_gu[s,e,0] x  if s in [0, S))
        u = W_up[e] x   + (b_gu[s,e,1] a_gu[s,e,1] x  if s in [0, S))
        h = silu(g) * u
        d = W_down[e] h + (b_dn[s,e] a_dn[s,e] h      if s in [0, S))
        y[t] += w * d
    Sums are accumulated in fp32 (fp64 for fp64 inputs); y [T, H] has x's dtype.
    """
    num_tokens, hidden = x.shape
    w_gate_up, w_down = expert_weights(w_gate_up, w_down, extras, x.dtype, fp8_activations)
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    lora.check(num_experts, hidden, inter, num_tokens, token_slot)
    a_gu, b_gu, a_dn, b_dn = lora.a_gu, lora.b_gu, lora.a_dn, lora.b_dn
    num_slots, k = lora.num_slots, local_ids.shape[1]
    acc = acc_dtype(x.dtype)
    out = torch.zeros(num_tokens, hidden, dtype=acc, device=x.device)
    ids = local_ids.reshape(-1).long()
    pair_slot = token_slot.long().repeat_interleave(k)
    for e in range(num_experts):
        rows = (ids == e).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        tok = rows // k
        xe = x[tok]
        gate_up = F.linear(expert_inputs(xe, extras, fp8_activations, acc), w_gate_up[e].to(acc))
        slot = pair_slot[rows]
        for s in _slots(slot, num_slots):
            m = (slot == s).nonzero().squeeze(1)
            xs = xe[m].to(acc)
            for half in (0, 1):
                delta = (xs @ a_gu[s, e, half].to(acc).T) @ b_gu[s, e, half].to(acc).T
                gate_up[m, half * inter : (half + 1) * inter] += delta
        if extras is not None and extras.b_gate_up is not None:
            gate_up += extras.b_gate_up[e].to(acc)
        swiglu = extras.swiglu if extras is not None else None
        h = activation(gate_up[:, :inter], gate_up[:, inter:], swiglu).to(x.dtype)
        d = F.linear(expert_inputs(h, extras, fp8_activations, acc), w_down[e].to(acc))
        if extras is not None and extras.b_down is not None:
            d += extras.b_down[e].to(acc)
        for s in _slots(slot, num_slots):
            m = (slot == s).nonzero().squeeze(1)
            d[m] += (h[m].to(acc) @ a_dn[s, e].to(acc).T) @ b_dn[s, e].to(acc).T
        out.index_add_(0, tok, d * weights.reshape(-1)[rows, None].to(acc))
    return out.to(x.dtype)
