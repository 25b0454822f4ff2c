"""How a parameter is filled from checkpoint tensors: declared by the layers, carried out by the loader.

A layer knows its own sharding, so it states, for each of its parameters, which checkpoint tensors (and
which slice of each) land where. A parameter may have several on-disk forms (per-expert keys or fused 3-D
keys); the loader takes the first form whose tensors are all present.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

Index = tuple[slice | int, ...]


# What a piece may do to its slice after reading it, in order (safetensors slices have no steps):
# "even" / "odd" keep the even / odd entries of the last dimension (GPT-OSS interleaves gate and up),
# "T" swaps the last two dimensions (GPT-OSS stores experts [in, out]), "plus_one" reads w as 1 + w.
TRANSFORMS = {
    "even": lambda t: t[..., 0::2],
    "odd": lambda t: t[..., 1::2],
    "T": lambda t: t.transpose(-1, -2),
    "plus_one": lambda t: t.float() + 1,  # Qwen3-Next's zero-centered norm weights, 1 + w in fp32
    "squeeze1": lambda t: t.squeeze(1),  # a depthwise conv1d weight [C, 1, K] as [C, K]
}


@dataclass(frozen=True)
class Piece:
    """Checkpoint tensor `key` (of full shape `shape`): its part `src`, then `transform` (names in
    TRANSFORMS, applied in order), goes to `param[dst]`."""

    key: str
    shape: tuple[int, ...]
    src: tuple[slice, ...] = ()
    dst: Index = ()
    transform: tuple[str, ...] = ()

    def read_from(self, read: Callable[[str, tuple[slice, ...]], torch.Tensor]) -> torch.Tensor:
        t = read(self.key, self.src)
        for name in self.transform:
            t = TRANSFORMS[name](t)
        return t


@dataclass(frozen=True)
class Form:
    """One on-disk form of a parameter.

    `claims` are all the checkpoint keys of this form, including the parts other ranks own, so that a
    tensor is "unexpected" only when no rank of any layout would read it.
    """

    name: str
    pieces: tuple[Piece, ...]
    claims: frozenset[str] = field(default=frozenset())

    def all_claims(self) -> frozenset[str]:
        return self.claims | {p.key for p in self.pieces}


@dataclass(frozen=True)
class WeightSpec:
    """`param` filled from one of `forms`. With `fp8` = (scales, group) the parameter is FP8 (float8_e4m3fn)
    with a scale per row and `group` columns in `scales` (same leading index): each piece is quantised as
    it lands, with an FP8 checkpoint's own block scales where the piece is FP8 there, else scales of its
    own (`ops.torch.fp8`), which go to `scales[piece.dst]`."""

    param: torch.Tensor
    forms: tuple[Form, ...]
    fp8: tuple[torch.Tensor, int] | None = None


def whole(param: torch.Tensor, key: str) -> WeightSpec:
    """The parameter is the checkpoint tensor `key`, unsharded."""
    return WeightSpec(param, (Form("", (Piece(key, tuple(param.shape)),)),))


def sharded(param: torch.Tensor, key: str, full_shape: Iterable[int], src: tuple[slice, ...]) -> WeightSpec:
    """The parameter is the `src` part of the checkpoint tensor `key` of shape `full_shape`."""
    return WeightSpec(param, (Form("", (Piece(key, tuple(full_shape), src),)),))
