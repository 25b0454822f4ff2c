"""Rotary embedding of q and k in one launch, optionally after Qwen3's per-head q/k RMSNorm, and
optionally storing the step's keys (rotated) and values in the paged cache in the same launch.

One program per (token, block of heads): programs [0, q_blocks) take q's heads, the rest k's (and the
same heads of v, with a cache). The cos/sin row is loaded once per program; each head row is read once
and written once. Products and sums are rounded to the input dtype where the twin's tensor ops round, so
both give the same values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.cache_write import CacheWrite
from moelora.ops.plan import TUNED
from moelora.ops.triton.common import after_previous, dependent_launch
from moelora.ops.triton.kv_write import check_write_kv


@triton.jit
def _heads(
    x_ptr, o_ptr, w_ptr, c_ptr, t, h0, heads, half, eps, s_t, s_h, c1, c2, s1, s2, c_row, sc_h,
    HAS_NORM: tl.constexpr, TO_CACHE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Heads [h0, h0 + BLOCK_H) of token t: normed (HAS_NORM) and rotated into the contiguous output, and
    (TO_CACHE) into the cache row at c_row (-1: the token's slot lies outside the cache)."""
    h = h0 + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    ok = (h < heads)[:, None] & (i < half)[None, :]
    src = x_ptr + t * s_t + h[:, None] * s_h + i[None, :]
    x1 = tl.load(src, mask=ok, other=0.0)
    x2 = tl.load(src + half, mask=ok, other=0.0)
    dt = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / (2 * half) + eps)[:, None]
        w1 = tl.load(w_ptr + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + half + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
        f1 = (w1 * (f1 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        f2 = (w2 * (f2 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    out1 = (f1 * c1).to(dt).to(tl.float32) - (f2 * s1).to(dt).to(tl.float32)
    out2 = (f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)
    dst = o_ptr + t * heads * 2 * half + h[:, None] * 2 * half + i[None, :]
    tl.store(dst, out1.to(dt), mask=ok)
    tl.store(dst + half, out2.to(dt), mask=ok)
    if TO_CACHE:
        _store_row(c_ptr, c_row, h, i, half, sc_h, ok, out1.to(dt), out2.to(dt))


@triton.jit
def _store_row(c_ptr, c_row, h, i, half, sc_h, ok, x1, x2):
    """Both halves of heads h into the cache row at c_row (nothing when c_row < 0), in the cache's dtype."""
    ok = ok & (c_row >= 0)
    dst = c_ptr + c_row + h[:, None] * sc_h + i[None, :]
    tl.store(dst, x1.to(c_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + half, x2.to(c_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    hq, hkv, half, eps, q_blocks, cache_slots, page,
    sq_t, sq_h, sk_t, sk_h, sc_t, ss_t, sv_t, sv_h, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
    HAS_NORM: tl.constexpr, TO_CACHE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    after_previous(PDL)
    t = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < half
    c1 = tl.load(cos_ptr + t * sc_t + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * sc_t + half + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * ss_t + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * ss_t + half + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    if blk < q_blocks:
        _heads(
            q_ptr, qo_ptr, qw_ptr, qo_ptr, t, blk * BLOCK_H, hq, half, eps, sq_t, sq_h, c1, c2, s1, s2, 0, 0,
            HAS_NORM, False, BLOCK_H, BLOCK_HALF,
        )  # fmt: skip
    else:
        h0 = (blk - q_blocks) * BLOCK_H
        kc_row = -1
        vc_row = -1
        if TO_CACHE:
            # The token's cache rows, -1 for a slot outside the cache (never written, as `write_kv`).
            slot = tl.load(slot_ptr + t).to(tl.int64)
            inside = (slot >= 0) & (slot < cache_slots)
            kc_row = tl.where(inside, (slot // page) * skc_b + (slot % page) * skc_s, -1)
            vc_row = tl.where(inside, (slot // page) * svc_b + (slot % page) * svc_s, -1)
            h = h0 + tl.arange(0, BLOCK_H)
            ok = (h < hkv)[:, None] & i_ok[None, :]
            src = v_ptr + t * sv_t + h[:, None] * sv_h + i[None, :]
            _store_row(
                vc_ptr, vc_row, h, i, half, svc_h, ok, tl.load(src, mask=ok), tl.load(src + half, mask=ok)
            )
        _heads(
            k_ptr, ko_ptr, kw_ptr, kc_ptr, t, h0, hkv, half, eps, sk_t, sk_h, c1, c2, s1, s2, kc_row, skc_h,
            HAS_NORM, TO_CACHE, BLOCK_H, BLOCK_HALF,
        )  # fmt: skip


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: CacheWrite | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and Semantics as `moelora.ops.torch.rotary.rotary`."""
    return _launch(q, k, cos, sin, None, cache)


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
    """Same signature and Semantics as `moelora.ops.torch.rotary.qk_norm_rotary`."""
    d = q.shape[-1]
    if q_weight.shape != (d,) or k_weight.shape != (d,) or {q_weight.dtype, k_weight.dtype} != {q.dtype}:
        raise ValueError(
            f"qk_norm_rotary: q/k norm weights {tuple(q_weight.shape)} {q_weight.dtype}, "
            f"{tuple(k_weight.shape)} {k_weight.dtype} must be [{d}] in q's dtype {q.dtype}"
        )
    return _launch(q, k, cos, sin, (q_weight.contiguous(), k_weight.contiguous(), eps), cache)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    t, d = q.shape[0], q.shape[-1]
    shapes_ok = q.dim() == k.dim() == 3 and k.shape[0] == t and k.shape[2] == d and d % 2 == 0
    if not shapes_ok or cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(
            f"rotary: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)} "
            "must be [T, Hq, D], [T, Hkv, D], [T, D], [T, D] with D even (partial rotary is not supported)"
        )
    if q.dtype != k.dtype or cos.dtype != q.dtype or sin.dtype != q.dtype:
        raise ValueError(
            f"rotary: q, k, cos, sin in {q.dtype}, {k.dtype}, {cos.dtype}, {sin.dtype}: use one dtype"
        )
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("rotary: q, k, cos and sin need unit stride over the head dim")


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None,
    cache: CacheWrite | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, cos, sin)
    if cache is not None:
        check_write_kv(k, *cache)
    t, hq, d = q.shape
    hkv = k.shape[1]
    q_out = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)  # [T, Hq, D]
    k_out = torch.empty(t, hkv, d, dtype=k.dtype, device=k.device)  # [T, Hkv, D]
    block_half = triton.next_power_of_2(d // 2)
    block_h = min(triton.next_power_of_2(min(hq, hkv)), max(1, 1024 // block_half))
    q_blocks = triton.cdiv(hq, block_h)
    qw, kw, eps = norm if norm is not None else (q, k, 0.0)
    # Placeholders without a cache, never read (TO_CACHE is off).
    v, k_cache, v_cache, slots = cache if cache is not None else (k, k[None], k[None], q)
    slots = slots.contiguous()
    num_blocks, page = k_cache.shape[:2]
    pdl = dependent_launch(q.device, TUNED.pdl_for("rotary"))
    _rotary_kernel[(t, q_blocks + triton.cdiv(hkv, block_h))](
        q, k, q_out, k_out, qw, kw, cos, sin, v, k_cache, v_cache, slots,
        hq, hkv, d // 2, eps, q_blocks, num_blocks * page, page,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        v.stride(0), v.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        HAS_NORM=norm is not None, TO_CACHE=cache is not None, BLOCK_H=block_h, BLOCK_HALF=block_half,
        PDL=pdl, launch_pdl=pdl,
    )  # fmt: skip
    return q_out, k_out
