"""Block-quantised FP8 checkpoints as published (e.g. Qwen3-30B-A3B-FP8): config.json's
`quantization_config = {"quant_method": "fp8", "weight_block_size": [bo, bi], ...}`; each quantised weight
[out, in] is float8_e4m3fn, with `weight_scale_inv` [ceil(out / bo), ceil(in / bi)] beside it (bf16 or
fp32; the last block of a dimension may be partial). Fused expert tensors as transformers 5 writes them
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) carry `<name>_scale_inv` [E,
ceil(rows / bo), ceil(cols / bi)]: the same blocks per expert. Read dequantised, exactly: W[..., i, j] =
W8[..., i, j] * scale[..., i // bo, j // bi] in fp32 (then the model's dtype), also for a slice of a rank
that cuts through a block: its rows and columns index the scales by their global position. Never
re-quantised.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from moelora.loader.checkpoint import CheckpointError
from moelora.loader.load import TensorSource

SCALE_SUFFIX = "_scale_inv"  # `<w>.weight` -> `<w>.weight_scale_inv`; fused `<w>` -> `<w>_scale_inv`
_FP8 = (torch.float8_e4m3fn,)


def fp8_block_size(raw: dict[str, Any], where: Path) -> tuple[int, int] | None:
    """(bo, bi) of a block-FP8 checkpoint's config.json, None for an unquantised one; CheckpointError for
    a quantisation moelora does not read."""
    q = raw.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method != "fp8":
        raise CheckpointError(
            f"{where}: quantization_config quant_method {method!r} is not read: moelora loads unquantised "
            f"checkpoints, block-FP8 ones (quant_method 'fp8' with weight_block_size) and MXFP4 experts "
            f"(quant_method 'mxfp4')"
        )
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(
            f"{where}: quantization_config weight_block_size {block!r} must be two positive integers "
            f"(per-tensor FP8 scales are not read)"
        )
    if q.get("activation_scheme", "dynamic") != "dynamic" or q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(
            f"{where}: quantization_config asks for activation_scheme {q.get('activation_scheme')!r}, fmt "
            f"{q.get('fmt')!r}: only dynamic activations and e4m3 weights are read"
        )
    return block[0], block[1]


class Fp8Checkpoint:
    """A TensorSource over a checkpoint that reads FP8 weights dequantised; their scales are consumed."""

    def __init__(self, ckpt: TensorSource, block: tuple[int, int]) -> None:
        self.ckpt, self.folder, self.block = ckpt, ckpt.folder, block
        keys = ckpt.keys()
        self._scale_of: dict[str, str] = {}
        for key in keys:
            if key.endswith(SCALE_SUFFIX):
                weight = key.removesuffix(SCALE_SUFFIX)
                if weight not in keys:
                    raise CheckpointError(
                        f"'{key}' in {ckpt.file_of(key).name} scales '{weight}', which the checkpoint does "
                        f"not hold: the checkpoint is incomplete"
                    )
                self._scale_of[weight] = key

    def keys(self) -> set[str]:
        return self.ckpt.keys() - set(self._scale_of.values())

    def fp8_keys(self) -> set[str]:
        """The weights that carry block scales (stored in FP8)."""
        return set(self._scale_of)

    def row_scales(self, key: str, src: tuple[slice, ...], group: int) -> torch.Tensor | None:
        """The scales of the part `src` (leading indices, then rows and columns) of weight `key`, per row
        and `group` columns from where the part's columns start (`group` must divide the block width and
        that start), fp32 [..., rows, ceil(cols / group)]: each row's block scales, indexed by global row
        and column. None for a weight that is not FP8 in this checkpoint."""
        scale_key = self._scale_of.get(key)
        if scale_key is None:
            return None
        (bo, bi), shape = self.block, self.ckpt.shape(key)
        lead, (r0, r1), (c0, c1) = _split(src, shape)
        if bi % group or c0 % group:
            raise CheckpointError(f"'{key}': groups of {group} columns from column {c0} cut blocks of {bi}")
        table = self.ckpt.read(scale_key, lead).float()
        return table[..., torch.arange(r0, r1) // bo, :][..., torch.arange(c0, c1, group) // bi]

    def file_of(self, key: str) -> Path:
        return self.ckpt.file_of(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.ckpt.shape(key)

    def read(self, key: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """The tensor `key` (or its `index` part), an FP8 weight dequantised to fp32."""
        w = self.ckpt.read(key, index)
        scale_key = self._scale_of.get(key)
        if w.dtype not in _FP8:
            if scale_key is not None:
                raise CheckpointError(
                    f"'{scale_key}' scales '{key}', which is stored in {w.dtype}, not float8_e4m3fn: the "
                    f"checkpoint is inconsistent"
                )
            return w
        name = self.ckpt.file_of(key).name
        if scale_key is None:
            raise CheckpointError(
                f"tensor '{key}' in {name} is float8_e4m3fn but has no "
                f"'{key}{SCALE_SUFFIX}': the checkpoint is incomplete"
            )
        shape = self.ckpt.shape(key)
        if len(shape) not in (2, 3):
            raise CheckpointError(
                f"tensor '{key}' in {name} is a {len(shape)}-D FP8 tensor: block-quantised weights are read "
                f"as [out, in], or [experts, out, in] for fused experts"
            )
        (bo, bi), (rows, cols) = self.block, shape[-2:]
        grid = (*shape[:-2], math.ceil(rows / bo), math.ceil(cols / bi))
        if self.ckpt.shape(scale_key) != grid:
            raise CheckpointError(
                f"'{scale_key}' has shape {list(self.ckpt.shape(scale_key))}, but '{key}' {list(shape)} in "
                f"blocks of {bo} x {bi} (weight_block_size) needs {list(grid)}: the scales do not belong "
                f"to this weight, or the block size is not the one it was quantised with"
            )
        lead, (r0, r1), (c0, c1) = _split(index, shape)
        if r1 <= r0 or c1 <= c0:
            return w.float()
        blocks = (slice(r0 // bo, (r1 - 1) // bo + 1), slice(c0 // bi, (c1 - 1) // bi + 1))
        s = self.ckpt.read(scale_key, (*lead, *blocks)).float()
        s = s.repeat_interleave(bo, -2).repeat_interleave(bi, -1)
        r, c = r0 - blocks[0].start * bo, c0 - blocks[1].start * bi  # the part's first row and column in s
        s = s[..., r : r + r1 - r0, c : c + c1 - c0]
        return w.float() * s


def _split(
    index: tuple[slice, ...], shape: tuple[int, ...]
) -> tuple[tuple[slice, ...], tuple[int, int], tuple[int, int]]:
    """(the leading dimensions' slices, [start, stop) of the rows, of the columns) of a loader index into a
    tensor of `shape` (rows and columns its last two dimensions)."""
    lead = len(shape) - 2
    full = (*index, *[slice(None)] * (len(shape) - len(index)))
    for part in full[:lead]:
        if not isinstance(part, slice) or part.step not in (None, 1):
            raise CheckpointError(f"an FP8 weight is read with index {index} (contiguous slices only)")
    return full[:lead], _bounds(full, lead, shape[lead]), _bounds(full, lead + 1, shape[lead + 1])


def _bounds(index: tuple[slice, ...], dim: int, size: int) -> tuple[int, int]:
    """[start, stop) of dimension `dim` in a loader index (contiguous slices only)."""
    if dim >= len(index):
        return 0, size
    start, stop, step = index[dim].indices(size)
    if step != 1:
        raise CheckpointError(f"an FP8 weight is read with a strided slice {index[dim]} (not supported)")
    return start, max(start, stop)
