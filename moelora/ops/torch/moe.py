"""PyTorch twin of the routed-expert MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelora.ops.expert_extras import ExpertExtras, activation
from moelora.ops.torch import acc_dtype
from moelora.ops.torch.fp8 import expert_inputs, expert_weights


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    extras: ExpertExtras | None = None,
    fp8_activations: bool = False,
) -> torch.Tensor:
    """Routed experts of one MoE layer on this rank (`extras`: GPT-OSS's biases and activation, and the
    scales of FP8 weights, see `ExpertExtras`; `fp8_activations`: FP8 weights multiply x and h quantised
    per row and scale group, as the W8A8 kernels do, `ops.triton.tiles.fp8_activations`).

    Shapes: T tokens, k choices, H hidden, E_loc local experts, I_loc this rank's intermediate size.
    x [T, H]; w_gate_up [E_loc, 2 * I_loc, H] (rows :I_loc gate, I_loc: up); w_down [E_loc, H, I_loc];
    local_ids [T, k] int (local expert ids); weights [T, k] (router weights, any float dtype).

    Semantics: for token t and choice j with e = local_ids[t, j] in [0, E_loc) (any other id, -1 for
    experts of other ranks included, contributes nothing):
        g, u = split(w_gate_up[e] @ x[t]);  h = silu(g) * u;  d = w_down[e] @ h
        y[t] += weights[t, j] * d
    The sum is accumulated in fp32 (fp64 for fp64 inputs); y [T, H] has x's dtype. FP8 weights
    (float8_e4m3fn, `extras.scales`) enter as W8 * scale per row and column group, rounded to x's dtype;
    with `fp8_activations` both factors enter as X8 * scale and W8 * scale in fp32, unrounded.
    """
    w_gate_up, w_down = expert_weights(w_gate_up, w_down, extras, x.dtype, fp8_activations)
    num_tokens, hidden = x.shape
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    acc = acc_dtype(x.dtype)
    out = torch.zeros(num_tokens, hidden, dtype=acc, device=x.device)
    ids = local_ids.reshape(-1).long()
    valid = (ids >= 0) & (ids < num_experts)
    pair = valid.nonzero().squeeze(1)  # (token, choice) pairs that run here
    if pair.numel() == 0:
        return out.to(x.dtype)
    sorted_ids, order = ids[pair].sort(stable=True)
    pair = pair[order]
    counts = torch.bincount(sorted_ids, minlength=num_experts).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = pair[start : start + n]
        start += n
        tok = rows // local_ids.shape[1]
        # The same rounding steps as the MoE-LoRA twin's rows without an adapter (and the kernels'):
        # gate/up's products summed, silu * up taken in the accumulation dtype (gate/up not rounded to x's
        # dtype first: with W8A8 an h one ulp off can flip its row's FP8 rounding), h rounded once to x's
        # dtype, d weighted in the accumulation dtype too.
        gate_up = F.linear(expert_inputs(x[tok], extras, fp8_activations, acc), w_gate_up[e].to(acc))
        if extras is not None and extras.b_gate_up is not None:
            gate_up += extras.b_gate_up[e].to(acc)
        swiglu = extras.swiglu if extras is not None else None
        h = activation(gate_up[:, :inter], gate_up[:, inter:], swiglu).to(x.dtype)
        d = F.linear(expert_inputs(h, extras, fp8_activations, acc), w_down[e].to(acc))
        if extras is not None and extras.b_down is not None:
            d += extras.b_down[e].to(acc)
        out.index_add_(0, tok, d * weights.reshape(-1)[rows, None].to(acc))
    return out.to(x.dtype)
