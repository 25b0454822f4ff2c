"""The paged KV cache: fixed-size blocks of keys and values per layer, and the allocator of those blocks."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

import torch


class OutOfBlocksError(RuntimeError):
    """The allocator has fewer free blocks than asked for (the scheduler checks first; this is a bug)."""


class BlockAllocator:
    """Hands out block ids in [0, num_blocks), reference counted: the completions of one prompt share its
    full prompt blocks (which nobody writes again); a block is free once every holder has let it go."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        self._refs.update(dict.fromkeys(blocks, 1))
        return blocks

    def share(self, blocks: Iterable[int]) -> list[int]:
        """One more holder for each of these allocated blocks; returns them."""
        blocks = list(blocks)
        for b in blocks:
            if b not in self._refs:
                raise AssertionError(f"KV block {b} shared while free")
            self._refs[b] += 1
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            if b not in self._refs:
                raise AssertionError(f"KV block {b} freed twice or never allocated")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                del self._refs[b]
                self._free.append(b)


class KVCache:
    """k[layer], v[layer]: [num_blocks, block_size, kv_heads, head_dim] each, for this rank's KV heads."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block `src`'s keys and values, in every layer, into block `dst`."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst].copy_(k[src])
            v[dst].copy_(v[src])

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * kv_heads * head_dim * itemsize

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def blocks_for(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)
