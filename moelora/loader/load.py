"""Fill a model's parameters from a checkpoint, with errors that name the tensor, the file and the fix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from moelora.layers.spec import Form, Piece, WeightSpec
from moelora.loader.checkpoint import CheckpointError
from moelora.ops.torch.fp8 import quantize_rows, quantize_with

# Tensors some published checkpoints carry that no model needs (old rotary caches).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_MAX_LISTED = 8


class TensorSource(Protocol):
    """What the loader reads tensors from: a `Checkpoint`, or a `DummyCheckpoint` drawing random ones."""

    folder: Path

    def keys(self) -> set[str]: ...
    def file_of(self, key: str) -> Path: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def read(self, key: str, index: tuple[slice, ...] = ()) -> torch.Tensor: ...


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(sorted(keys)[:_MAX_LISTED])
    return shown + (f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def _check_unexpected(
    ckpt: TensorSource, specs: Sequence[WeightSpec], ignored: set[str], ignored_prefixes: tuple[str, ...]
) -> None:
    known: set[str] = set(ignored)
    for spec in specs:
        for form in spec.forms:
            known |= form.all_claims()
    extra = [
        k
        for k in ckpt.keys() - known
        if not k.endswith(_IGNORED_SUFFIXES) and not k.startswith(ignored_prefixes)
    ]
    if extra:
        raise CheckpointError(
            f"unexpected tensors in {ckpt.folder}: {_listing(extra)}; the checkpoint does not match its "
            f"config.json (another architecture or size?)"
        )


def _choose_form(ckpt: TensorSource, spec: WeightSpec, present: set[str]) -> Form:
    for form in spec.forms:
        if all(p.key in present for p in form.pieces):
            return form
    missing = [p.key for p in spec.forms[0].pieces if p.key not in present]
    alternatives = "".join(
        f"; nor in the {f.name} form ({_listing([p.key for p in f.pieces if p.key not in present])})"
        for f in spec.forms[1:]
    )
    raise CheckpointError(f"missing tensors in {ckpt.folder}: {_listing(missing)}{alternatives}")


def _fill(ckpt: TensorSource, spec: WeightSpec, form: Form) -> None:
    for piece in form.pieces:
        found = ckpt.shape(piece.key)
        if found != piece.shape:
            raise CheckpointError(
                f"tensor '{piece.key}' in {ckpt.file_of(piece.key).name} has shape {list(found)}, the model "
                f"config expects {list(piece.shape)}"
            )
        target = spec.param[piece.dst] if piece.dst else spec.param
        value = piece.read_from(ckpt.read)
        if spec.fp8 is None:
            target.copy_(value.to(target.dtype))
        else:
            _fill_fp8(ckpt, spec.fp8, piece, target, value)
        # read values, or values the dtype cannot hold (FP8 saturates: its input is checked)
        checked = target if spec.fp8 is None else value
        if not bool(torch.isfinite(checked).all()):
            raise CheckpointError(
                f"tensor '{piece.key}' in {ckpt.file_of(piece.key).name} holds NaN or Inf values (in "
                f"{target.dtype}): the checkpoint is corrupt, or too large for this dtype"
            )


def _fill_fp8(
    ckpt: TensorSource, fp8: tuple[torch.Tensor, int], piece: Piece, target: torch.Tensor, value: torch.Tensor
) -> None:
    """An FP8 parameter's piece: `value` quantised with the checkpoint's own block scales where the piece is
    FP8 there (its values come back bit for bit: the dequantised weight divides back exactly), else with
    scales of its own."""
    table, group = fp8
    row_scales = getattr(ckpt, "row_scales", None)  # an `Fp8Checkpoint`'s
    scales = row_scales(piece.key, piece.src, group) if row_scales is not None else None
    if scales is None:
        w8, scales = quantize_rows(value, group)
    elif piece.transform:  # the scales are the stored tensor's, not the transformed one's
        raise CheckpointError(
            f"'{piece.key}': FP8 weights are kept from keys the model reads as stored (not transposed or "
            f"interleaved); serve this checkpoint with quantization 'none'"
        )
    else:
        w8 = quantize_with(value, scales.to(value.device), group)
    target.copy_(w8)
    (table[piece.dst] if piece.dst else table).copy_(scales)


def load_weights(
    model: torch.nn.Module,
    specs: Sequence[WeightSpec],
    ckpt: TensorSource,
    *,
    ignored: set[str],
    progress: bool,
    desc: str | None = None,
    ignored_prefixes: tuple[str, ...] = (),
) -> None:
    """Fill every parameter of `model` from `ckpt` as `specs` say; `ignored` keys and keys starting with
    one of `ignored_prefixes` may be present unused."""
    covered = {id(s.param) for s in specs} | {id(s.fp8[0]) for s in specs if s.fp8 is not None}
    unfilled = [n for n, p in model.named_parameters() if id(p) not in covered]
    if unfilled:
        raise AssertionError(f"model parameters without a weight spec: {unfilled}")
    _check_unexpected(ckpt, specs, ignored, ignored_prefixes)
    present = ckpt.keys()
    with torch.no_grad():
        for spec in tqdm(
            specs, desc=desc or f"Loading {ckpt.folder.name}", unit="tensor", disable=not progress
        ):
            _fill(ckpt, spec, _choose_form(ckpt, spec, present))
