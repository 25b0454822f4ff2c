"""Linear layers that know their TP shard and how to load it.

Column layers hold some output rows of one or more checkpoint weights (stacked, e.g. q/k/v or gate/up);
row layers hold some input columns and leave the sum over ranks to the caller's all-reduce, so the
collective is a visible line in the caller's forward (and LoRA partials can ride on it).
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
from moelora.parallel.sharding import shard_range
from moelora.parallel.state import ParallelState


@dataclass(frozen=True)
class OutPart:
    """Rows `rows` of checkpoint weight `<prefix>.<name>.weight`, which has `full_out` rows."""

    name: str
    full_out: int
    rows: slice

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start


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


class ColumnLinear(nn.Module):
    """y = x W^T + b, W [sum of part sizes, in]: the parts' rows stacked in order."""

    def __init__(
        self,
        in_features: int,
        parts: Sequence[OutPart],
        bias: bool,
        dtype: torch.dtype,
        lora_target: bool = True,
    ) -> None:
        """`lora_target`: whether adapters may modify this layer (False for a router): then its base
        product runs the same kernel in every batch and on every server, with or without adapters."""
        super().__init__()
        self.lora_target = lora_target
        self.in_features = in_features
        self.parts = tuple(parts)
        self.out_sizes = tuple(p.size for p in self.parts)
        out = sum(self.out_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out, dtype=dtype), requires_grad=False) if bias else None
        self.lora: DenseLora | None = None

    def forward(self, x: torch.Tensor, token_slot: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T + b plus each token's adapter delta (`token_slot`; none when None)."""
        if not self.lora_target:
            return F.linear(x, self.weight, self.bias)
        return ops.linear(x, self.weight, self.bias, self.lora, token_slot, self.out_sizes)

    def weight_specs(self, prefix: str) -> list[WeightSpec]:
        specs = [self._spec(self.weight, prefix, "weight", (self.in_features,))]
        if self.bias is not None:
            specs.append(self._spec(self.bias, prefix, "bias", ()))
        return specs

    def _spec(self, param: torch.Tensor, prefix: str, kind: str, rest: tuple[int, ...]) -> WeightSpec:
        pieces, offset = [], 0
        for p in self.parts:
            key = f"{prefix}.{p.name}.{kind}"
            pieces.append(Piece(key, (p.full_out, *rest), (p.rows,), (slice(offset, offset + p.size),)))
            offset += p.size
        return WeightSpec(param, (Form("", tuple(pieces)),))


class RowLinear(nn.Module):
    """Partial y = x_loc W_loc^T over this rank's input columns; the caller all-reduces.

    The bias, if any, is added on TP rank 0 only, so the all-reduce adds it once.
    """

    def __init__(self, name: str, in_full: int, out: int, bias: bool, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.name, self.in_full, self.out = name, in_full, out
        self.cols = shard_range(in_full, ps.tp_size, ps.tp_rank, f"{name} input size")
        in_loc = self.cols.stop - self.cols.start
        self.weight = nn.Parameter(torch.empty(out, in_loc, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out, dtype=dtype), requires_grad=False) if bias else None
        self.adds_bias = ps.tp_rank == 0
        self.lora: DenseLora | None = None

    def forward(self, x: torch.Tensor, token_slot: torch.Tensor | None = None) -> torch.Tensor:
        """Partial output; the LoRA delta of this rank's input columns rides the caller's all-reduce."""
        bias = self.bias if self.adds_bias else None
        return ops.linear(x, self.weight, bias, self.lora, token_slot, (self.out,))

    def weight_specs(self, prefix: str) -> list[WeightSpec]:
        key = f"{prefix}.{self.name}"
        specs = [sharded(self.weight, f"{key}.weight", (self.out, self.in_full), (slice(None), self.cols))]
        if self.bias is not None:
            specs.append(sharded(self.bias, f"{key}.bias", (self.out,), ()))
        return specs
