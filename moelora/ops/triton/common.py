"""Pieces shared by the Triton kernels: grouped program order, the (expert, slot) bucket a program takes,
the sum of a shrink's input splits, the rank lanes a slot uses, the LoRA expand of a tile; the device's
SM count and whether it takes tensor descriptors (TMA)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from moelora.ops.expert_extras import ExpertExtras


@triton.jit
def after_previous(PDL: tl.constexpr):
    """A kernel launched as a programmatic dependent (`dependent_launch`: its programs may start while the
    kernel before it in the stream still runs) waits here until that kernel has finished and its writes
    are visible, then lets the next kernel's programs start. Every program of such a kernel calls it
    first, before it reads or writes anything: each kernel finishing only after the one before it keeps
    the stream's order transitive. Without PDL, nothing."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row block, column tile) of program `pid`, the column tiles of GROUP_M row blocks in turn: programs
    running together share their rows and (same expert) their weight tiles in L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def valid_slot(slot, num_slots):
    """The one adapter-slot guard of every kernel: each slot id as int32, every id outside [0, num_slots)
    (-1 for no adapter, or any id no slot holds) mapped to num_slots, the "no adapter" class. The range is
    checked before the narrowing, so that no wide id can wrap into range."""
    return tl.where((slot >= 0) & (slot < num_slots), slot, num_slots).to(tl.int32)


@triton.jit
def busy_bucket(busy_ptr, i, start_ptr, count_ptr, num_slots):
    """(expert e, slot s, first row, rows) of entry i of the alignment's busy list (a bucket of a slot that
    holds pairs; rows 0 past the list's end). Buckets sit at e * (num_slots + 1) + s."""
    bucket = tl.load(busy_ptr + i)
    used = bucket >= 0
    bucket = tl.where(used, bucket, 0)
    count = tl.where(used, tl.load(count_ptr + bucket), 0)
    return bucket // (num_slots + 1), bucket % (num_slots + 1), tl.load(start_ptr + bucket), count


@triton.jit
def sum_parts(ptrs, stride, mask, PARTS: tl.constexpr):
    """The fp32 tile at ptrs plus those at ptrs + p * stride for 0 < p < PARTS, added in that order (a
    shrink's input splits: the sum does not depend on timing)."""
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for p in range(1, PARTS):
        acc += tl.load(ptrs + p * stride, mask=mask, other=0.0)
    return acc


