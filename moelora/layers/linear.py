"""Linear layers that know their TP shard and how to load it.

Column layers hold some output rows of one or more checkpoint weights (stacked, e.g. q/k/v or gate/up);
row layers hold some input columns and leave the sum over ranks to the caller's all-reduce, so the
collective is a visible line in the caller's forward (and LoRA partials can ride on it). Either may hold
its weight in FP8 with a scale per row and group of input columns (`ModelConfig.fp8`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moelora import ops
from moelora.layers.spec import Form, Piece, WeightSpec, sharded
from moelora.ops.dense_lora import DenseLora
from moelora.ops.fp8 import Fp8Weights, RowScales
from moelora.ops.input_norm import InputNorm
from moelora.ops.torch.fp8 import FP8
from moelora.parallel.sharding import shard_range
from moelora.parallel.state import ParallelState


@dataclass(frozen=True)
class OutPart:
    """Rows `rows` of checkpoint weight `<prefix>.<name>.weight`, which has `full_out` rows: one range, or
    several stacked in the order given (a checkpoint layout regrouped at load: Qwen3-Next's per-head q, k,
    v, z blocks as all q, all k, ...), its adapters' B rows gathered the same way."""

    name: str
    full_out: int
    rows: slice | tuple[slice, ...]

    @property
    def ranges(self) -> tuple[slice, ...]:
        return self.rows if isinstance(self.rows, tuple) else (self.rows,)

    @property
    def size(self) -> int:
        return sum(r.stop - r.start for r in self.ranges)


def split_part(name: str, full_out: int, ps: ParallelState) -> OutPart:
    """This TP rank's even share of the output rows."""
    return OutPart(name, full_out, shard_range(full_out, ps.tp_size, ps.tp_rank, f"{name} output size"))


def whole_part(name: str, full_out: int) -> OutPart:
    return OutPart(name, full_out, slice(0, full_out))


@dataclass(frozen=True)
class LoraTarget:
    """A linear layer adapters may modify (declared by the block that owns it), and the adapter target
    name of each of its stacked parts (`q_proj`, `shared_expert.gate_proj`, ...)."""

    layer: int
    module: ColumnLinear | RowLinear
    names: tuple[str, ...]


