"""MXFP4 checkpoints as published (GPT-OSS): config.json's `quantization_config = {"quant_method":
"mxfp4", ...}`; a quantised fused expert tensor `<name>` [E, in, out] is stored as `<name>_blocks`
[E, out, in / 32, 16] uint8 (two FP4 E2M1 values a byte, the low nibble first, 32 values a block) and
`<name>_scales` [E, out, in / 32] uint8 (each block's power of two, biased by 127). Read dequantised as the
[E, in, out] tensor a bf16 checkpoint holds, exactly: an FP4 value times a power of two is exact in fp32
and bf16. Never re-quantised.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moelora.loader.checkpoint import CheckpointError
from moelora.loader.load import TensorSource

BLOCKS, SCALES = "_blocks", "_scales"
# FP4 E2M1 by its 4-bit code: sign bit 3, then two exponent bits and one mantissa bit.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> fp32 [..., G * 32]: value 2j of block g is
    FP4(low nibble of byte j) * 2^(scales[g] - 127), value 2j + 1 the high nibble's."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    low, high = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., G, 32]
    values = torch.ldexp(values, (scales.to(torch.int32) - 127)[..., None].float())
    return values.flatten(-2)


class Mxfp4Checkpoint:
    """A TensorSource over a checkpoint that presents each `<name>_blocks` / `<name>_scales` pair as the
    dequantised `<name>` [E, in, out] (fp32); other tensors pass through."""

    def __init__(self, ckpt: TensorSource) -> None:
        self.ckpt, self.folder = ckpt, ckpt.folder
        keys = ckpt.keys()
        self._packed: dict[str, tuple[str, str]] = {}
        for key in keys:
            if key.endswith(BLOCKS):
                name = key.removesuffix(BLOCKS)
                if name + SCALES not in keys:
                    raise CheckpointError(
                        f"'{key}' in {ckpt.file_of(key).name} has no '{name}{SCALES}' beside it: the MXFP4 "
                        f"checkpoint is incomplete"
                    )
                self._check(key, name + SCALES)
                self._packed[name] = (key, name + SCALES)
        orphans = {k for k in keys if k.endswith(SCALES)} - {s for _, s in self._packed.values()}
        if orphans:
            key = min(orphans)
            raise CheckpointError(
                f"'{key}' in {ckpt.file_of(key).name} scales '{key.removesuffix(SCALES)}{BLOCKS}', which the "
                f"checkpoint does not hold: the MXFP4 checkpoint is incomplete"
            )

    def _check(self, blocks: str, scales: str) -> None:
        b, s = self.ckpt.shape(blocks), self.ckpt.shape(scales)
        if len(b) != 4 or b[-1] != 16 or b[:-1] != s:
            raise CheckpointError(
                f"'{blocks}' {list(b)} and '{scales}' {list(s)} in {self.ckpt.file_of(blocks).name} are "
                f"not an MXFP4 pair: blocks [E, out, in / 32, 16] with scales [E, out, in / 32]"
            )

    def keys(self) -> set[str]:
        packed = {k for pair in self._packed.values() for k in pair}
        return (self.ckpt.keys() - packed) | set(self._packed)

    def file_of(self, key: str) -> Path:
        return self.ckpt.file_of(self._packed[key][0] if key in self._packed else key)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._packed:
            return self.ckpt.shape(key)
        experts, out, groups, _ = self.ckpt.shape(self._packed[key][0])
        return experts, groups * 32, out

    def read(self, key: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """The tensor `key` (or its `index` part); a packed one dequantised, only the experts asked for."""
        if key not in self._packed:
            return self.ckpt.read(key, index)
        blocks_key, scales_key = self._packed[key]
        experts = index[:1]  # read only these experts' blocks; the rest of the index applies after
        blocks, scales = self.ckpt.read(blocks_key, experts), self.ckpt.read(scales_key, experts)
        for name, t in ((blocks_key, blocks), (scales_key, scales)):
            if t.dtype != torch.uint8:
                raise CheckpointError(
                    f"'{name}' must be uint8 (packed FP4 pairs, biased exponents), found {t.dtype}"
                )
        w = dequantize(blocks, scales).transpose(1, 2)  # [E', in, out]
        return w[(slice(None), *index[1:])] if len(index) > 1 else w
