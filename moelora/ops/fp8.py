"""FP8 weights as the model plans them and the linear op takes them: which layers hold their weights in
float8_e4m3fn with a scale per row and group of input columns (`Fp8Weights`, the model config's `fp8`),
the group a layer's share of the input allows (`Fp8Weights.group`), and a linear layer's scales
(`RowScales`). The routed experts' scales are `expert_extras.ExpertScales`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

MIN_GROUP = 16  # the FP8 kernels' narrowest K step


@dataclass(frozen=True)
class RowScales:
    """The scales of an FP8 linear weight W8 [N, K]: table [N, ceil(K / group)] fp32, with
        W[n, k] = W8[n, k] * table[n, k // group]
    `group` a power of two >= 16; the kernels step at most `group` input columns at a time, so each step
    reads one scale per row."""

    table: torch.Tensor
    group: int


@dataclass(frozen=True)
class Fp8Weights:
    """Which weights are served in FP8, and their scales' groups.

    `block`: the scale blocks' width of an FP8 checkpoint whose values and scales the layers keep (a group
    must then not straddle two blocks, nor two ranks' shares), or None for scales of their own (groups of
    128 within each rank's share: `--quantization fp8` on a 16-bit checkpoint). `strict`: a layout that
    leaves groups under 16 columns is an error (else that layer stays in the model's dtype, with a
    warning). `experts`: whether the routed experts are FP8. `dense`: the checkpoint names (`q_proj`,
    `down_proj`, ...) of the linear layers that are, or None for every linear layer adapters may target
    (routers, gates and the embeddings never are)."""

    block: int | None
    strict: bool
    experts: bool = True
    dense: frozenset[str] | None = None

    def describe(self) -> str:
        """What is FP8, for a startup line: "FP8 experts and linear layers", or the names it holds."""
        layers = "linear layers" if self.dense is None else ", ".join(sorted(self.dense))
        parts = [p for p in ("experts" if self.experts else "", layers) if p]
        return "FP8 " + " and ".join(parts) if parts else "no FP8 weights"

    @property
    def linear_layers(self) -> bool:
        """Whether any linear layer is FP8."""
        return self.dense is None or bool(self.dense)

    def holds(self, names: Iterable[str]) -> bool:
        """Whether a linear layer whose stacked parts have the checkpoint names `names` is FP8."""
        return self.dense is None or all(n in self.dense for n in names)

    def group(self, cols: range | slice, full: int, what: str) -> tuple[int, str | None]:
        """(the scale group of a layer whose share of its `full` input columns is `cols`; why not, with
        group 0, where that share cuts the checkpoint's blocks into groups under 16 columns: a ValueError
        if strict). With a checkpoint's blocks the group is the largest power of two dividing the block
        and, where the input is split, the share's width and where it starts: the same on every rank of
        an even split (a last group may be partial)."""
        if self.block is None:
            return 128, None
        whole = cols.start == 0 and cols.stop == full
        common = self.block if whole else math.gcd(self.block, cols.stop - cols.start, cols.start)
        group = common & -common
        if group >= MIN_GROUP:
            return group, None
        why = (
            f"{what}: each rank's share of the input is {cols.stop - cols.start} columns from column "
            f"{cols.start}, which cuts the checkpoint's {self.block}-column scale blocks into groups of "
            f"{group} (the FP8 kernels need {MIN_GROUP})"
        )
        if self.strict:
            raise ValueError(f"FP8 weights: {why}")
        return 0, why