class _Weight(nn.Module):
    """What column and row layers share: the weight [out, in_loc], in the model's dtype or FP8 with its
    scales (`scales`, the table a parameter of its own), and the bias."""

    def __init__(
        self, out: int, in_loc: int, bias: bool, dtype: torch.dtype, group: int, fp8_skipped: str | None
    ) -> None:
        """`group`: the FP8 scales' group of input columns, 0 for a weight in `dtype`; `fp8_skipped`: why
        a layer the plan holds in FP8 is not (its layout), for the loader's warning."""
        super().__init__()
        self.fp8_skipped = fp8_skipped
        self.scales: RowScales | None = None
        if group:
            table = torch.empty(out, -(-in_loc // group), dtype=torch.float32)
            self.weight_scale = nn.Parameter(table, requires_grad=False)
            self.scales = RowScales(self.weight_scale, group)
        weight_dtype = FP8 if group else dtype
        self.weight = nn.Parameter(torch.empty(out, in_loc, dtype=weight_dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out, dtype=dtype), requires_grad=False) if bias else None
        self.lora: DenseLora | None = None

    def _weight_spec(self, forms: tuple[Form, ...]) -> WeightSpec:
        """The weight's spec: quantised to FP8 as it loads where the layer is FP8."""
        fp8 = None if self.scales is None else (self.scales.table, self.scales.group)
        return WeightSpec(self.weight, forms, fp8)


class ColumnLinear(_Weight):
    """y = x W^T + b, W [sum of part sizes, in]: the parts' rows stacked in order."""

    def __init__(
        self,
        in_features: int,
        parts: Sequence[OutPart],
        bias: bool,
        dtype: torch.dtype,
        lora_target: bool = True,
        fp8: Fp8Weights | None = None,
    ) -> None:
        """`lora_target`: whether adapters may modify this layer (False for a router): then its base
        product runs the same kernel in every batch and on every server, with or without adapters, and
        it is never FP8. `fp8`: the weight in FP8 if the plan holds the parts' names."""
        group = 0
        if fp8 is not None and lora_target and fp8.holds(p.name for p in parts):
            group, _ = fp8.group(range(in_features), in_features, parts[0].name)  # whole: never cut
        super().__init__(sum(p.size for p in parts), in_features, bias, dtype, group, None)
        self.parts = tuple(parts)
        self.out_sizes = tuple(p.size for p in self.parts)
        self.lora_target = lora_target
        self.in_features = in_features

    def forward(
        self, x: torch.Tensor, token_slot: torch.Tensor | None = None, xa: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x W^T + b plus each token's adapter delta (`token_slot`; none when None); xa: its LoRA shrink,
        computed by the norm before it where `shrink_chunk` said so."""
        if not self.lora_target:
            return F.linear(x, self.weight, self.bias)
        return ops.linear(
            x, self.weight, self.bias, self.lora, token_slot, self.out_sizes, self.scales, xa=xa
        )

    def norm_forward(
        self,
        x: torch.Tensor,
        norm: InputNorm,
        token_slot: torch.Tensor | None = None,
        xa: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The norm before this layer, then the layer -> (y, x + residual) (`ops.norm_linear`); xa: the LoRA
        shrink of the norm's output (`RMSNorm.shrink`), where `shrink_chunk` said so."""
        assert self.lora_target
        return ops.norm_linear(
            x, norm, self.weight, self.bias, self.lora, token_slot, self.out_sizes, self.scales, xa=xa
        )

    def takes_norm(self, x: torch.Tensor, norm: InputNorm) -> bool:
        """Whether `norm_forward` runs the norm inside this layer's launch for input x (`ops.norms_input`)."""
        if not self.lora_target:
            return False
        return ops.norms_input(x, norm, self.weight, self.lora, self.out_sizes, self.scales)

    def shrink_chunk(self, x: torch.Tensor, token_slot: torch.Tensor | None) -> int:
        """Whether the norm before this layer should compute its LoRA shrink for input x (`ops.shrink_chunk`:
        the chunk of input columns, or 0)."""
        if not self.lora_target:
            return 0
        return ops.shrink_chunk(x, self.weight, self.lora, token_slot, self.out_sizes, self.scales)

    def weight_specs(self, prefix: str) -> list[WeightSpec]:
        specs = [self._weight_spec(self._forms(prefix, "weight", (self.in_features,)))]
        if self.bias is not None:
            specs.append(WeightSpec(self.bias, self._forms(prefix, "bias", ())))
        return specs

    def _forms(self, prefix: str, kind: str, rest: tuple[int, ...]) -> tuple[Form, ...]:
        pieces, offset = [], 0
        for p in self.parts:
            key = f"{prefix}.{p.name}.{kind}"
            for rows in p.ranges:
                size = rows.stop - rows.start
                pieces.append(Piece(key, (p.full_out, *rest), (rows,), (slice(offset, offset + size),)))
                offset += size
        return (Form("", tuple(pieces)),)


class RowLinear(_Weight):
    """Partial y = x_loc W_loc^T over this rank's input columns; the caller all-reduces.

    The bias, if any, is added on TP rank 0 only, so the all-reduce adds it once.
    """

    def __init__(
        self,
        name: str,
        in_full: int,
        out: int,
        bias: bool,
        ps: ParallelState,
        dtype: torch.dtype,
        fp8: Fp8Weights | None = None,
    ):
        """`fp8`: the weight in FP8 if the plan holds `name` and the rank's columns keep groups of 16."""
        cols = shard_range(in_full, ps.tp_size, ps.tp_rank, f"{name} input size")
        group, skipped = 0, None
        if fp8 is not None and fp8.holds((name,)):
            group, skipped = fp8.group(cols, in_full, name)
        super().__init__(out, cols.stop - cols.start, bias, dtype, group, skipped)
        self.name, self.in_full, self.out, self.cols = name, in_full, out, cols
        self.adds_bias = ps.tp_rank == 0

    def forward(
        self, x: torch.Tensor, token_slot: torch.Tensor | None = None, xa: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Partial output; the LoRA delta of this rank's input columns rides the caller's all-reduce. xa:
        its LoRA shrink, computed by the kernel before it where `ops.decode_o_shrink` said so."""
        bias = self.bias if self.adds_bias else None
        return ops.linear(x, self.weight, bias, self.lora, token_slot, (self.out,), self.scales, xa=xa)

    def weight_specs(self, prefix: str) -> list[WeightSpec]:
        key = f"{prefix}.{self.name}"
        form = Form("", (Piece(f"{key}.weight", (self.out, self.in_full), (slice(None), self.cols)),))
        specs = [self._weight_spec((form,))]
        if self.bias is not None:
            specs.append(sharded(self.bias, f"{key}.bias", (self.out,), ()))
        return specs
