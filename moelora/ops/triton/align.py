"""Token alignment in Triton: pairs grouped by local expert, slot-sorted, padded; fully parallel, no sync."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.plan import TUNED, KernelPlan
from moelora.ops.torch.align import align_sizes
from moelora.ops.triton.common import valid_slot

_PAIRS_PER_PROGRAM = 1024
_BLOCKS_PER_PROGRAM = 64


@triton.jit
def _count(
    p0, ids_ptr, slot_ptr, counts_ptr, bucket_ptr, rank_ptr, num_pairs, top_k, num_experts, num_slots,
    HAS_SLOT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Pairs [p0, p0 + BLOCK): each valid one takes the next free place in its (expert, slot class) bucket."""
    p = p0 + tl.arange(0, BLOCK)
    in_range = p < num_pairs
    # Range checks before any narrowing, so that no wide id can wrap into range.
    e = tl.load(ids_ptr + p, mask=in_range, other=-1)
    ok = in_range & (e >= 0) & (e < num_experts)
    cls = tl.full([BLOCK], 0, tl.int32) + num_slots
    if HAS_SLOT:
        s = tl.load(slot_ptr + p // top_k, mask=in_range, other=-1)
        cls = valid_slot(s, num_slots)
    bucket = tl.where(ok, e, 0).to(tl.int32) * (num_slots + 1) + cls
    rank = tl.atomic_add(counts_ptr + bucket, 1, mask=ok)
    tl.store(bucket_ptr + p, tl.where(ok, bucket, -1), mask=in_range)
    tl.store(rank_ptr + p, rank, mask=ok)


@triton.jit
def _count_kernel(
    ids_ptr, slot_ptr, counts_ptr, bucket_ptr, rank_ptr, num_pairs, top_k, num_experts, num_slots,
    HAS_SLOT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    _count(
        tl.program_id(0) * BLOCK, ids_ptr, slot_ptr, counts_ptr, bucket_ptr, rank_ptr, num_pairs, top_k,
        num_experts, num_slots, HAS_SLOT, BLOCK,
    )  # fmt: skip


@triton.jit
def _prefix(
    counts_ptr, start_ptr, seg_ptr, busy_ptr, num_experts, classes, block_m, num_busy,
    E_PAD: tl.constexpr, C_PAD: tl.constexpr, BUSY_PAD: tl.constexpr,
):  # fmt: skip
    """Bucket starts (experts padded to block_m, classes in order inside each expert), segment ends, the
    busy list. The counts are read past L1 (.cg): atomics counted them."""
    e = tl.arange(0, E_PAD)
    c = tl.arange(0, C_PAD)
    ok = (e[:, None] < num_experts) & (c[None, :] < classes)
    idx = e[:, None] * classes + c[None, :]
    cnt = tl.load(counts_ptr + idx, mask=ok, other=0, cache_modifier=".cg")
    total = tl.sum(cnt, axis=1)
    padded = (total + block_m - 1) // block_m * block_m
    seg_end = tl.cumsum(padded, axis=0)
    seg_start = seg_end - padded
    tl.store(start_ptr + idx, seg_start[:, None] + tl.cumsum(cnt, axis=1) - cnt, mask=ok)
    tl.store(seg_ptr + e, seg_end, mask=e < num_experts)
    tl.store(seg_ptr + E_PAD + e, seg_start + total, mask=e < num_experts)
    # The non-empty buckets of slots (class < S), in bucket order, then -1 up to num_busy.
    busy = (ok & (c[None, :] < classes - 1) & (cnt > 0)).to(tl.int32)
    per_expert = tl.sum(busy, axis=1)
    pos = (tl.cumsum(per_expert, axis=0) - per_expert)[:, None] + tl.cumsum(busy, axis=1) - busy
    tl.store(busy_ptr + pos, idx, mask=busy > 0)
    q = tl.arange(0, BUSY_PAD)
    tl.store(busy_ptr + q, -1, mask=(q >= tl.sum(per_expert, axis=0)) & (q < num_busy))


@triton.jit
def _prefix_kernel(
    counts_ptr, start_ptr, seg_ptr, busy_ptr, num_experts, classes, block_m, num_busy,
    E_PAD: tl.constexpr, C_PAD: tl.constexpr, BUSY_PAD: tl.constexpr,
):  # fmt: skip
    # One program.
    _prefix(counts_ptr, start_ptr, seg_ptr, busy_ptr, num_experts, classes, block_m, num_busy, E_PAD, C_PAD,
            BUSY_PAD)  # fmt: skip


@triton.jit
def _scatter_pairs(p0, bucket_ptr, rank_ptr, start_ptr, sorted_ptr, num_pairs, BLOCK: tl.constexpr):
    """Pairs [p0, p0 + BLOCK) to their bucket's next rows."""
    p = p0 + tl.arange(0, BLOCK)
    in_range = p < num_pairs
    bucket = tl.load(bucket_ptr + p, mask=in_range, other=-1, cache_modifier=".cg")
    ok = in_range & (bucket >= 0)
    rank = tl.load(rank_ptr + p, mask=ok, other=0, cache_modifier=".cg")
    start = tl.load(start_ptr + bucket, mask=ok, other=0, cache_modifier=".cg")
    tl.store(sorted_ptr + start + rank, p, mask=ok)


@triton.jit
def _scatter_blocks(
    b0, seg_ptr, sorted_ptr, block_expert_ptr, num_pairs, num_blocks, num_experts,
    BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr,
):  # fmt: skip
    """Blocks [b0, b0 + BLOCKS): their expert (the first whose segment ends past the block), and the
    sentinel in every row past the expert's pairs (rows disjoint from those `_scatter_pairs` writes)."""
    b = b0 + tl.arange(0, BLOCKS)
    b_ok = b < num_blocks
    e = tl.arange(0, E_PAD)
    seg_end = tl.load(seg_ptr + e, mask=e < num_experts, other=2147483647, cache_modifier=".cg")
    row0 = b * BLOCK_M
    expert = tl.sum((seg_end[None, :] <= row0[:, None]).to(tl.int32), axis=1)
    used = expert < num_experts
    tl.store(block_expert_ptr + b, tl.where(used, expert, -1), mask=b_ok)
    fill_end = tl.load(seg_ptr + E_PAD + expert, mask=b_ok & used, other=0, cache_modifier=".cg")
    rows = row0[:, None] + tl.arange(0, BLOCK_M)[None, :]
    pad = b_ok[:, None] & (rows >= fill_end[:, None])
    tl.store(sorted_ptr + rows, tl.full([BLOCKS, BLOCK_M], 0, tl.int32) + num_pairs, mask=pad)


@triton.jit
def _scatter_kernel(
    bucket_ptr, rank_ptr, start_ptr, seg_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, num_blocks, num_experts,
    BLOCK: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    _scatter_pairs(pid * BLOCK, bucket_ptr, rank_ptr, start_ptr, sorted_ptr, num_pairs, BLOCK)
    _scatter_blocks(pid * BLOCKS, seg_ptr, sorted_ptr, block_expert_ptr, num_pairs, num_blocks, num_experts,
                    BLOCKS, BLOCK_M, E_PAD)  # fmt: skip


@triton.jit
def _align_one_kernel(
    ids_ptr, slot_ptr, counts_ptr, bucket_ptr, rank_ptr, start_ptr, seg_ptr, busy_ptr, sorted_ptr,
    block_expert_ptr, num_pairs, top_k, num_experts, num_slots, classes, block_m, num_busy, num_blocks,
    HAS_SLOT: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr, C_PAD: tl.constexpr, BUSY_PAD: tl.constexpr,
):  # fmt: skip
    """The four launches of `moe_align_buckets` in one program, for at most BLOCK pairs: the counts zeroed,
    the pairs counted, the prefix sums, the scatter; a barrier between phases (each reads what the one
    before wrote, past L1)."""
    e = tl.arange(0, E_PAD)
    c = tl.arange(0, C_PAD)
    zero = (e[:, None] < num_experts) & (c[None, :] < classes)
    tl.store(counts_ptr + e[:, None] * classes + c[None, :], tl.zeros([E_PAD, C_PAD], tl.int32), mask=zero)
    tl.debug_barrier()
    _count(0, ids_ptr, slot_ptr, counts_ptr, bucket_ptr, rank_ptr, num_pairs, top_k, num_experts, num_slots,
           HAS_SLOT, BLOCK)  # fmt: skip
    tl.debug_barrier()
    _prefix(counts_ptr, start_ptr, seg_ptr, busy_ptr, num_experts, classes, block_m, num_busy, E_PAD, C_PAD,
            BUSY_PAD)  # fmt: skip
    tl.debug_barrier()
    _scatter_pairs(0, bucket_ptr, rank_ptr, start_ptr, sorted_ptr, num_pairs, BLOCK)
    b0 = 0
    while b0 < num_blocks:  # (a `while`: the interpreter runs no `range` over a run-time bound)
        _scatter_blocks(b0, seg_ptr, sorted_ptr, block_expert_ptr, num_pairs, num_blocks, num_experts, BLOCKS,
                        BLOCK_M, E_PAD)  # fmt: skip
        b0 += BLOCKS


def moe_align(
    local_ids: torch.Tensor,
    token_slot: torch.Tensor | None,
    num_experts: int,
    num_slots: int,
    block_m: int,
    plan: KernelPlan = TUNED,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and Semantics as `moelora.ops.torch.align.moe_align`; `plan`: the kernel choices."""
    return moe_align_buckets(local_ids, token_slot, num_experts, num_slots, block_m, plan)[:2]


def busy_size(num_pairs: int, num_experts: int, num_slots: int) -> int:
    """Length of `moe_align_buckets`' busy list: at most this many buckets of slots hold pairs."""
    return max(1, min(num_pairs, num_experts * num_slots))


def moe_align_buckets(
    local_ids: torch.Tensor,
    token_slot: torch.Tensor | None,
    num_experts: int,
    num_slots: int,
    block_m: int,
    plan: KernelPlan = TUNED,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe_align`'s (sorted_pairs, block_expert), then each (expert e, slot class c) bucket's first row
    and number of pairs, bucket_start and bucket_count [E * (S + 1)] int32 at e * (S + 1) + c, and busy
    [`busy_size`] int32: the index e * (S + 1) + s of each bucket of a slot s in [0, S) that holds pairs,
    in index order, then -1 (the LoRA kernels run one program per entry, not per bucket).

    Four launches: zero the bucket counts, count (atomics give each pair its place in its bucket), one
    program of prefix sums, scatter (pairs to rows, sentinels, block experts); one program doing all four
    for a decode step's few pairs where the plan says (`KernelPlan.align_one_launch`). Every size comes
    from the shapes, so it is CUDA-graph safe.
    """
    num_tokens, top_k = local_ids.shape
    num_pairs = num_tokens * top_k
    rows, blocks = align_sizes(num_pairs, num_experts, block_m)
    dev = local_ids.device
    ids = local_ids.contiguous()
    classes = num_slots + 1
    e_pad, c_pad = triton.next_power_of_2(num_experts), triton.next_power_of_2(classes)
    one = plan.align_one_launch and num_pairs <= _PAIRS_PER_PROGRAM
    counts = (torch.empty if one else torch.zeros)(num_experts * classes, dtype=torch.int32, device=dev)
    bucket = torch.empty(num_pairs, dtype=torch.int32, device=dev)
    rank = torch.empty(num_pairs, dtype=torch.int32, device=dev)
    slot = token_slot.contiguous() if token_slot is not None else ids
    start = torch.empty_like(counts)
    seg = torch.empty(2, e_pad, dtype=torch.int32, device=dev)  # segment ends, ends of the real rows
    num_busy = busy_size(num_pairs, num_experts, num_slots)
    busy = torch.empty(num_busy, dtype=torch.int32, device=dev)
    sorted_pairs = torch.empty(rows, dtype=torch.int32, device=dev)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=dev)
    busy_pad = triton.next_power_of_2(num_busy)
    if one:
        _align_one_kernel[(1,)](
            ids, slot, counts, bucket, rank, start, seg, busy, sorted_pairs, block_expert, num_pairs, top_k,
            num_experts, num_slots, classes, block_m, num_busy, blocks,
            HAS_SLOT=token_slot is not None, BLOCK=max(16, triton.next_power_of_2(num_pairs)),
            BLOCKS=_BLOCKS_PER_PROGRAM, BLOCK_M=block_m, E_PAD=e_pad, C_PAD=c_pad, BUSY_PAD=busy_pad,
        )  # fmt: skip
        return sorted_pairs, block_expert, start, counts, busy
    _count_kernel[(triton.cdiv(num_pairs, _PAIRS_PER_PROGRAM),)](
        ids, slot, counts, bucket, rank, num_pairs, top_k, num_experts, num_slots,
        HAS_SLOT=token_slot is not None, BLOCK=_PAIRS_PER_PROGRAM,
    )  # fmt: skip
    _prefix_kernel[(1,)](
        counts, start, seg, busy, num_experts, classes, block_m, num_busy,
        E_PAD=e_pad, C_PAD=c_pad, BUSY_PAD=busy_pad,
    )  # fmt: skip
    grid = (max(triton.cdiv(num_pairs, _PAIRS_PER_PROGRAM), triton.cdiv(blocks, _BLOCKS_PER_PROGRAM)),)
    _scatter_kernel[grid](
        bucket, rank, start, seg, sorted_pairs, block_expert, num_pairs, blocks, num_experts,
        BLOCK=_PAIRS_PER_PROGRAM, BLOCKS=_BLOCKS_PER_PROGRAM, BLOCK_M=block_m, E_PAD=e_pad,
    )  # fmt: skip
    return sorted_pairs, block_expert, start, counts, busy
