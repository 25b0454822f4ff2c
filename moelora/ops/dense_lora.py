"""`DenseLora`: one linear layer's adapter slots, the one argument the dense LoRA ops take for them;
`GivenShrink`: a layer's LoRA shrink that the kernel before it computes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class DenseLora:
    """A linear layer's adapter slots: a [S, P, R, in_loc] (one A per stacked output part), b [S, out_loc, R]
    (the parts' rows stacked like the output's columns; scales folded in), rank [S, P] int32 (each slot's
    rank per part, 0 where empty: lanes from there up are zero padding, which kernels may skip).

    Filled in place by `moelora.lora.pool.LoraPool`; sharded like the base weight (column layers: A whole,
    B rows split; row layers: A columns split, B whole). The value itself never changes.
    """

    a: torch.Tensor
    b: torch.Tensor
    rank: torch.Tensor


class GivenShrink(NamedTuple):
    """The LoRA shrink of a layer with one part (`lora`'s part 0) that the kernel before it computes for
    it (`ops.rotary_decode_attention`'s `o_shrink`): xa [chunks, T, R] fp32, each chunk the sum over its
    input columns (`ops.linear` adds the chunks up in order), for the tokens' slots token_slot [T]."""

    xa: torch.Tensor
    lora: DenseLora
    token_slot: torch.Tensor
