"""Routed experts: this rank's share of the expert weights and the global->local id rewrite."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moelora import ops
from moelora.layers.spec import Form, Piece, WeightSpec
from moelora.ops.expert_lora import ExpertLora
from moelora.parallel.sharding import ExpertPlacement, place_experts, shard_range
from moelora.parallel.state import ParallelState


@dataclass(frozen=True)
class ExpertNames:
    """Checkpoint names of one expert's projections (Mixtral: w1, w3, w2)."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class ExpertsTarget:
    """A layer's routed experts as a LoRA target (per-expert adapter buffers, `ExpertLora`)."""

    layer: int
    module: FusedMoE


class FusedMoE(nn.Module):
    """This rank's experts: E_loc = its placement's count, I_loc = I / moe_tp_size.

    w_gate_up [E_loc, 2 * I_loc, H] (rows :I_loc this rank's gate rows, I_loc: its up rows);
    w_down [E_loc, H, I_loc]; expert_map [E] int32, global -> local id, -1 for experts owned elsewhere.
    forward returns this rank's partial sum; the caller all-reduces.
    """

    def __init__(self, num_experts: int, hidden: int, inter: int, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.placement: ExpertPlacement = place_experts(num_experts, ps.ep_size, ps.ep_rank)
        self.hidden, self.inter = hidden, inter
        self.cols = shard_range(inter, ps.moe_tp_size, ps.moe_tp_rank, "expert intermediate size")
        inter_loc = self.cols.stop - self.cols.start
        e_loc = self.placement.count
        self.w_gate_up = nn.Parameter(
            torch.empty(e_loc, 2 * inter_loc, hidden, dtype=dtype), requires_grad=False
        )
        self.w_down = nn.Parameter(torch.empty(e_loc, hidden, inter_loc, dtype=dtype), requires_grad=False)
        self.expert_map: torch.Tensor
        self.register_buffer("expert_map", self.placement.expert_map(), persistent=False)
        self.lora: ExpertLora | None = None

    def forward(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        global_ids: torch.Tensor,
        token_slot: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The one place ids change convention: global -> local, -1 for experts of other ranks. A rank that
        # owns every expert has the identity map: no gather launch (the router's ids are int32 already).
        if self.placement.count == self.placement.num_experts:
            local_ids = global_ids.to(torch.int32)
        else:
            local_ids = self.expert_map[global_ids]
        if self.lora is None or token_slot is None:
            return ops.fused_moe(x, self.w_gate_up, self.w_down, local_ids, weights)
        return ops.fused_moe_lora(x, self.w_gate_up, self.w_down, local_ids, weights, token_slot, self.lora)

    def weight_specs(self, prefix: str, names: ExpertNames) -> list[WeightSpec]:
        """Per-expert keys `<prefix>.{e}.<name>.weight` or fused `<prefix>.gate_up_proj` / `.down_proj`."""
        return [self._gate_up_spec(prefix, names), self._down_spec(prefix, names)]

    def _gate_up_spec(self, prefix: str, names: ExpertNames) -> WeightSpec:
        n_loc = self.cols.stop - self.cols.start
        rows, full = self.cols, (self.inter, self.hidden)
        per_expert: list[Piece] = []
        for e, g in enumerate(self.placement.global_ids()):
            per_expert.append(Piece(f"{prefix}.{g}.{names.gate}.weight", full, (rows,), (e, slice(0, n_loc))))
            per_expert.append(
                Piece(f"{prefix}.{g}.{names.up}.weight", full, (rows,), (e, slice(n_loc, None)))
            )
        experts = self._expert_slice()
        fused_key, fused_shape = (
            f"{prefix}.gate_up_proj",
            (self.placement.num_experts, 2 * self.inter, self.hidden),
        )
        up_rows = slice(self.inter + rows.start, self.inter + rows.stop)
        fused = (
            Piece(fused_key, fused_shape, (experts, rows), (slice(None), slice(0, n_loc))),
            Piece(fused_key, fused_shape, (experts, up_rows), (slice(None), slice(n_loc, None))),
        )
        every = {
            f"{prefix}.{g}.{n}.weight"
            for g in range(self.placement.num_experts)
            for n in (names.gate, names.up)
        }
        return WeightSpec(
            self.w_gate_up, (Form("per-expert", tuple(per_expert), frozenset(every)), Form("fused", fused))
        )

    def _down_spec(self, prefix: str, names: ExpertNames) -> WeightSpec:
        full = (self.hidden, self.inter)
        per_expert = tuple(
            Piece(f"{prefix}.{g}.{names.down}.weight", full, (slice(None), self.cols), (e,))
            for e, g in enumerate(self.placement.global_ids())
        )
        fused_shape = (self.placement.num_experts, self.hidden, self.inter)
        fused = (Piece(f"{prefix}.down_proj", fused_shape, (self._expert_slice(), slice(None), self.cols)),)
        every = {f"{prefix}.{g}.{names.down}.weight" for g in range(self.placement.num_experts)}
        return WeightSpec(
            self.w_down, (Form("per-expert", per_expert, frozenset(every)), Form("fused", fused))
        )

    def _expert_slice(self) -> slice:
        return slice(self.placement.first, self.placement.first + self.placement.count)
