"""PyTorch draw of the sampler's exponential race: token = argmax over t of q[t] / e[t], where q are a row's
(unnormalised) probabilities and e[t] = -log(u[t]) with u[t] uniform in (0, 1) from a counter-based
hash of the row's key and t. The hash is 32-bit integer arithmetic, so the noise is the same numbers on
every device (the Triton kernel computes it in uint32, this twin in int64 with masks)."""

from __future__ import annotations

from typing import TypeVar

import torch

MASK32 = 0xFFFFFFFF
# Multipliers below 2^31, so a 32-bit value times one stays below 2^63 in int64 (no overflow anywhere).
MULT = (0x7FEB352D, 0x68E31DA5)
COLUMN_SALT = 0x9E3779B9  # added to a column index before it is hashed

_Ints = TypeVar("_Ints", int, torch.Tensor)


def hash32(x: _Ints) -> _Ints:
    """A 32-bit integer mix (xor-shift-multiply, two rounds) of values in [0, 2^32): a Python int on the
    host or an int64 tensor, the same numbers."""
    for mult in MULT:
        x = x ^ (x >> 16)
        x = (x * mult) & MASK32
    return x ^ (x >> 15)


def row_hash(seed: int, position: int) -> int:
    """The race's key of one row, as an int32 bit pattern: a hash of the sequence's seed (any int) and its
    output position."""
    s = seed % 2**64
    return signed32(hash32(hash32(hash32(s & MASK32) ^ (s >> 32)) ^ (position & MASK32)))


def signed32(value: int) -> int:
    """The int32 with the bits of `value` in [0, 2^32)."""
    return value - (1 << 32) if value >= 1 << 31 else value


_COLUMNS: dict[tuple[int, torch.device], torch.Tensor] = {}  # the vocabulary's hashes, made once per device


def _column_hashes(vocab: int, device: torch.device) -> torch.Tensor:
    key = (vocab, device)
    if key not in _COLUMNS:
        _COLUMNS[key] = hash32(torch.arange(vocab, dtype=torch.int64, device=device) + COLUMN_SALT)
    return _COLUMNS[key]


def forget_column_hashes() -> None:
    """Drop the vocabulary hashes made so far (device memory; remade on the next draw)."""
    _COLUMNS.clear()


def race_noise(row_hashes: torch.Tensor, vocab: int) -> torch.Tensor:
    """e [R, V] fp32, e[r, t] = -log(u) with u = (23 bits of hash32(row_hashes[r] ^ hash32(t + salt)) + 0.5)
    / 2^23, never 0 or 1. row_hashes [R] int32 (`row_hash`'s bit patterns).

    23 bits, not 24: (2^24 - 1) + 0.5 rounds to 2^24 in fp32, which made u = 1 and e = 0 (a token that
    could never win), or, where a compiler fused the multiply-add, not; every step here is exact."""
    row = row_hashes.to(torch.int64) & MASK32
    bits = hash32(row[:, None] ^ _column_hashes(vocab, row.device)[None, :])  # [R, V]
    u = ((bits >> 9).to(torch.float32) + 0.5) * 2.0**-23
    return -torch.log(u)


def race_argmax(
    x: torch.Tensor,
    top: torch.Tensor,
    temperature: torch.Tensor,
    row_hashes: torch.Tensor,
    from_logits: bool,
) -> torch.Tensor:
    """token [R] int64 = argmax over t of q[r, t] / race_noise(row_hashes, V)[r, t] (the first on a tie).

    x [R, V] fp32: logits when from_logits (q = exp((x - top[r]) / temperature[r]); top [R] fp32 the row's
    maximum, temperature [R] fp32 > 0; a token at -inf gets q = 0), else q itself (top and temperature
    unused, but given). row_hashes [R] int32."""
    q = torch.exp((x - top[:, None]) / temperature[:, None]) if from_logits else x
    return (q / race_noise(row_hashes, x.shape[1])).argmax(dim=-1)
