"""Routed experts in Triton, with and without per-expert LoRA: align -> gate/up -> down -> weighted sum.

The LoRA deltas are fused into the base grouped GEMMs' epilogues (the expand), after one small shrink
pass per projection over the alignment's (expert, slot) buckets, so the base weights are streamed once per
row block whatever the slots. Small batches split the shrinks' input over more programs, and the gate/up
GEMM writes the down shrink itself. A handful of pairs (decode) takes the alignment-free path of
`moe_decode`.
"""

from __future__ import annotations

import torch

from moelora.ops.expert_extras import ExpertExtras
from moelora.ops.expert_lora import ExpertLora
from moelora.ops.torch.fp8 import FP8
from moelora.ops.triton.align import moe_align, moe_align_buckets
from moelora.ops.triton.moe_decode import decode_moe
from moelora.ops.triton.moe_down import moe_down
from moelora.ops.triton.moe_expand import moe_lora_expand
from moelora.ops.triton.moe_gate_up import moe_gate_up
from moelora.ops.triton.moe_shrink import moe_lora_shrink
from moelora.ops.triton.moe_sum import moe_sum
from moelora.ops.triton.tiles import (
    TUNED,
    KernelPlan,
    down_expand_apart,
    down_shrink_in_gate_up,
    fp8_activations,
    moe_tiles,
    shrink_rows,
    shrink_splits,
    use_decode_path,
)


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    plan: KernelPlan = TUNED,
    extras: ExpertExtras | None = None,
) -> torch.Tensor:
    """Same signature and Semantics as `moelora.ops.torch.moe.fused_moe`; `plan`: the kernel choices."""
    _check(x, w_gate_up, w_down, local_ids, weights, extras)
    num_tokens, top_k = local_ids.shape
    num_experts = w_down.shape[0]
    if num_tokens == 0:
        return torch.zeros_like(x)
    if use_decode_path(num_tokens * top_k, num_experts, top_k, plan):
        return decode_moe(x, w_gate_up, w_down, local_ids, weights, None, plan, extras)
    w8a8 = fp8_activations(num_tokens * top_k, num_experts, _group(extras), x.dtype, plan)
    tiles = moe_tiles(num_tokens * top_k, num_experts, 0, plan, w8a8)
    sorted_pairs, block_expert = moe_align(local_ids, None, num_experts, 0, tiles.block_m, plan)
    rows = (sorted_pairs, block_expert)
    h, _ = moe_gate_up(x, w_gate_up, *rows, top_k, tiles, None, plan=plan, extras=extras, w8a8=w8a8)
    d = moe_down(h, w_down, *rows, num_tokens, top_k, tiles, None, plan, extras, w8a8)
    return moe_sum(d, local_ids, weights, num_experts, extras.b_down if extras is not None else None)


