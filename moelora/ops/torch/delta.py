"""PyTorch twins of a linear-attention layer's two token mixers (Qwen3-Next, Qwen3.5-MoE's Gated DeltaNet):
the short depthwise causal convolution and the gated delta rule, each over whole sequences (prefill,
from a given state) and as a one-token step that updates a sequence's state in its slot of a state cache
(decode). Transformers' torch code is the definition; these are the same math over a flattened batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelora.ops.torch import acc_dtype


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, seq_lens: tuple[int, ...], initial: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution with SiLU over whole sequences -> (y [T, C] in x's dtype, states
    [B, C, K - 1] in x's dtype).

    x [T, C] (seq_lens[b] tokens of sequence b, back to back); weight [C, K]; initial [B, C, K - 1] or
    None (zeros): the inputs before each sequence's first token, oldest first.
    Semantics: with u the sequence's inputs preceded by its initial state,
        y[t, c] = silu(sum_j weight[c, j] * u[t + j, c])   (fp32, fp64 for fp64 x; rounded once)
    and the returned state is the last K - 1 entries of u (its newest inputs).
    """
    num_channels, width = weight.shape
    acc = acc_dtype(x.dtype)
    out = torch.empty_like(x)
    states = x.new_zeros(len(seq_lens), num_channels, width - 1)
    start = 0
    for b, n in enumerate(seq_lens):
        before = initial[b] if initial is not None else x.new_zeros(num_channels, width - 1)
        u = torch.cat((before.to(acc), x[start : start + n].T.to(acc)), dim=1)  # [C, K - 1 + n]
        y = F.conv1d(u[None], weight.to(acc)[:, None, :], groups=num_channels)[0]  # [C, n]
        out[start : start + n] = F.silu(y).T.to(x.dtype)
        states[b] = u[:, u.shape[1] - (width - 1) :].to(x.dtype)
        start += n
    return out, states


def causal_conv_step(
    x: torch.Tensor, weight: torch.Tensor, states: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """One token of each sequence through the convolution -> y [B, C] in x's dtype; each sequence's state
    moves on by the token, in place.

    x [B, C]; weight [C, K]; states [S, C, K - 1] (the state cache); slots [B] int: each sequence's
    slot. Semantics: those of `causal_conv` with seq_lens all 1 and initial = states[slots]. A slot
    outside [0, S) (a padding row) reads zeros and writes nothing.
    """
    num_slots, acc = states.shape[0], acc_dtype(x.dtype)
    ok = (slots >= 0) & (slots < num_slots)
    index = torch.where(ok, slots, 0).long()
    before = torch.where(ok[:, None, None], states[index].to(acc), 0.0)
    u = torch.cat((before, x.to(acc)[:, :, None]), dim=2)  # [B, C, K]
    y = F.silu((u * weight.to(acc)[None]).sum(-1)).to(x.dtype)
    keep = ok.nonzero().squeeze(1)
    states[index[keep]] = u[keep, :, 1:].to(states.dtype)
    return y


def _prepare(q: torch.Tensor, k: torch.Tensor, v_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k in fp32, L2-normalised (eps 1e-6 inside the root), q scaled by Dk^-0.5, and their heads
    repeated so that value head h reads key head h // (Hv / Hk)."""
    q, k = q.float(), k.float()
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) / q.shape[-1] ** 0.5
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    group = v_heads // k.shape[-2]
    return q.repeat_interleave(group, dim=-2), k.repeat_interleave(group, dim=-2)


def _update(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the gated delta rule for rows of heads, all fp32: state [..., Dk, Dv], q and k
    [..., Dk] (prepared), v [..., Dv], g and beta [...] -> (output [..., Dv], new state)."""
    state = state * g.exp()[..., None, None]
    predicted = (state * k[..., :, None]).sum(-2)
    state = state + k[..., :, None] * ((v - predicted) * beta[..., None])[..., None, :]
    return (state * q[..., :, None]).sum(-2), state


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    seq_lens: tuple[int, ...],
    initial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over whole sequences -> (o [T, Hv, Dv] in v's dtype, final states [B, Hv, Dk,
    Dv] fp32).

    q, k [T, Hk, Dk]; v [T, Hv, Dv] (Hk divides Hv); g [T, Hv] (log decay, <= 0) and beta [T, Hv];
    seq_lens[b] tokens of sequence b back to back; initial [B, Hv, Dk, Dv] or None (zeros).
    Semantics (fp32): q and k L2-normalised, q scaled by Dk^-0.5, value head h reading key head
    h // (Hv / Hk); then for each token, with S the sequence's state:
        S = exp(g) S;  S = S + k (beta (v - S^T k))^T;  o = S^T q
    """
    qf, kf = _prepare(q, k, v.shape[1])
    vf, gf, bf = v.float(), g.float(), beta.float()
    heads, dk, dv = v.shape[1], k.shape[2], v.shape[2]
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    finals = torch.empty(len(seq_lens), heads, dk, dv, dtype=torch.float32, device=v.device)
    start = 0
    for b, n in enumerate(seq_lens):
        state = initial[b].float() if initial is not None else v.new_zeros(heads, dk, dv, dtype=torch.float32)
        for t in range(start, start + n):
            o, state = _update(state, qf[t], kf[t], vf[t], gf[t], bf[t])
            out[t] = o.to(v.dtype)
        finals[b] = state
        start += n
    return out, finals


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """One token of each sequence through the gated delta rule -> o [B, Hv, Dv] in v's dtype; each
    sequence's state moves on by the token, in place.

    q, k [B, Hk, Dk]; v [B, Hv, Dv]; g, beta [B, Hv]; states [S, Hv, Dk, Dv] fp32 (the state cache);
    slots [B] int. Semantics: those of `gated_delta_rule` with seq_lens all 1 and initial =
    states[slots]. A slot outside [0, S) (a padding row) starts from zeros and writes nothing.
    """
    num_slots = states.shape[0]
    ok = (slots >= 0) & (slots < num_slots)
    index = torch.where(ok, slots, 0).long()
    qf, kf = _prepare(q, k, v.shape[1])
    before = torch.where(ok[:, None, None, None], states[index], 0.0)
    o, after = _update(before, qf, kf, v.float(), g.float(), beta.float())
    keep = ok.nonzero().squeeze(1)
    states[index[keep]] = after[keep]
    return o.to(v.dtype)


def delta_gates(
    a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule's per-token, per-head gates from the projections a, b [T, H] (transformers'
    Qwen3NextGatedDeltaNet): g = -exp(A_log) * softplus(a + dt_bias) in fp32 [T, H] (the log decay), and
    beta = sigmoid(b) in b's dtype [T, H] (the write strength). a_log, dt_bias [H]."""
    beta = b.sigmoid()
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias)
    return g, beta
