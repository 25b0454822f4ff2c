"""Compute ops with one signature each; the backend is chosen here and nowhere else.

Every op has a PyTorch implementation in `ops/torch/` (the CPU path and the test oracle); GPU kernels in
`ops/triton/` share the signature. Model code calls these functions and never imports Triton.
"""

from __future__ import annotations

import torch

from moelora.ops.torch import attention as _torch_attention
from moelora.ops.torch import lora as _torch_lora
from moelora.ops.torch import moe as _torch_moe


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Routed-expert MLP; see `moelora.ops.torch.moe.fused_moe` for the exact semantics."""
    return _torch_moe.fused_moe(x, w_gate_up, w_down, local_ids, weights)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: tuple[int, ...],
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Causal attention within each sequence; see `moelora.ops.torch.attention.prefill_attention`."""
    return _torch_attention.prefill_attention(q, k, v, seq_lens, scale, window)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values in the paged cache; see `moelora.ops.torch.attention.write_kv`."""
    _torch_attention.write_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: tuple[int, ...],
    kv_lens: tuple[int, ...],
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Attention over the paged cache; see `moelora.ops.torch.attention.paged_attention`."""
    return _torch_attention.paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens, kv_lens, scale, window
    )


def add_lora(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slot: torch.Tensor
) -> None:
    """Dense multi-LoRA added in place; see `moelora.ops.torch.lora.add_lora`."""
    _torch_lora.add_lora(y, x, a, b, token_slot)


def fused_moe_lora(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    token_slot: torch.Tensor,
    a_gu: torch.Tensor,
    b_gu: torch.Tensor,
    a_dn: torch.Tensor,
    b_dn: torch.Tensor,
) -> torch.Tensor:
    """Routed experts with per-expert LoRA; see `moelora.ops.torch.lora.fused_moe_lora`."""
    return _torch_lora.fused_moe_lora(
        x, w_gate_up, w_down, local_ids, weights, token_slot, a_gu, b_gu, a_dn, b_dn
    )
