"""PyTorch twins of rotary embedding on q and k (Hugging Face's rotate-half), and of Qwen3's per-head
q/k RMSNorm followed by it."""

from __future__ import annotations

import torch

from moelora.ops.cache_write import CacheWrite
from moelora.ops.torch.attention import write_kv
from moelora.ops.torch.norm import rms_norm


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: CacheWrite | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D], cos and sin [T, D] (D even, in q's dtype) -> rotated q, k.

    Semantics, for each head row x [D] of token t, halves x1 = x[:D/2], x2 = x[D/2:]:
    out = x * cos[t] + cat(-x2, x1) * sin[t], every product and the sum rounded to x's dtype.
    With `cache`: then `write_kv(rotated k, cache.v, cache.k_cache, cache.v_cache, cache.slot_mapping)`.
    """
    q_out, k_out = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if cache is not None:
        write_kv(k_out, *cache)
    return q_out, k_out


def qk_norm_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: CacheWrite | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (weights [D]; see `moelora.ops.torch.norm.rms_norm`), then `rotary`.

    Shapes as `rotary`. Semantics: rotary(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos, sin,
    cache).
    """
    return rotary(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos, sin, cache)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
