"""The paged KV cache: fixed-size blocks of keys and values per layer, and the allocator of those blocks."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch


class OutOfBlocksError(RuntimeError):
    """The allocator has fewer free blocks than asked for (the scheduler checks first; this is a bug)."""


# A full block's identity in the prefix cache: (previous block id, its generation, the block's tokens,
# adapter uid). Blocks are named by id and generation, so a key is exact and hashes in O(block size): a
# block that is evicted and reused gets a new generation, and no key naming its old content matches again.
BlockKey = tuple[int, int, tuple[int, ...], int]


class BlockAllocator:
    """Hands out block ids in [0, num_blocks), reference counted: the completions of one prompt share its
    full prompt blocks (which nobody writes again); a block is free once every holder has let it go.

    Prefix cache: a full block whose keys and values are computed can be registered under its BlockKey.
    It stays cached while free, until allocate() hands it out again (least recently freed first), so a
    later prompt with the same prefix (and adapter) reuses it instead of computing it again.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs: dict[int, int] = {}
        self._cached: dict[BlockKey, int] = {}
        self._key_of: dict[int, BlockKey] = {}
        self.generation = [0] * num_blocks
        self.hits = 0  # blocks reused from the prefix cache

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.popitem(last=False)[0] for _ in range(n)]
        for b in blocks:
            key = self._key_of.pop(b, None)
            if key is not None:  # evict its cached content
                del self._cached[key]
                self.generation[b] += 1
        self._refs.update(dict.fromkeys(blocks, 1))
        return blocks

    def register(self, block: int, key: BlockKey) -> None:
        """Cache an allocated, full, computed block under `key` (kept if another block already is)."""
        if key not in self._cached and block not in self._key_of:
            self._cached[key] = block
            self._key_of[block] = key

    def key_of(self, block: int) -> BlockKey | None:
        return self._key_of.get(block)

    def peek(self, key: BlockKey) -> int | None:
        """The cached block with this key, not held."""
        return self._cached.get(key)

    def lookup(self, key: BlockKey) -> int | None:
        """The cached block with this key, now held once more (taken off the free list if free)."""
        block = self._cached.get(key)
        if block is None:
            return None
        if block in self._free:
            del self._free[block]
            self._refs[block] = 1
        else:
            self._refs[block] += 1
        self.hits += 1
        return block

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
                self._free[b] = None


class KVCache:
    """k[layer], v[layer]: [num_blocks, block_size, kv_heads, head_dim] each, for this rank's KV heads
    (v's last dimension v_dim where it differs: latent attention keeps a latent in k and the rotated key
    part in v); empty for the layers `kv_layers` marks False (linear attention keeps no keys)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        v_dim: int | None = None,
        kv_layers: Sequence[bool] | None = None,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, block_size, kv_heads, head_dim)
        v_shape = (num_blocks, block_size, kv_heads, head_dim if v_dim is None else v_dim)
        keeps = list(kv_layers) if kv_layers is not None else [True] * num_layers
        empty = (0, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape if keep else empty, dtype=dtype, device=device) for keep in keeps]
        self.v = [torch.zeros(v_shape if keep else empty, dtype=dtype, device=device) for keep in keeps]

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block `src`'s keys and values, in every layer, into block `dst`."""
        for k, v in zip(self.k, self.v, strict=True):
            if not k.numel():
                continue
            k[dst].copy_(k[src])
            v[dst].copy_(v[src])

    @staticmethod
    def bytes_per_block(
        num_layers: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        v_dim: int | None = None,
    ) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        width = head_dim + (head_dim if v_dim is None else v_dim)
        return num_layers * block_size * kv_heads * width * itemsize

    def release(self) -> None:
        """Drop the cache tensors (the engine has stopped; nothing reads them any more)."""
        self.k, self.v = [], []

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def blocks_for(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)
