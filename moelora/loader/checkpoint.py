"""Lazy, validated access to the safetensors files of one checkpoint folder.

Nothing is read until a tensor (or a slice of one) is asked for, so a rank that owns part of a weight
reads only that part and no second copy of the model is ever held.
"""

from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and the fix."""


def _check_complete(path: Path) -> None:
    """Raise if the file's header is malformed or promises more bytes than the file has (an interrupted
    download or copy)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > size:
                raise ValueError
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"checkpoint file '{path}' is truncated or not a safetensors file (its header is unreadable): "
            f"copy or download it again"
        ) from e
    data_end = max((_data_end(path, k, v) for k, v in _entries(path, header)), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"checkpoint file '{path}' is truncated: its header promises {8 + header_len + data_end} bytes, "
            f"the file has {size}; copy or download it again"
        )


def _entries(path: Path, header: Any) -> list[tuple[str, Any]]:
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint file '{path}' has a malformed header (not a JSON object)")
    return [(k, v) for k, v in header.items() if k != "__metadata__"]


def _data_end(path: Path, key: str, entry: Any) -> int:
    """Where tensor `key`'s bytes end; CheckpointError unless its header entry is well formed."""
    fields: dict[str, Any] = entry if isinstance(entry, dict) else {}
    shape, offsets = fields.get("shape"), fields.get("data_offsets")
    ok = (
        isinstance(fields.get("dtype"), str)
        and isinstance(shape, list)
        and all(isinstance(d, int) and d >= 0 for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    )
    if not ok or not isinstance(offsets, list):
        raise CheckpointError(
            f"checkpoint file '{path}' has a malformed header entry for tensor {key[:80]!r} (needs dtype, "
            f"shape and data_offsets): copy or save the file again"
        )
    return int(offsets[1])


def _key_to_file(folder: Path) -> dict[str, Path]:
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"'{index}' is not a valid safetensors index (no 'weight_map'): {e}") from e
        files = {name: folder / name for name in set(weight_map.values())}
        for name, path in files.items():
            if not path.exists():
                raise CheckpointError(f"'{index}' lists '{name}', which is not in {folder}")
        return {key: files[name] for key, name in weight_map.items()}
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        extra = (
            " (pytorch_model.bin is not supported: save the model with safetensors)"
            if any(folder.glob("*.bin"))
            else ""
        )
        raise CheckpointError(
            f"no *.safetensors files in {folder}{extra}; for random weights of this config (benchmarks), "
            f"use load_format='dummy' (--load-format dummy)"
        )
    mapping: dict[str, Path] = {}
    for path in paths:
        _check_complete(path)
        with safe_open(str(path), framework="pt") as f:
            mapping.update(dict.fromkeys(f.keys(), path))
    return mapping


class Checkpoint:
    """The tensors of a checkpoint folder, by name; use as a context manager."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._file_of = _key_to_file(folder)
        self._stack = ExitStack()
        self._open: dict[Path, Any] = {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._open.clear()

    def keys(self) -> set[str]:
        return set(self._file_of)

    def file_of(self, key: str) -> Path:
        return self._file_of[key]

    def _handle(self, key: str) -> Any:
        path = self._file_of[key]
        if path not in self._open:
            _check_complete(path)
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def read(self, key: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """The tensor `key`, or only `index` of it (read from disk without the rest)."""
        sl = self._handle(key).get_slice(key)
        return sl[index] if index else sl[:]