def fused_moe_lora(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    token_slot: torch.Tensor,
    lora: ExpertLora,
    plan: KernelPlan = TUNED,
    extras: ExpertExtras | None = None,
) -> torch.Tensor:
    """Same signature and Semantics as `moelora.ops.torch.lora.fused_moe_lora`; `plan`: the kernel
    choices."""
    _check(x, w_gate_up, w_down, local_ids, weights, extras)
    num_tokens, top_k = local_ids.shape
    num_experts, hidden, inter = w_down.shape
    lora.check(num_experts, hidden, inter, num_tokens, token_slot)
    if num_tokens == 0:
        return torch.zeros_like(x)
    num_slots, rank = lora.num_slots, lora.max_rank
    a_gu, b_gu, a_dn, b_dn, slot_rank = lora.a_gu, lora.b_gu, lora.a_dn, lora.b_dn, lora.rank
    slot = token_slot.contiguous()
    num_pairs = num_tokens * top_k
    if use_decode_path(num_pairs, num_experts, top_k, plan):
        return decode_moe(x, w_gate_up, w_down, local_ids, weights, (slot, lora), plan, extras)
    w8a8 = fp8_activations(num_pairs, num_experts, _group(extras), x.dtype, plan)
    tiles = moe_tiles(num_pairs, num_experts, num_slots, plan, w8a8)
    sorted_pairs, block_expert, start, count, busy = moe_align_buckets(
        local_ids, slot, num_experts, num_slots, tiles.block_m, plan
    )
    rows = (sorted_pairs, block_expert)
    step = shrink_rows(num_pairs, num_experts, num_slots, plan)
    buckets = (sorted_pairs, start, count, busy)
    splits = [shrink_splits(num_pairs, num_experts, num_slots, dim, plan) for dim in (hidden, inter)]
    xa = moe_lora_shrink(x, a_gu, *buckets, top_k, True, step, splits[0], slot_rank, plan)
    apart = down_expand_apart(tiles, num_pairs, num_experts, num_slots, rank, plan)
    # Small batches: the gate/up GEMM writes the down shrink too (in parts), else a shrink launch does.
    a_dn_in_gate_up = (
        a_dn if not apart and down_shrink_in_gate_up(num_pairs, num_experts, inter, tiles, plan) else None
    )
    lora_gu = (slot, xa, b_gu, slot_rank)
    h, ha = moe_gate_up(x, w_gate_up, *rows, top_k, tiles, lora_gu, a_dn_in_gate_up, plan, extras, w8a8)
    if ha is None:
        ha = moe_lora_shrink(h, a_dn, *buckets, top_k, False, step, splits[1], slot_rank, plan).squeeze(2)
    if apart:
        d = moe_down(h, w_down, *rows, num_tokens, top_k, tiles, None, plan, extras, w8a8)
        moe_lora_expand(d, ha, b_dn, *buckets, step, slot_rank, plan)
    else:
        lora_dn = (slot, ha, b_dn, slot_rank)
        d = moe_down(h, w_down, *rows, num_tokens, top_k, tiles, lora_dn, plan, extras, w8a8)
    return moe_sum(d, local_ids, weights, num_experts, extras.b_down if extras is not None else None)


def _group(extras: ExpertExtras | None) -> int:
    """The FP8 experts' scale group, 0 for weights in x's dtype."""
    return extras.scales.group if extras is not None and extras.scales is not None else 0


def _check(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    local_ids: torch.Tensor,
    w: torch.Tensor,
    extras: ExpertExtras | None,
) -> None:
    num_experts, hidden, inter = w_down.shape
    scales = extras.scales if extras is not None else None
    fp8 = (w_gate_up.dtype == FP8, w_down.dtype == FP8)
    if fp8 != (scales is not None,) * 2:
        raise ValueError(
            f"expert weights in {w_gate_up.dtype} and {w_down.dtype} with "
            f"{'no' if scales is None else ''} FP8 scales: both float8_e4m3fn with scales, or neither"
        )
    if scales is not None:
        for name, table, (n, k) in (
            ("gate_up", scales.gate_up, (2 * inter, hidden)),
            ("down", scales.down, (hidden, inter)),
        ):
            want = (num_experts, n, -(-k // scales.group))
            if tuple(table.shape) != want:
                raise ValueError(f"FP8 {name} scales have shape {tuple(table.shape)}, expected {want}")
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [T, {hidden}] (w_down is [E, H, I])")
    if tuple(w_gate_up.shape) != (num_experts, 2 * inter, hidden):
        raise ValueError(
            f"w_gate_up has shape {tuple(w_gate_up.shape)}, expected {(num_experts, 2 * inter, hidden)}"
        )
    if local_ids.dim() != 2 or local_ids.shape[0] != x.shape[0] or w.shape != local_ids.shape:
        raise ValueError(
            f"local_ids {tuple(local_ids.shape)} and weights {tuple(w.shape)} "
            f"must both be [T={x.shape[0]}, k]"
        )
