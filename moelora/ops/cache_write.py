"""`CacheWrite`: where a rotary op also stores this step's keys and values (the paged cache write fused
into the rotary launch, one launch a layer fewer)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class CacheWrite(NamedTuple):
    """v [T, Hkv, D] and the layer's paged caches [num_blocks, block_size, Hkv, D], slot_mapping [T]: the
    arguments of `ops.write_kv` other than k (which is the rotary's rotated k)."""

    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
