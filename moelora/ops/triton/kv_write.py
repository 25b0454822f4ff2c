"""This step's keys and values stored in the paged cache: one program per (token, chunk of its K/V row)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, cache_slots, page, width, d,
    sk_t, sk_h, sv_t, sv_h, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
    BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    # A slot outside the cache is never written (no out-of-bounds store); callers pass valid slots.
    ok = (n < width) & (slot >= 0) & (slot < cache_slots)  # KV-cache slots, not adapter slots
    h, i = n // d, n % d
    blk, off = slot // page, slot % page
    k = tl.load(k_ptr + t * sk_t + h * sk_h + i, mask=ok)
    v = tl.load(v_ptr + t * sv_t + h * sv_h + i, mask=ok)
    tl.store(kc_ptr + blk * skc_b + off * skc_s + h * skc_h + i, k.to(kc_ptr.dtype.element_ty), mask=ok)
    tl.store(vc_ptr + blk * svc_b + off * svc_s + h * svc_h + i, v.to(vc_ptr.dtype.element_ty), mask=ok)


def check_write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """The shapes and strides `write_kv` (and the rotary launch that writes the cache) take."""
    shapes_ok = (
        k.dim() == 3
        and v.shape == k.shape
        and k_cache.dim() == 4
        and v_cache.shape == k_cache.shape
        and k_cache.shape[2:] == k.shape[1:]
        and slot_mapping.shape == k.shape[:1]
    )
    if not shapes_ok:
        raise ValueError(
            f"write_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, caches {tuple(k_cache.shape)} and "
            f"{tuple(v_cache.shape)}, slot_mapping {tuple(slot_mapping.shape)} must be [T, Hkv, D] twice, "
            "[num_blocks, block_size, Hkv, D] twice and [T]"
        )
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("write_kv: k, v and the caches need unit stride over the head dim")


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Same signature and Semantics as `moelora.ops.torch.attention.write_kv`."""
    check_write_kv(k, v, k_cache, v_cache, slot_mapping)
    t, hkv, d = k.shape
    num_blocks, page = k_cache.shape[:2]
    width = hkv * d
    block = min(2048, triton.next_power_of_2(width))
    _write_kv_kernel[(t, triton.cdiv(width, block))](
        k, v, k_cache, v_cache, slot_mapping.contiguous(), num_blocks * page, page, width, d,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        BLOCK=block,
    )  # fmt: skip
