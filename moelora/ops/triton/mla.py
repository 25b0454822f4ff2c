"""Latent-attention decode (DeepSeek's absorbed form) over the paged cache of latents, with the signature
and Semantics of `moelora.ops.torch.mla.latent_decode`; CUDA-graph safe (lengths on the device).

One program per (sequence, tile of BLOCK_H heads, split of the keys): every head of a sequence reads the
same cached latents (one "KV head"), so a tile of heads shares each latent tile it loads. Scores are
q_lat . c + q_rot . r (two dots: the latent part and the rotated part), the softmax is online in the log2
domain, and the output is p @ c, the latents themselves (the caller projects it out through kv_b's value
half). As in `attn_decode`, the keys are split so that a small batch still fills the card, and the last
split of a (sequence, head tile) to finish merges the splits in split order; the split count depends on
shapes only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.plan import AttnDecodeTiles
from moelora.ops.triton.attn_decode import (
    LOG2E,
    finish_split,
    mma,
    num_splits,
    online_update,
    split_buffers,
)
from moelora.ops.triton.common import device_ints


@triton.jit
def _latent_decode_kernel(
    q_ptr, qr_ptr, c_ptr, r_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr, out_ptr, count_ptr, qk_scale, num_heads,
    sq_t, sq_h, sqr_t, sqr_h, sc_b, sc_s, sr_b, sr_s, sbt_b, so_t, so_h, so_s, sout_t, sout_h,
    RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_LSE: tl.constexpr,
    IEEE: tl.constexpr, PIPELINED: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    h = tile * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < num_heads
    kv_len = tl.load(lens_ptr + b)
    # This sequence's keys [0, kv_len) cut into `splits` chunks of whole BLOCK_N tiles.
    chunk = tl.cdiv(tl.cdiv(kv_len, splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)
    rr = tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    r_ok = rr < RANK
    d_ok = dd < ROPE
    q = tl.load(q_ptr + b * sq_t + h[:, None] * sq_h + rr[None, :], mask=h_ok[:, None] & r_ok[None, :],
                other=0.0)  # fmt: skip
    qr = tl.load(qr_ptr + b * sqr_t + h[:, None] * sqr_h + dd[None, :], mask=h_ok[:, None] & d_ok[None, :],
                 other=0.0)  # fmt: skip
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    # The interpreter cannot run `range` over loaded bounds; on GPU the `for` is software-pipelined.
    if PIPELINED:
        for n0 in range(start, end, BLOCK_N):
            acc, m_i, l_i = _latent_tile(
                q, qr, acc, m_i, l_i, c_ptr, r_ptr, bt_ptr, b, n0, end, rr, r_ok, dd, d_ok, qk_scale,
                sc_b, sc_s, sr_b, sr_s, sbt_b, PAGE, BLOCK_N, IEEE,
            )  # fmt: skip
    else:
        n0 = start
        while n0 < end:
            acc, m_i, l_i = _latent_tile(
                q, qr, acc, m_i, l_i, c_ptr, r_ptr, bt_ptr, b, n0, end, rr, r_ok, dd, d_ok, qk_scale,
                sc_b, sc_s, sr_b, sr_s, sbt_b, PAGE, BLOCK_N, IEEE,
            )  # fmt: skip
            n0 += BLOCK_N
    finish_split(
        acc, m_i, l_i, o_ptr + b * so_t + h[:, None] * so_h + rr[None, :], so_s,
        lse_ptr + (b * num_heads + h) * splits, count_ptr + b * tl.num_programs(1) + tile,
        tl.cdiv(kv_len, chunk), out_ptr + b * sout_t + h[:, None] * sout_h + rr[None, :], h_ok, r_ok,
        WRITE_LSE, BLOCK_H, BLOCK_R, PIPELINED,
    )  # fmt: skip


@triton.jit
def _latent_tile(
    q, qr, acc, m_i, l_i, c_ptr, r_ptr, bt_ptr, b, n0, end, rr, r_ok, dd, d_ok, qk_scale,
    sc_b, sc_s, sr_b, sr_s, sbt_b, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of the heads' rows with cached tokens [n0, n0 + BLOCK_N) ∩ [0, end)."""
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < end
    page = tl.load(bt_ptr + b * sbt_b + n // PAGE, mask=n_ok, other=0).to(tl.int64)
    c = tl.load(c_ptr + (page * sc_b + (n % PAGE) * sc_s)[:, None] + rr[None, :],
                mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip
    r = tl.load(r_ptr + (page * sr_b + (n % PAGE) * sr_s)[:, None] + dd[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    s = mma(q, tl.trans(c), IEEE) + mma(qr, tl.trans(r), IEEE)
    s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))  # log2 domain; every tile has a valid key
    return online_update(acc, m_i, l_i, s, c, IEEE)


def device_lens(kv_lens: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Host-side lengths as the kernel's int32 tensor on `device` (one small pinned copy)."""
    return device_ints(list(kv_lens), device)


BLOCK_H = 16  # heads a program (the dot's smallest M)
# 32 cached tokens a step (a [32, 512] latent tile); splits of at least 64 keys, two programs per SM.
LATENT_TILES = AttnDecodeTiles(block_n=32, warps=4, stages=2, min_chunk=64, waves=2)


def latent_decode(
    q_lat: torch.Tensor,
    q_rot: torch.Tensor,
    latent_cache: torch.Tensor,
    rot_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    tiles: AttnDecodeTiles = LATENT_TILES,
    splits: int | None = None,
) -> torch.Tensor:
    """Same Semantics as `moelora.ops.torch.mla.latent_decode`, with kv_lens [B] int32 on the device.

    q_lat [B, H, R], q_rot [B, H, Dr]; latent_cache [num_blocks, block_size, 1, R], rot_cache
    [num_blocks, block_size, 1, Dr]; block_tables [B, max_blocks] int32 -> o_lat [B, H, R]. `splits`
    overrides the shape-derived split count of the keys (tests, benchmarks)."""
    batch, heads, rank = q_lat.shape
    rope = q_rot.shape[2]
    page = latent_cache.shape[1]
    shapes_ok = latent_cache.shape[2:] == (1, rank) and rot_cache.shape[2:] == (1, rope)
    if not shapes_ok or q_rot.shape[:2] != (batch, heads):
        raise ValueError(
            f"latent_decode: q_lat {tuple(q_lat.shape)}, q_rot {tuple(q_rot.shape)}, latent_cache "
            f"{tuple(latent_cache.shape)}, rot_cache {tuple(rot_cache.shape)} must be [B, H, R], "
            f"[B, H, Dr], [blocks, page, 1, R], [blocks, page, 1, Dr]"
        )
    if q_lat.stride(2) != 1 or q_rot.stride(2) != 1 or block_tables.dtype != torch.int32:
        raise ValueError("latent_decode: q_lat and q_rot need unit stride; block_tables int32")
    head_tiles = triton.cdiv(heads, BLOCK_H)
    if splits is None:
        splits = num_splits(batch, head_tiles, block_tables.shape[1] * page, q_lat.device, tiles)
    out = torch.empty_like(q_lat)
    part, lse, counts = split_buffers(out, splits, head_tiles)
    _latent_decode_kernel[(batch, head_tiles, splits)](
        q_lat, q_rot, latent_cache, rot_cache, block_tables, kv_lens, part, lse, out, counts,
        scale * LOG2E, heads,
        q_lat.stride(0), q_lat.stride(1), q_rot.stride(0), q_rot.stride(1),
        latent_cache.stride(0), latent_cache.stride(1), rot_cache.stride(0), rot_cache.stride(1),
        block_tables.stride(0), *part.stride()[:3], out.stride(0), out.stride(1),
        RANK=rank, ROPE=rope, BLOCK_R=max(16, triton.next_power_of_2(rank)),
        BLOCK_D=max(16, triton.next_power_of_2(rope)), PAGE=page, BLOCK_H=BLOCK_H, BLOCK_N=tiles.block_n,
        WRITE_LSE=splits > 1, IEEE=q_lat.dtype == torch.float32, PIPELINED=q_lat.is_cuda,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return out
