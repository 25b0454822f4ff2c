"""Dense multi-LoRA in Triton: shrink then expand, each token block one pass per distinct slot. A layer
with stacked output parts (q/k/v) runs one shrink over its stacked A (x read once) and one expand for all
parts (one per part where a column tile would cross a part boundary)."""

from __future__ import annotations

import torch
import triton

from moelora.ops.triton.lora_expand import lora_expand
from moelora.ops.triton.lora_shrink import lora_shrink
from moelora.ops.triton.tiles import TUNED, KernelPlan, lora_tiles


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    token_slot: torch.Tensor,
    slot_rank: torch.Tensor | None = None,
    plan: KernelPlan = TUNED,
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
    tiles = lora_tiles(num_tokens, plan)
    slot = token_slot.contiguous()
    xa = lora_shrink(x, a, slot, tiles, None if slot_rank is None else slot_rank[:, None])
    lora_expand(y, xa, b, slot, tiles, slot_rank, plan)


_MAX_STACKED_RANK = 128  # lanes of one shrink; wider stacks shrink part by part


def stacked_shrink(parts: int, rank: int) -> bool:
    """Whether `add_lora_parts` shrinks the stacked parts' lanes together (one xa for all of them)."""
    return triton.next_power_of_2(parts * rank) <= _MAX_STACKED_RANK


def add_lora_parts(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    token_slot: torch.Tensor,
    sizes: tuple[int, ...],
    slot_rank: torch.Tensor | None = None,
    plan: KernelPlan = TUNED,
    xa: torch.Tensor | None = None,
) -> None:
    """Same signature and Semantics as `moelora.ops.torch.lora.add_lora_parts`; xa: the shrink computed
    before ([chunks, T, P * R] fp32 partial sums, where `stacked_shrink`: `norm.add_norm_shrink`'s, or
    for one part the decode attention's, `ops.decode_o_shrink`), in place of `lora_shrink`'s."""
    num_tokens, in_dim = x.shape
    num_slots, parts, rank = a.shape[0], a.shape[1], a.shape[2]
    out = sum(sizes)
    if tuple(a.shape) != (num_slots, len(sizes), rank, in_dim) or tuple(b.shape) != (num_slots, out, rank):
        raise ValueError(
            f"add_lora_parts: a {tuple(a.shape)} must be [S, P={len(sizes)}, R, in={in_dim}] and b "
            f"{tuple(b.shape)} [S, out={out}, R]"
        )
    if tuple(y.shape) != (num_tokens, out) or token_slot.shape != (num_tokens,):
        raise ValueError(
            f"add_lora_parts: y {tuple(y.shape)} must be [T={num_tokens}, {out}], token_slot "
            f"{tuple(token_slot.shape)} [T]"
        )
    if num_tokens == 0:
        return
    if not stacked_shrink(parts, rank):
        if xa is not None:
            raise ValueError(f"add_lora_parts: a given shrink (xa) for {parts} parts of rank {rank}")
        offset = 0
        for p, n in enumerate(sizes):
            part_rank = None if slot_rank is None else slot_rank[:, p]
            b_part = b[:, offset : offset + n]
            add_lora(y[:, offset : offset + n], x, a[:, p], b_part, token_slot, part_rank, plan)
            offset += n
        return
    tiles = lora_tiles(num_tokens, plan)
    slot = token_slot.contiguous()
    if xa is None:
        xa = lora_shrink(x, a.reshape(num_slots, parts * rank, in_dim), slot, tiles, slot_rank)
    elif xa.shape[1:] != (num_tokens, parts * rank) or xa.dtype != torch.float32:
        raise ValueError(f"add_lora_parts: xa {tuple(xa.shape)} {xa.dtype} must be [chunks, T, P * R] fp32")
    if len(sizes) <= 4 and all(n % tiles.expand_n == 0 for n in sizes[:-1]):
        lora_expand(y, xa, b, slot, tiles, slot_rank, plan, sizes)  # every part in one launch
        return
    offset = 0
    for p, n in enumerate(sizes):
        part_xa = xa[:, :, p * rank : (p + 1) * rank]
        part_rank = None if slot_rank is None else slot_rank[:, p]
        b_part = b[:, offset : offset + n]
        lora_expand(y[:, offset : offset + n], part_xa, b_part, slot, tiles, part_rank, plan)
        offset += n
