"""PyTorch twin of causal prefill attention over a flattened batch of sequences."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: tuple[int, ...],
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention, each sequence attending only to itself.

    Shapes: T tokens (sequences back to back, lengths `seq_lens`), Hq query heads, Hkv key/value heads
    (Hq % Hkv == 0, query head h reads kv head h // (Hq / Hkv)), D head dim.
    q [T, Hq, D], k and v [T, Hkv, D] -> o [T, Hq, D].

    Semantics: for a query at position i of its sequence and key j of the same sequence,
    score = scale * q.k if j <= i and (window is None or i - j < window), else masked;
    o = softmax(score) @ v, softmax in fp32.
    """
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    start = 0
    for n in seq_lens:
        sl = slice(start, start + n)
        start += n
        qs = q[sl].transpose(0, 1).float()  # [Hq, n, D]
        ks = k[sl].transpose(0, 1).float().repeat_interleave(group, dim=0)
        vs = v[sl].transpose(0, 1).float().repeat_interleave(group, dim=0)
        i = torch.arange(n, device=q.device)
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed &= (i[:, None] - i[None, :]) < window
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)
        out[sl] = o.transpose(0, 1).to(q.dtype)
    return out
