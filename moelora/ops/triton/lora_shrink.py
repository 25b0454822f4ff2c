"""Dense multi-LoRA shrink: xa[t] = A[s] @ x[t] for each token's slot s (one pass per slot of a block),
split along the input dimension into partial sums that the expand adds up (small batches need the
parallelism; it stays deterministic, unlike atomics)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.triton.common import valid_slot
from moelora.ops.triton.tiles import LoraTiles, dot_precision


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, xa_ptr, slot_ptr, rank_ptr, num_tokens, rank, num_slots, part_rank,
    sx_t, sx_k, sa_s, sa_r, sa_k, s_rs, s_rp,
    IN_DIM: tl.constexpr, K_CHUNK: tl.constexpr, HAS_RANK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    t_ok = t < num_tokens
    slot = tl.load(slot_ptr + t, mask=t_ok, other=-1)
    slot = valid_slot(slot, num_slots)
    r = tl.arange(0, BLOCK_R)
    kk = split * K_CHUNK + tl.arange(0, BLOCK_K)
    out = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    # Distinct slots of the block in increasing order; tokens of other slots load nothing.
    s = tl.min(slot)
    while s < num_slots:
        sel = slot == s
        # Lanes of A to read: below the slot's rank in their part (lane r is part r // part_rank's).
        r_ok = r < rank
        if HAS_RANK:
            lane_rank = tl.load(rank_ptr + s * s_rs + (r // part_rank) * s_rp, mask=r_ok, other=0)
            r_ok = r_ok & (r % part_rank < lane_rank)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K_CHUNK, BLOCK_K):
            k_ok = kk + k0 < IN_DIM
            xk = tl.load(
                x_ptr + t[:, None].to(tl.int64) * sx_t + (k0 + kk)[None, :] * sx_k,
                mask=sel[:, None] & k_ok[None, :],
                other=0.0,
            )
            ak = tl.load(
                a_ptr + s.to(tl.int64) * sa_s + r[None, :] * sa_r + (k0 + kk)[:, None] * sa_k,
                mask=k_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(xk, ak, acc, input_precision=PRECISION)
        out += acc
        s = tl.min(tl.where(slot > s, slot, num_slots))
    dst = xa_ptr + (split * num_tokens + t[:, None]).to(tl.int64) * rank + r[None, :]
    tl.store(dst, out, mask=t_ok[:, None] & (r < rank)[None, :])


def lora_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    token_slot: torch.Tensor,
    tiles: LoraTiles,
    slot_rank: torch.Tensor | None = None,
) -> torch.Tensor:
    """-> xa [splits, T, R] fp32 partial sums, sum over splits of xa[:, t] = a[s] @ x[t] for
    s = token_slot[t] in [0, S), zeros for other tokens.

    x [T, in]; a [S, R, in] (any strides; R may stack P parts' ranks); token_slot [T] int; slot_rank None
    or [S, P] int: A's lanes at or above a slot's rank in their part are padding, not read.
    """
    num_tokens, in_dim = x.shape
    num_slots, rank = a.shape[0], a.shape[1]
    block_k = min(tiles.shrink_k, triton.next_power_of_2(in_dim))
    # Columns per program: a whole number of steps (a partial step would add the next split's columns).
    k_chunk = triton.cdiv(min(tiles.k_chunk, in_dim), block_k) * block_k
    splits = triton.cdiv(in_dim, k_chunk)
    xa = torch.empty(splits, num_tokens, rank, dtype=torch.float32, device=x.device)
    ranks = token_slot if slot_rank is None else slot_rank  # a placeholder when there is none
    part_rank = rank if slot_rank is None else rank // slot_rank.shape[1]
    _lora_shrink_kernel[(triton.cdiv(num_tokens, tiles.block_m), splits)](
        x, a, xa, token_slot, ranks, num_tokens, rank, num_slots, part_rank, *x.stride(), *a.stride(),
        ranks.stride(0), ranks.stride(-1),
        IN_DIM=in_dim, K_CHUNK=k_chunk, HAS_RANK=slot_rank is not None,
        BLOCK_M=tiles.block_m, BLOCK_K=block_k,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), PRECISION=dot_precision(x.dtype),
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return xa
