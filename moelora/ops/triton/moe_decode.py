"""Routed experts for a handful of (token, choice) pairs, without the alignment: per-pair GEMVs that stream
each pair's expert rows (the LoRA shrinks run inside the gate/up launch, the expands in the GEMVs'
epilogues), the weighted sum in the down launch. Used where pairs rarely share an expert
(`tiles.use_decode_path`)."""

from __future__ import annotations

import torch

from moelora.ops.expert_extras import ExpertExtras
from moelora.ops.expert_lora import ExpertLora
from moelora.ops.plan import TUNED, KernelPlan
from moelora.ops.triton.moe_decode_down import decode_down
from moelora.ops.triton.moe_decode_gate_up import decode_gate_up


def decode_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    lora: tuple[torch.Tensor, ExpertLora] | None,
    plan: KernelPlan = TUNED,
    extras: ExpertExtras | None = None,
) -> torch.Tensor:
    """`fused_moe` (lora None) or `fused_moe_lora` (lora = (token_slot, the slots)) for few pairs: two
    launches with or without LoRA, no alignment, every size from the shapes (CUDA-graph safe)."""
    tiles, down = plan.decode_tiles, plan.decode_down_tiles  # (K steps of at most a group with FP8)
    if lora is None:
        h, _ = decode_gate_up(x, w_gate_up, local_ids, None, tiles, extras, plan.pdl_for("gate_up"))
        return decode_down(h, w_down, local_ids, weights, None, down, extras, plan.pdl_for("down"))
    slot, lo = lora
    lora_gu = (slot, lo.a_gu, lo.b_gu, lo.a_dn, lo.rank)
    h, ha = decode_gate_up(x, w_gate_up, local_ids, lora_gu, tiles, extras, plan.pdl_for("gate_up"))
    assert ha is not None  # given LoRA, the gate/up launch returns the down shrink
    lora_dn = (slot, ha, lo.b_dn, lo.rank)
    return decode_down(h, w_down, local_ids, weights, lora_dn, down, extras, plan.pdl_for("down"))
