"""Routed experts: this rank's share of the expert weights and the global->local id rewrite."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moelora import ops
from moelora.layers.spec import Form, Piece, WeightSpec
from moelora.ops.expert_extras import ExpertScales
from moelora.ops.expert_lora import ExpertLora
from moelora.ops.fp8 import Fp8Weights
from moelora.ops.torch.fp8 import FP8
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

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        inter: int,
        ps: ParallelState,
        dtype: torch.dtype,
        bias: bool = False,
        swiglu: tuple[float, float] | None = None,
        fp8: Fp8Weights | None = None,
    ):
        """`bias`: the experts' gate/up and down biases (GPT-OSS); `swiglu`: (limit, alpha) of GPT-OSS's
        clamped SwiGLU instead of silu(gate) * up; `fp8`: the weights in FP8 with their scales (where the
        layout allows: `fp8_skipped` says why not)."""
        super().__init__()
        self.placement: ExpertPlacement = place_experts(num_experts, ps.ep_size, ps.ep_rank)
        self.hidden, self.inter = hidden, inter
        self.cols = shard_range(inter, ps.moe_tp_size, ps.moe_tp_rank, "expert intermediate size")
        inter_loc = self.cols.stop - self.cols.start
        e_loc = self.placement.count
        self.scales: ExpertScales | None = None  # FP8 weights' (`fp8`)
        self.fp8_skipped: str | None = None
        group, weight_dtype = self._fp8_group(fp8), dtype
        if group:
            weight_dtype = FP8
            fp32 = torch.float32
            s_gate_up = torch.empty(e_loc, 2 * inter_loc, -(-hidden // group), dtype=fp32)
            self.s_gate_up = nn.Parameter(s_gate_up, requires_grad=False)
            self.s_down = nn.Parameter(
                torch.empty(e_loc, hidden, -(-inter_loc // group), dtype=fp32), requires_grad=False
            )
            self.scales = ExpertScales(self.s_gate_up, self.s_down, group)
        self.w_gate_up = nn.Parameter(
            torch.empty(e_loc, 2 * inter_loc, hidden, dtype=weight_dtype), requires_grad=False
        )
        self.w_down = nn.Parameter(
            torch.empty(e_loc, hidden, inter_loc, dtype=weight_dtype), requires_grad=False
        )
        self.b_gate_up: nn.Parameter | None = None
        self.b_down: nn.Parameter | None = None
        if bias:
            self.b_gate_up = nn.Parameter(torch.empty(e_loc, 2 * inter_loc, dtype=dtype), requires_grad=False)
            self.b_down = nn.Parameter(torch.empty(e_loc, hidden, dtype=dtype), requires_grad=False)
        # The down bias is added once per (token, expert): by the rank holding the intermediate's first
        # slice (the ranks' partial sums are added up after).
        self.adds_down_bias = ps.moe_tp_rank == 0
        self.swiglu = swiglu
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
        extra = self.extras()
        if self.lora is None or token_slot is None:
            return ops.fused_moe(x, self.w_gate_up, self.w_down, local_ids, weights, extras=extra)
        return ops.fused_moe_lora(
            x, self.w_gate_up, self.w_down, local_ids, weights, token_slot, self.lora, extras=extra
        )

    def extras(self) -> ops.ExpertExtras | None:
        """GPT-OSS's expert biases and activation and FP8 weights' scales; None for plain bf16 experts."""
        if self.b_gate_up is None and self.swiglu is None and self.scales is None:
            return None
        b_down = self.b_down if self.adds_down_bias else None
        return ops.ExpertExtras(self.b_gate_up, b_down, self.swiglu, self.scales)

    def _fp8_group(self, plan: Fp8Weights | None) -> int:
        """The scale group of FP8 weights; 0 for weights in the model's dtype (no `plan`, experts it leaves
        out, or a layout that cuts the checkpoint's scale blocks too finely: an error if strict, else
        `fp8_skipped` says why)."""
        if plan is None or not plan.experts:
            return 0
        group, self.fp8_skipped = plan.group(self.cols, self.inter, "the routed experts")
        return group

    def weight_specs(self, prefix: str, names: ExpertNames, in_major: bool = False) -> list[WeightSpec]:
        """Per-expert keys `<prefix>.{e}.<name>.weight` or fused `<prefix>.gate_up_proj` / `.down_proj`;
        `in_major`: GPT-OSS's fused layout (see `Family.experts_in_major`), biases included."""
        if in_major:
            return self._in_major_specs(prefix)
        return [self._gate_up_spec(prefix, names), self._down_spec(prefix, names)]

    def _in_major_specs(self, prefix: str) -> list[WeightSpec]:
        """gate_up_proj [E, H, 2I] (gate = even columns, up = odd), down_proj [E, I, H], the biases
        [E, 2I] (interleaved the same way) and [E, H]."""
        n_loc, experts, e = self.cols.stop - self.cols.start, self._expert_slice(), self.placement.num_experts
        pair_cols = slice(2 * self.cols.start, 2 * self.cols.stop)  # this rank's gate and up columns
        gate, up = (slice(None), slice(0, n_loc)), (slice(None), slice(n_loc, None))
        key, shape = f"{prefix}.gate_up_proj", (e, self.hidden, 2 * self.inter)
        specs = [
            self._weight(self.w_gate_up, (Form("fused", (
                Piece(key, shape, (experts, slice(None), pair_cols), gate, ("even", "T")),
                Piece(key, shape, (experts, slice(None), pair_cols), up, ("odd", "T")),
            )),)),
            self._weight(self.w_down, (Form("fused", (
                Piece(f"{prefix}.down_proj", (e, self.inter, self.hidden), (experts, self.cols), (), ("T",)),
            )),)),
        ]  # fmt: skip
        if self.b_gate_up is not None and self.b_down is not None:
            bias_key, bias_shape = f"{prefix}.gate_up_proj_bias", (e, 2 * self.inter)
            specs += [
                WeightSpec(self.b_gate_up, (Form("fused", (
                    Piece(bias_key, bias_shape, (experts, pair_cols), gate, ("even",)),
                    Piece(bias_key, bias_shape, (experts, pair_cols), up, ("odd",)),
                )),)),
                WeightSpec(self.b_down, (Form("fused", (
                    Piece(f"{prefix}.down_proj_bias", (e, self.hidden), (experts,)),
                )),)),
            ]  # fmt: skip
        return specs

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
        return self._weight(
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
        return self._weight(
            self.w_down, (Form("per-expert", per_expert, frozenset(every)), Form("fused", fused))
        )

    def _weight(self, param: torch.Tensor, forms: tuple[Form, ...]) -> WeightSpec:
        """The spec of an expert weight: quantised to FP8 as it loads where the experts are FP8."""
        if self.scales is None:
            return WeightSpec(param, forms)
        table = self.scales.gate_up if param is self.w_gate_up else self.scales.down
        return WeightSpec(param, forms, (table, self.scales.group))

    def _expert_slice(self) -> slice:
        return slice(self.placement.first, self.placement.first + self.placement.count)
