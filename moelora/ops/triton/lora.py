"""Dense multi-LoRA in Triton: shrink then expand, each token block one pass per distinct slot."""

from __future__ import annotations

import torch

from moelora.ops.triton.lora_expand import lora_expand
from moelora.ops.triton.lora_shrink import lora_shrink
from moelora.ops.triton.tiles import lora_tiles


def add_lora(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slot: torch.Tensor
) -> None:
    """Same signature and Semantics as `moelora.ops.torch.lora.add_lora`."""
    num_tokens, in_dim = x.shape
    num_slots, rank = a.shape[0], a.shape[1]
    if tuple(a.shape) != (num_slots, rank, in_dim) or tuple(b.shape) != (num_slots, y.shape[1], rank):
        raise ValueError(
            f"add_lora: a {tuple(a.shape)} must be [S, R, in={in_dim}] and b {tuple(b.shape)} "
            f"[S, out={y.shape[1]}, R]"
        )
    if y.shape[0] != num_tokens or token_slot.shape != (num_tokens,):
        raise ValueError(
            f"add_lora: y {tuple(y.shape)} and token_slot {tuple(token_slot.shape)} need T={num_tokens}"
        )
    if num_tokens == 0:
        return
    tiles = lora_tiles(num_tokens)
    slot = token_slot.contiguous()
    xa = lora_shrink(x, a, slot, tiles)
    lora_expand(y, xa, b, slot, tiles)
