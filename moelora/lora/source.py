"""Where an adapter comes from: a PEFT folder on disk, or a `DummyLora` spec drawn in memory.

Both are read through `load_adapter` into the same canonical `LoraAdapter`, on rank 0 when the adapter is
loaded and again wherever it is needed later (a worker writing its shards, a re-read after a CPU-cache
eviction), so nothing downstream knows which kind it is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from moelora.lora.adapter import LoraAdapter, check_rank, read_adapter, reread_adapter
from moelora.lora.dummy import DummyLora, make_dummy_adapter
from moelora.models.config import ModelConfig
from moelora.models.family import Family

AdapterSource = Path | DummyLora


def as_source(value: str | Path | DummyLora) -> AdapterSource:
    """A folder given as text becomes a Path (with ~ expanded)."""
    return value if isinstance(value, DummyLora) else Path(value).expanduser()


def load_adapter(
    name: str,
    source: AdapterSource,
    cfg: ModelConfig,
    family: Family,
    max_rank: int | None,
    *,
    fingerprint: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
    owns_expert: Callable[[int], bool] | None = None,
    device: torch.device | None = None,
) -> LoraAdapter:
    """The adapter `source` holds for the model `cfg`; AdapterError if it cannot be served.

    `fingerprint`: a re-read, which must find the files first read. `dtype`, `device`: a dummy adapter's
    tensors are drawn there (in CPU memory after; a folder's are read as fp32). `owns_expert`: keep only
    these experts' weights.
    """
    if isinstance(source, DummyLora):
        check_rank(name, source.rank, max_rank, " (a dummy adapter)")
        return make_dummy_adapter(name, source, cfg, dtype, owns_expert, device)
    if fingerprint is None:
        return read_adapter(name, source, cfg, family, max_rank, owns_expert)
    assert max_rank is not None
    return reread_adapter(name, source, fingerprint, cfg, family, max_rank, owns_expert)
