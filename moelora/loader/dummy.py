"""Random weights in place of a checkpoint's (`load_format="dummy"`): the same specs, slices and code path,
only no file is read.

Each tensor is drawn on the model's device from a generator seeded by the engine seed and the tensor's
checkpoint name, whole, and then sliced as a real checkpoint would be. Every rank therefore draws the same
full tensor and keeps its own part: a dummy model split over tp x ep ranks is the one-process dummy model,
split. Values follow the usual initialisation: N(0, 0.02) for matrices and biases, ones for norm scales
(the 1-D weights), so activations, routing and logits behave like a real model's (experts chosen about
uniformly, no overflow in 16-bit dtypes).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import torch

from moelora.layers.spec import WeightSpec

INIT_STD = 0.02


class DummyCheckpoint:
    """Stands in for `Checkpoint` in `load_weights`: the keys of each spec's first on-disk form."""

    def __init__(self, folder: Path, specs: Sequence[WeightSpec], device: torch.device, seed: int) -> None:
        self.folder, self.device, self.seed = folder, device, seed
        self._shapes = {p.key: p.shape for spec in specs for p in spec.forms[0].pieces}
        self._last: tuple[str, torch.Tensor] | None = None  # stacked parts read one key twice in a row

    def keys(self) -> set[str]:
        return set(self._shapes)

    def file_of(self, key: str) -> Path:
        return self.folder / "(dummy weights)"

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def read(self, key: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        if self._last is None or self._last[0] != key:
            self._last = key, self._draw(key)
        full = self._last[1]
        return full[index] if index else full

    def _draw(self, key: str) -> torch.Tensor:
        shape = self._shapes[key]
        if len(shape) == 1 and key.endswith(".weight"):
            return torch.ones(shape, device=self.device)
        generator = torch.Generator(self.device).manual_seed(
            ((self.seed % 2**32) << 32) + zlib.crc32(key.encode())
        )
        return torch.randn(shape, generator=generator, device=self.device).mul_(INIT_STD)
