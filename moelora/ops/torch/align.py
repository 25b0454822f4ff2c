"""PyTorch twin of the token alignment: (token, choice) pairs grouped by local expert, sorted by slot."""

from __future__ import annotations

import torch


def align_sizes(num_pairs: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """Worst-case (rows, blocks) of an alignment, from shapes alone (CUDA graphs need fixed sizes).

    Each non-empty expert adds less than one block of padding, and at most min(E, P) experts are non-empty.
    """
    blocks = -(-num_pairs // block_m) + min(num_experts, num_pairs)
    return blocks * block_m, blocks


def moe_align(
    local_ids: torch.Tensor,
    token_slot: torch.Tensor | None,
    num_experts: int,
    num_slots: int,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the (token, choice) pairs by local expert, padded to `block_m` rows per expert.

    Shapes: T tokens, k choices, P = T * k pairs; local_ids [T, k] int; token_slot [T] int or None.
    Returns sorted_pairs [rows] int32 and block_expert [blocks] int32, sized by `align_sizes`.

    Semantics: pair p = t * k + j runs iff e = local_ids[t, j] is in [0, E) (other ids, -1 included, are
    dropped). Expert e's pairs form one segment, ordered by slot class c = token_slot[t] if that is in
    [0, S) else S (base tokens and invalid slots last; all pairs are class S without token_slot), padded
    with the sentinel P to a multiple of block_m. Segments follow each other in expert order from row 0;
    block_expert[b] is the expert of rows [b * block_m, (b + 1) * block_m), -1 past the last segment; the
    rows past it hold P. The order of pairs of one (expert, class) is not part of the contract (ascending
    here). Experts without pairs take no rows, so padding never exceeds one block per expert.
    """
    num_tokens, top_k = local_ids.shape
    num_pairs = num_tokens * top_k
    rows, blocks = align_sizes(num_pairs, num_experts, block_m)
    ids = local_ids.reshape(-1).long()
    cls = torch.full((num_pairs,), num_slots, dtype=torch.long, device=ids.device)
    if token_slot is not None:
        slot = token_slot.long().repeat_interleave(top_k)
        cls = torch.where((slot >= 0) & (slot < num_slots), slot, cls)
    sorted_pairs = torch.full((rows,), num_pairs, dtype=torch.int32, device=ids.device)
    block_expert = torch.full((blocks,), -1, dtype=torch.int32, device=ids.device)
    row = 0
    for e in range(num_experts):
        pairs = (ids == e).nonzero().squeeze(1)
        if pairs.numel() == 0:
            continue
        pairs = pairs[cls[pairs].argsort(stable=True)]
        sorted_pairs[row : row + pairs.numel()] = pairs.to(torch.int32)
        n_blocks = -(-pairs.numel() // block_m)
        block_expert[row // block_m : row // block_m + n_blocks] = e
        row += n_blocks * block_m
    return sorted_pairs, block_expert
