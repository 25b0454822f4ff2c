"""LoRA shrink of the decode path, once per (token, choice) pair, split along its input into partial sums."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.triton.common import lanes_in_rank
from moelora.ops.triton.decode_common import fma_step, pair_expert, pair_slot

_SHRINK_CHUNK = 256  # input columns per program
_SHRINK_K = 64


@triton.jit
def _decode_shrink_kernel(
    in_ptr, ids_ptr, slot_ptr, a_ptr, out_ptr, rank_ptr,
    top_k, num_experts, rank, num_slots, num_pairs,
    s_in_row, s_in_k, s_id_t, s_id_k, sa_s, sa_e, sa_h, sa_r, sa_k,
    IN_DIM: tl.constexpr, HALVES: tl.constexpr, GATHER: tl.constexpr, K_CHUNK: tl.constexpr,
    HAS_RANK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # out[split, p, j] = part of a[s, e, j // rank, j % rank] @ in[row] over this split's columns.
    p = tl.program_id(0)
    split = tl.program_id(1)
    t, e, runs = pair_expert(ids_ptr, p, top_k, s_id_t, s_id_k, num_experts)
    s, on = pair_slot(slot_ptr, t, num_slots, True)
    e64 = tl.where(runs, e, 0).to(tl.int64)
    j = tl.arange(0, BLOCK_R)
    j_ok = (j < HALVES * rank) & on & runs
    j_ok = j_ok & lanes_in_rank(j % rank, rank, rank_ptr, s, HAS_RANK)
    row = t if GATHER else p
    kk = split * K_CHUNK + tl.arange(0, BLOCK_K)
    a_ptrs = (
        a_ptr + s * sa_s + e64 * sa_e + ((j // rank) * sa_h + (j % rank) * sa_r)[:, None] + kk[None, :] * sa_k
    )
    in_ptrs = in_ptr + row.to(tl.int64) * s_in_row + kk * s_in_k
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K_CHUNK, BLOCK_K):
        k_ok = kk + k0 < IN_DIM
        v = tl.load(in_ptrs + k0 * s_in_k, mask=k_ok & on & runs, other=0.0).to(tl.float32)
        acc = fma_step(acc, a_ptrs + k0 * sa_k, j_ok[:, None] & k_ok[None, :], v)
    dst = out_ptr + (split * num_pairs + p).to(tl.int64) * (HALVES * rank) + j
    tl.store(dst, tl.sum(acc, axis=1), mask=j < HALVES * rank)


def decode_shrink(
    inp: torch.Tensor,
    local_ids: torch.Tensor,
    slot: torch.Tensor,
    a: torch.Tensor,
    gather: bool,
    slot_rank: torch.Tensor | None = None,
) -> torch.Tensor:
    """-> [splits, pairs, halves * R] fp32 partial sums of a[s, e, half] @ inp[row] (row: the pair's token
    if `gather`, else the pair itself); zeros for pairs without a valid slot or expert. slot_rank [S] or
    None: A's rank lanes at or above it are padding, not read."""
    a5 = a if a.dim() == 5 else a.unsqueeze(2)
    num_slots, num_experts, halves, rank, in_dim = a5.shape
    num_pairs = local_ids.numel()
    block_k = min(_SHRINK_K, triton.next_power_of_2(in_dim))
    chunk = triton.cdiv(min(_SHRINK_CHUNK, in_dim), block_k) * block_k  # whole steps per program
    splits = triton.cdiv(in_dim, chunk)
    out = torch.empty(splits, num_pairs, halves * rank, dtype=torch.float32, device=inp.device)
    _decode_shrink_kernel[(num_pairs, splits)](
        inp, local_ids, slot, a5, out, slot if slot_rank is None else slot_rank,
        local_ids.shape[1], num_experts, rank, num_slots, num_pairs,
        *inp.stride(), *local_ids.stride(), *a5.stride(),
        IN_DIM=in_dim, HALVES=halves, GATHER=gather, K_CHUNK=chunk, HAS_RANK=slot_rank is not None,
        BLOCK_K=block_k, BLOCK_R=max(16, triton.next_power_of_2(halves * rank)),
    )  # fmt: skip
    return out