@triton.jit
def lanes_in_rank(r, rank, rank_ptr, s, HAS_RANK: tl.constexpr):
    """Which rank lanes r to read for slot s: below the buffers' rank and, when slot ranks are given
    (rank_ptr[s]), below the slot's own rounded up to 8 lanes; the lanes above the slot's rank hold zero
    padding. The rounding keeps the mask constant over 8 lanes (16 bytes of a 16-bit tensor), so loads
    along the lanes stay vectorised: a bound loaded at run time, unrounded, splits them into 2-byte loads."""
    ok = r < rank
    if HAS_RANK:
        ok = ok & (r < (tl.load(rank_ptr + s) + 7) // 8 * 8)
    return ok


@triton.jit
def stacked_lanes_in_rank(lane, ok, part_rank, rank_row_ptr, s_rp):
    """`ok` narrowed, for stacked parts' lanes (lane l: part l // part_rank's lane l % part_rank), to the
    lanes below their part's rank in the slot's row of ranks (rank_row_ptr[p * s_rp]) rounded up to 8, as
    `lanes_in_rank` rounds (the lanes above hold zero padding)."""
    own = tl.load(rank_row_ptr + (lane // part_rank) * s_rp, mask=ok, other=0)
    return ok & (lane % part_rank < (own + 7) // 8 * 8)


@triton.jit
def add_expand(acc, u, b_ptrs, b_mask, EXPAND: tl.constexpr, PRECISION: tl.constexpr):
    """acc += u @ b for fp32 LoRA intermediates u [BM, BR] and b [BR, BN] loaded in the weights' dtype.

    EXPAND (`tiles.expand_mode`): 0, fp32 weights: one fp32 dot at PRECISION. 1, 16-bit weights: u rounded
    to their dtype, one 16-bit dot (as PEFT computes a 16-bit LoRA: its intermediate is 16-bit too).
    2, 16-bit weights: u enters as two 16-bit parts, hi + lo, so the product keeps about 16 bits of u's
    mantissa (as the fp32 twin, to 2^-16) at twice the cost."""
    return dot_expand(acc, u, tl.load(b_ptrs, mask=b_mask, other=0.0), EXPAND, PRECISION)


@triton.jit
def dot_expand(acc, u, b, EXPAND: tl.constexpr, PRECISION: tl.constexpr):
    """acc += u @ b for a loaded b, as `add_expand` (EXPAND)."""
    if EXPAND == 0:
        acc = tl.dot(u, b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        hi = u.to(b.dtype)
        acc = tl.dot(hi, b, acc)
        if EXPAND == 2:
            acc = tl.dot((u - hi.to(tl.float32)).to(b.dtype), b, acc)
    return acc


@triton.jit
def slot_group_hit(slot, g0, num_slots, GROUP: tl.constexpr):
    """[BM, GROUP]: whether row m is on slot g0 + j (of the slots below num_slots), the group of
    `add_expand_slots` from slot g0."""
    sg = g0 + tl.arange(0, GROUP)
    return (slot[:, None] == sg[None, :]) & (sg < num_slots)[None, :]


@triton.jit
def slot_group_b(
    hit, g0, b_ptrs, n_ok, lane, rank, rank_ptr, sb_s, s_rs, HAS_RANK: tl.constexpr, GROUP: tl.constexpr
):
    """[GROUP * BR, BN]: the B tiles of slots g0..g0 + GROUP - 1 stacked (`add_expand_slots`' arguments),
    zeros for a slot no row is on (`slot_group_hit`: nothing read for it)."""
    sg = g0 + tl.arange(0, GROUP)
    present = tl.max(hit.to(tl.int32), axis=0) > 0
    # [GROUP, BR]: an absent slot's rank is read at slot 0 (in range), and its lanes masked off
    ok = lanes_in_rank(lane[None, :], rank, rank_ptr, tl.where(present, sg, 0)[:, None] * s_rs, HAS_RANK)
    ok = ok & present[:, None]
    group_ptrs = b_ptrs[None, :, :] + sg[:, None, None].to(tl.int64) * sb_s
    b = tl.load(group_ptrs, mask=ok[:, :, None] & n_ok[None, None, :], other=0.0)
    return tl.reshape(b, [GROUP * b_ptrs.shape[0], b_ptrs.shape[1]])


@triton.jit
def slot_group_dot(acc, xa, hit, b, EXPAND: tl.constexpr, PRECISION: tl.constexpr):
    """acc plus each row's xa @ its slot's B tile of a group (`slot_group_hit`, `slot_group_b`): xa spread
    into the row's slot's lanes, zeros elsewhere, so a row gets exactly its own slot's sum added."""
    u = tl.reshape(tl.where(hit[:, :, None], xa[:, None, :], 0.0), [xa.shape[0], b.shape[0]])
    return dot_expand(acc, u, b, EXPAND, PRECISION)


@triton.jit
def add_expand_slots(
    acc, xa, slot, b_ptrs, n_ok, lane, rank, rank_ptr, num_slots, sb_s, s_rs,
    HAS_RANK: tl.constexpr, GROUP: tl.constexpr, EXPAND: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """acc plus each row's xa @ b[s] for its slot s = slot[row] (num_slots: none, nothing added): xa
    [BM, BR] fp32; b_ptrs [BR, BN] slot 0's B tile (row q multiplies xa's column q), slot s's at
    + s * sb_s, its columns read where n_ok; lane [BR] the rank lane of each tile row, read as
    `lanes_in_rank` says for the slot (rank_ptr[s * s_rs] with HAS_RANK).

    The slots GROUP at a time: one masked load of the group's B tiles (a slot no row of the block has
    reads nothing) and one dot of xa spread into its slot's lanes (zeros elsewhere, so a row gets exactly
    its own slot's sum added), instead of a dependent load and dot per distinct slot: with 8 adapters in
    a block that chain was 8 DRAM latencies long. H100, Qwen3 shapes, 16 tokens on 8 adapters of rank 16
    (bench/linear.py): the one-launch q/k/v 25.8 -> 23.2 us, o 23.6 -> 22.6, cuBLAS + `lora_expand`
    50.1 -> 47.8 and 43.5 -> 40.8. The aligned MoE GEMMs keep their loop: there (rows slot-sorted, 2-4
    slots of a block) the groups measured slower (bench/moe_lora.py, LoRA delta at M = 512: 153 against
    116 us)."""
    g0 = tl.program_id(0) * 0  # a run-time value, whether num_slots is or not
    while g0 < num_slots:
        hit = slot_group_hit(slot, g0, num_slots, GROUP)
        if tl.max(tl.max(hit.to(tl.int32), axis=1), axis=0) > 0:
            b = slot_group_b(hit, g0, b_ptrs, n_ok, lane, rank, rank_ptr, sb_s, s_rs, HAS_RANK, GROUP)
            acc = slot_group_dot(acc, xa, hit, b, EXPAND, PRECISION)
        g0 += GROUP
    return acc


def slot_group(num_slots: int, tile_rows: int, lanes: int = 128) -> int:
    """Slots `add_expand_slots` takes at a time: a power of two, at most `lanes` B tile rows in one dot."""
    return max(1, min(triton.next_power_of_2(max(num_slots, 1)), lanes // tile_rows))


@triton.jit
def glu(gate, up, bias_ptr, n, n_ok, inter, limit, alpha, HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr):
    """The experts' activation of fp32 gate and up tiles over columns n: silu(gate) * up, or GPT-OSS's
    (`ExpertExtras`): gate and up biases (bias_ptr at the expert's row: gate's, then up's) and the
    clamped SwiGLU (up + 1) * g * sigmoid(alpha * g), g = min(gate, limit), up clamped to +-limit."""
    if HAS_BIAS:
        gate += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        up += tl.load(bias_ptr + inter + n, mask=n_ok, other=0.0).to(tl.float32)
    if CLAMPED:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return (up + 1.0) * (gate / (1.0 + tl.exp(-alpha * gate)))
    return gate / (1.0 + tl.exp(-gate)) * up


def extras_args(
    extras: ExpertExtras | None, fallback: torch.Tensor
) -> tuple[torch.Tensor, int, float, float]:
    """A gate/up kernel's view of `extras`: (bias or `fallback`, a placeholder never read; its expert stride;
    limit; alpha)."""
    bias = extras.b_gate_up if extras is not None else None
    swiglu = extras.swiglu if extras is not None and extras.swiglu is not None else (0.0, 0.0)
    if bias is None:
        return fallback, 0, *swiglu
    return bias, bias.stride(0), *swiglu


@dataclass(frozen=True)
class ScaleArgs:
    """A kernel's view of one projection's FP8 scales: the table (a placeholder, never read, without),
    its expert and row strides, and the group (a constexpr: 1 without)."""

    table: torch.Tensor
    strides: tuple[int, int]
    group: int

    @property
    def on(self) -> bool:
        """Whether the weights are FP8."""
        return self.group > 1


def scale_args(
    extras: ExpertExtras | None, fallback: torch.Tensor, which: str, block_k: int, w8a8: bool = False
) -> tuple[ScaleArgs, int]:
    """(the scales of projection `which` ("gate_up" or "down") in `extras`, the K step: `block_k`, at
    most the scales' group with FP8 weights, so that a step reads one scale a row; with `w8a8` (FP8
    activations, quantised per row and group) exactly one group)."""
    scales = extras.scales if extras is not None else None
    if scales is None:
        return ScaleArgs(fallback, (0, 0), 1), block_k
    table = scales.gate_up if which == "gate_up" else scales.down
    if table.stride(2) != 1:
        raise ValueError(f"FP8 {which} scales need unit stride over their groups, got {table.stride()}")
    args = ScaleArgs(table, (table.stride(0), table.stride(1)), scales.group)
    return args, scales.group if w8a8 else min(block_k, scales.group)


def num_blocks_grid(blocks: int, cols: int, block_n: int) -> tuple[int]:
    """The 1-D grid of a grouped GEMM over `blocks` row blocks and `cols` output columns."""
    return (blocks * triton.cdiv(cols, block_n),)


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; 132 (an H100/H200) for the interpreter's CPU tensors."""
    if device.type != "cuda":
        return 132
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


@triton.jit
def prefetch_l2(ptrs):
    """A hint (CUDA only, never in the interpreter): bring the lines at `ptrs` into L2; nothing waits for
    them and no register holds them."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


def dependent_launch(device: torch.device, on: bool) -> bool:
    """Whether a kernel on `device` is launched as a programmatic dependent of the one before it (`on`,
    the plan's `pdl`, and Hopper or newer): its programs start during that kernel's last ones and wait in
    `after_previous`, so a launch's start-up overlaps the tail of the launch before it."""
    return on and _hopper_or_newer(device)


@functools.cache
def _hopper_or_newer(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether kernels can read these 2-D tensors through tensor descriptors: Hopper or newer (the
    interpreter emulates them), rows contiguous and 16-byte aligned."""
    first = tensors[0].device
    if first.type == "cuda" and torch.cuda.get_device_capability(first)[0] < 9:
        return False
    return all(
        t.dim() == 2
        and t.stride(1) == 1
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
        for t in tensors
    )


def device_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """int32 values on `device` without waiting for the GPU (pinned staging buffer, async copy)."""
    host = torch.tensor(values, dtype=torch.int32)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
