"""Each Triton kernel against its PyTorch twin, with invalid expert ids and slots mixed in.

Without CUDA they run in Triton's interpreter (tiny shapes, fp32/fp16: bf16 `tl.dot` is broken there).
`TRITON_INTERPRET` must be set before `triton.language` is imported: tests/conftest.py sets it; the line
below covers running this file with another conftest. Loop bounds are constexpr in the kernels, since the
interpreter (with numpy >= 2.4) cannot take a run-time integer as a `range` bound.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from moelora import LLM, SamplingParams, ops  # noqa: E402
from moelora.demo import demo_adapter_paths  # noqa: E402
from moelora.ops.expert_extras import ExpertExtras, ExpertScales  # noqa: E402
from moelora.ops.expert_lora import ExpertLora  # noqa: E402
from moelora.ops.plan import TUNED, KernelPlan, LoraTiles, Tiles  # noqa: E402
from moelora.ops.torch import align as torch_align  # noqa: E402
from moelora.ops.torch import lora as torch_lora  # noqa: E402
from moelora.ops.torch import moe as torch_moe  # noqa: E402
from moelora.ops.torch import router as torch_router  # noqa: E402
from moelora.ops.torch.fp8 import quantize_rows  # noqa: E402
from moelora.ops.triton import align as triton_align  # noqa: E402
from moelora.ops.triton import lora as triton_lora  # noqa: E402
from moelora.ops.triton import moe as triton_moe  # noqa: E402
from moelora.ops.triton import router as triton_router  # noqa: E402
from moelora.ops.triton import tiles as tile_table  # noqa: E402
from moelora.ops.triton.decode_common import fp8_step  # noqa: E402
from moelora.ops.triton.fp8_act import quantize_activations  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rand(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(DEV)


def pick(g: torch.Generator, choices: list[int], *shape: int) -> torch.Tensor:
    c = torch.tensor(choices)
    return c[torch.randint(0, len(c), shape, generator=g)].to(torch.int32).to(DEV)


def expert_ids(g: torch.Generator, num_tokens: int, k: int, e_loc: int, empty: int) -> torch.Tensor:
    """Local ids with the invalid ones of the op contract mixed in; expert `empty` is never chosen."""
    valid = [e for e in range(e_loc) if e != empty]
    return pick(g, [-1, -7, e_loc, e_loc + 3, *valid, *valid], num_tokens, k)


def slots(g: torch.Generator, num_tokens: int, num_slots: int) -> torch.Tensor:
    return pick(g, [-1, -4, num_slots, num_slots + 2, *range(num_slots), *range(num_slots)], num_tokens)


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Max error relative to the reference's largest entry (LoRA deltas and sums mix magnitudes)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= tol * max(1.0, ref.double().abs().max().item()), err


def canonical(sorted_pairs: torch.Tensor, block_expert: torch.Tensor, cls: torch.Tensor) -> list[list[int]]:
    """Each expert segment's pairs sorted by (slot class, pair), the order the contract leaves free."""
    bm = sorted_pairs.numel() // block_expert.numel()
    out = []
    for e in block_expert.unique_consecutive().tolist():
        rows = (block_expert == e).repeat_interleave(bm)
        seg = sorted_pairs[rows].tolist()
        key = [(cls[p], p) if p < len(cls) else (1 << 30, p) for p in seg]
        assert [k[0] for k in key] == sorted(k[0] for k in key), "segment not sorted by slot class"
        out.append([e, *(p for _, p in sorted(key))])
    return out


@pytest.mark.parametrize(
    ("num_tokens", "k", "e_loc", "num_slots", "block_m"),
    [(1, 2, 4, 3, 16), (7, 3, 5, 0, 16), (45, 4, 6, 4, 16), (300, 2, 3, 2, 64), (200, 8, 100, 16, 16)],
)
@pytest.mark.parametrize("one_launch", [False, True])
def test_align_matches_twin(
    num_tokens: int, k: int, e_loc: int, num_slots: int, block_m: int, one_launch: bool
):
    """The alignment against the twin; `one_launch`: in one program where the case has at most 1,024 pairs
    (`KernelPlan.align_one_launch`; the last case has more and keeps the four launches), its buckets, busy
    list and blocks equal to the four launches'."""
    g = torch.Generator().manual_seed(num_tokens * 31 + k)
    ids = expert_ids(g, num_tokens, k, e_loc, empty=1)
    slot = slots(g, num_tokens, num_slots) if num_slots else None
    plan = KernelPlan(align_one_launch=one_launch)
    got = triton_align.moe_align(ids, slot, e_loc, num_slots, block_m, plan)
    ref = torch_align.moe_align(ids.cpu(), None if slot is None else slot.cpu(), e_loc, num_slots, block_m)
    assert torch.equal(got[1].cpu(), ref[1])
    cls = [num_slots] * (num_tokens * k)
    if slot is not None:
        cls = [s if 0 <= s < num_slots else num_slots for s in slot.cpu().repeat_interleave(k).tolist()]
    assert canonical(got[0].cpu(), got[1].cpu(), torch.tensor(cls)) == canonical(*ref, torch.tensor(cls))
    assert torch.equal(
        got[0].cpu()[ref[1].repeat_interleave(block_m) < 0], ref[0][ref[1].repeat_interleave(block_m) < 0]
    )
    valid = ((ids >= 0) & (ids < e_loc)).sum().item()
    assert (ref[0] < num_tokens * k).sum().item() == valid
    # The busy list: each bucket of a slot that holds pairs, in bucket order, then -1.
    _, blocks, start, count, busy = triton_align.moe_align_buckets(ids, slot, e_loc, num_slots, block_m, plan)
    classes = torch.arange(count.numel()) % (num_slots + 1)
    want = ((count.cpu() > 0) & (classes < num_slots)).nonzero().squeeze(1).tolist()
    assert busy.cpu().tolist() == want + [-1] * (busy.numel() - len(want))
    if one_launch:
        four = triton_align.moe_align_buckets(ids, slot, e_loc, num_slots, block_m, KernelPlan())
        for mine, theirs in zip((blocks, start, count, busy), four[1:], strict=True):
            assert torch.equal(mine, theirs)


def moe_weights(g: torch.Generator, e_loc: int, hidden: int, inter: int, dtype: torch.dtype):
    w_gu = rand(g, e_loc, 2 * inter, hidden, scale=hidden**-0.5).to(dtype)
    w_dn = rand(g, e_loc, hidden, inter, scale=inter**-0.5).to(dtype)
    return w_gu, w_dn


def lora_buffers(
    g: torch.Generator, num_slots: int, e_loc: int, hidden: int, inter: int, rank: int, dtype
) -> ExpertLora:
    a_gu = rand(g, num_slots, e_loc, 2, rank, hidden, scale=hidden**-0.5)
    b_gu = rand(g, num_slots, e_loc, 2, inter, rank, scale=rank**-0.5)
    a_dn = rand(g, num_slots, e_loc, rank, inter, scale=inter**-0.5)
    b_dn = rand(g, num_slots, e_loc, hidden, rank, scale=rank**-0.5)
    # Slot 1 holds a lower-rank adapter, zero-padded to the buffers' rank.
    low = max(1, rank // 2)
    for a, b in ((a_gu, b_gu), (a_dn, b_dn)):
        a[1, ..., low:, :] = 0
        b[1, ..., low:] = 0
    return ExpertLora(*(t.to(dtype) for t in (a_gu, b_gu, a_dn, b_dn)))


def lanes_read(rank: int) -> int:
    """The rank lanes a kernel may read for a slot of this rank (`common.lanes_in_rank`: up to 8 lanes
    of zero padding past it, so the loads stay 16-byte vectors)."""
    return -(-rank // 8) * 8


CPU_CASES = [
    # (T, k, E_loc, H, I, dtype): T = 1, T not a multiple of any block, rows per expert over 64.
    (1, 2, 4, 32, 48, torch.float32),
    (37, 3, 5, 32, 80, torch.float32),
    (13, 2, 4, 64, 32, torch.float16),
    (70, 4, 2, 32, 48, torch.float32),
]
CPU_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def moe_inputs(case, seed: int):
    num_tokens, k, e_loc, hidden, inter, dtype = case
    g = torch.Generator().manual_seed(seed)
    x = rand(g, num_tokens, hidden).to(dtype)
    w_gu, w_dn = moe_weights(g, e_loc, hidden, inter, dtype)
    ids = expert_ids(g, num_tokens, k, e_loc, empty=e_loc - 1)
    weights = torch.rand(num_tokens, k, generator=g).to(DEV).to(dtype)
    return g, x, w_gu, w_dn, ids, weights


def gpt_oss_extras(g: torch.Generator, case, down_bias: bool = True) -> ExpertExtras:
    """GPT-OSS's expert biases (the down bias only where `down_bias`: one rank per intermediate split
    adds it) and a clamped SwiGLU whose limit cuts through the random gate and up values."""
    _, _, e_loc, hidden, inter, dtype = case
    b_gate_up = rand(g, e_loc, 2 * inter, scale=0.5).to(dtype)
    b_down = rand(g, e_loc, hidden, scale=0.5).to(dtype) if down_bias else None
    return ExpertExtras(b_gate_up, b_down, (0.7, 1.702))


def fp8_experts(
    w_gu: torch.Tensor, w_dn: torch.Tensor, ext: ExpertExtras | None, group: int
) -> tuple[torch.Tensor, torch.Tensor, ExpertExtras]:
    """The weights in FP8 with their scales per row and `group` columns, added to `ext`."""
    (q_gu, s_gu), (q_dn, s_dn) = quantize_rows(w_gu, group), quantize_rows(w_dn, group)
    base = ext if ext is not None else ExpertExtras(None, None, None)
    return q_gu, q_dn, replace(base, scales=ExpertScales(s_gu, s_dn, group))


def plan_w8a8(case, plan: KernelPlan, fp8_group: int) -> bool:
    """Whether `plan` multiplies the case's FP8 experts by FP8 activations (the aligned path, from the
    plan's `fp8_activation_rows`)."""
    num_tokens, k, e_loc = case[:3]
    pairs = num_tokens * k
    decode = tile_table.use_decode_path(pairs, e_loc, k, plan)
    return not decode and tile_table.fp8_activations(pairs, e_loc, fp8_group, case[5], plan)


def check_fused_moe(
    case,
    seed: int,
    plan: KernelPlan = TUNED,
    extras: bool = False,
    fp8_group: int = 0,
    w8a8: bool | None = None,
) -> None:
    """`w8a8`: the plan multiplies FP8 weights by FP8 activations (checked to be visible), the twin
    quantises them the same way; None: as the plan decides."""
    g, x, w_gu, w_dn, ids, weights = moe_inputs(case, seed)
    ext = gpt_oss_extras(g, case, down_bias=seed % 2 == 0) if extras else None
    if fp8_group:
        w_gu, w_dn, ext = fp8_experts(w_gu, w_dn, ext, fp8_group)
    forced, w8a8 = w8a8, plan_w8a8(case, plan, fp8_group) if w8a8 is None else w8a8
    out = triton_moe.fused_moe(x, w_gu, w_dn, ids, weights, plan, ext)
    ref = torch_moe.fused_moe(x, w_gu, w_dn, ids, weights, ext, fp8_activations=w8a8)
    assert_close(out, ref, CPU_TOL[x.dtype])
    if forced:
        w8a16 = torch_moe.fused_moe(x, w_gu, w_dn, ids, weights, ext)
        assert (ref - w8a16).abs().max() > 3 * CPU_TOL[x.dtype], "FP8 activations must be visible"
    if extras and not fp8_group:
        plain = torch_moe.fused_moe(x, w_gu, w_dn, ids, weights)
        assert (ref - plain).abs().max() > 10 * CPU_TOL[x.dtype], "the extras must be visible"


def check_fused_moe_lora(
    case,
    seed: int,
    num_slots: int,
    rank: int,
    plan: KernelPlan = TUNED,
    extras: bool = False,
    fp8_group: int = 0,
    w8a8: bool | None = None,
) -> None:
    """`w8a8` as `check_fused_moe`'s."""
    g, x, w_gu, w_dn, ids, weights = moe_inputs(case, seed)
    bufs = lora_buffers(g, num_slots, case[2], case[3], case[4], rank, x.dtype)
    slot = slots(g, x.shape[0], num_slots)
    ext = gpt_oss_extras(g, case, down_bias=seed % 2 == 0) if extras else None
    if fp8_group:
        w_gu, w_dn, ext = fp8_experts(w_gu, w_dn, ext, fp8_group)
    w8a8 = plan_w8a8(case, plan, fp8_group) if w8a8 is None else w8a8
    out = triton_moe.fused_moe_lora(x, w_gu, w_dn, ids, weights, slot, bufs, plan=plan, extras=ext)
    ref = torch_lora.fused_moe_lora(x, w_gu, w_dn, ids, weights, slot, bufs, ext, fp8_activations=w8a8)
    assert_close(out, ref, CPU_TOL[x.dtype])
    base = torch_moe.fused_moe(x, w_gu, w_dn, ids, weights, ext, fp8_activations=w8a8)
    assert (ref - base).abs().max() > 10 * CPU_TOL[x.dtype], "the LoRA delta must be visible"
    # Given each slot's rank, the kernels must not read the padding past the lanes they may read: NaN
    # there changes nothing (a NaN read on either side, shrink or expand, would reach the output through
    # the dot products).
    slot_rank = torch.full((num_slots,), rank, dtype=torch.int32, device=DEV)
    slot_rank[1] = max(1, rank // 2)
    noisy = ExpertLora(bufs.a_gu.clone(), bufs.b_gu.clone(), bufs.a_dn.clone(), bufs.b_dn.clone(), slot_rank)
    for a, b in ((noisy.a_gu, noisy.b_gu), (noisy.a_dn, noisy.b_dn)):
        a[1, ..., lanes_read(rank // 2) :, :] = float("nan")
        b[1, ..., lanes_read(rank // 2) :] = float("nan")
    got = triton_moe.fused_moe_lora(x, w_gu, w_dn, ids, weights, slot, noisy, plan, ext)
    assert_close(got, ref, CPU_TOL[x.dtype])


BIG = Tiles(16, 32, 32, 4, 2, down_n=64, down_stages=2, tma_down=True)  # the large batches' tiles, tiny


@pytest.fixture(params=["aligned", "split", "persistent", "decode"])
def path(request) -> KernelPlan:
    """Every MoE path on every case: the aligned grouped GEMMs, with the LoRA shrinks' input in one piece
    (the rule's splits) or split in up to 3 (16-column steps, so the tiny shapes split, a last split
    part-filled) and the down shrink in the gate/up GEMM's epilogue, or with the large batches' TMA-fed
    down GEMM (persistent without LoRA: 3 programs over all tiles; 32-column K steps, so I is not a whole
    number of them), and the alignment-free decode GEMVs up to 32 (token, choice) pairs, what the shipped
    rule sends them for up to 256 experts (`use_decode_path`); cases with more take the aligned path
    there (in the interpreter the 111 and 280 pairs of cases 1 and 3 on the decode GEMVs took 30 s a test)."""
    decode = request.param == "decode"
    plan = KernelPlan(decode_pairs=32 if decode else 0, down_shrink_in_gate_up=False)
    if request.param == "persistent":
        plan = replace(plan, moe_table=((float("inf"), BIG, BIG),), persistent_programs=3)
    if request.param == "split":  # (the shape rule would put the tiny cases' down expand apart)
        plan = replace(
            plan, shrink_splits=3, down_shrink_in_gate_up=True, down_expand_apart=False, shrink_k=16
        )
    return plan


@pytest.mark.parametrize("case", [CPU_CASES[0], CPU_CASES[2]])
def test_decode_gemv_a_step_ahead(case):
    """The decode GEMVs (gate/up and down) with each step's loads issued while the step before is multiplied
    (`decode_common.ahead_mode`) and without: the twin's result in 16 bits and with FP8 weights (scale
    groups of 16: steps in one group, and steps over groups summed apart). Case 2: H = 64 in steps of 256
    columns, a step past the input fully masked. With LoRA (`lora_ahead`) as well."""
    from moelora.ops.triton.decode_common import ahead_mode

    for ahead, (fp8_group, steps) in itertools.product((False, True), ((0, 0), (16, 0), (16, 1024))):
        tiles = dict(ahead=ahead, fp8_ahead=ahead, fp8_block_k=steps, lora_ahead=False)
        gate_up = replace(TUNED.decode_tiles, **tiles)
        down = replace(TUNED.decode_down_tiles, **tiles)
        plan = KernelPlan(decode_pairs=32, decode_tiles=gate_up, decode_down_tiles=down)
        step = steps or fp8_group
        assert ahead_mode(gate_up, fp8_group > 0, fp8_group, step, 2 if steps else 1, False) == ahead
        assert not ahead_mode(gate_up, fp8_group > 0, fp8_group, step, 1, True)  # LoRA: `lora_ahead` too
        check_fused_moe(case, seed=case[0] + 3, plan=plan, fp8_group=fp8_group)
    for ahead in (False, True):  # with LoRA: its tiles loaded after the loop where it goes ahead
        tiles = dict(ahead=ahead, fp8_ahead=ahead, lora_ahead=ahead)
        assert ahead_mode(replace(TUNED.decode_tiles, **tiles), False, 1, 256, 0, True) == ahead
        plan = KernelPlan(
            decode_pairs=32,
            decode_tiles=replace(TUNED.decode_tiles, **tiles),
            decode_down_tiles=replace(TUNED.decode_down_tiles, **tiles),
        )
        check_fused_moe_lora(case, seed=case[0] + 4, num_slots=4, rank=8, plan=plan)


@pytest.mark.parametrize("case", CPU_CASES)
def test_fused_moe_matches_twin(case, path: KernelPlan):
    check_fused_moe(case, seed=case[0], plan=path)


@pytest.mark.parametrize("case", [CPU_CASES[1], CPU_CASES[3]])
def test_fused_moe_lora_with_the_alignment_in_one_program(case):
    """The aligned path with LoRA, its alignment in one program (`align_one_launch`; 111 and 280 pairs),
    against the twin."""
    plan = KernelPlan(decode_pairs=0, align_one_launch=True)
    check_fused_moe_lora(case, seed=case[0] + 1, num_slots=3, rank=8, plan=plan)


@pytest.mark.parametrize(
    ("case", "rank"), [(CPU_CASES[0], 4), (CPU_CASES[1], 24), (CPU_CASES[2], 16), (CPU_CASES[3], 4)]
)
def test_fused_moe_lora_matches_twin(case, rank: int, path: KernelPlan):
    check_fused_moe_lora(case, seed=case[0] + 1, num_slots=3, rank=rank, plan=path)


@pytest.mark.parametrize(("case", "seed"), [(CPU_CASES[0], 4), (CPU_CASES[1], 5), (CPU_CASES[2], 6)])
def test_gpt_oss_extras_match_twin(case, seed: int, path: KernelPlan):
    """GPT-OSS's biased experts with the clamped SwiGLU on every path, without and with LoRA (the down bias
    on even seeds only, as on the ranks that do not add it), invalid ids and slots mixed in."""
    check_fused_moe(case, seed, path, extras=True)
    check_fused_moe_lora(case, seed, num_slots=3, rank=8, plan=path, extras=True)


@pytest.mark.parametrize(("case", "group"), [(CPU_CASES[0], 16), (CPU_CASES[1], 32), (CPU_CASES[2], 16)])
def test_fp8_experts_match_twin(case, group: int, path: KernelPlan):
    """FP8 expert weights with a scale per row and group of input columns (a partial last group where
    the group does not divide H or I) on every path, without and with LoRA, invalid ids and slots mixed
    in: the kernels' products (W8A16: activations unquantised) equal the twin's on the dequantised
    weights."""
    w8a16 = replace(path, fp8_activation_rows=None)
    check_fused_moe(case, case[0] + 2, w8a16, fp8_group=group, w8a8=False)
    check_fused_moe_lora(case, case[0] + 3, num_slots=3, rank=8, plan=w8a16, fp8_group=group, w8a8=False)


def test_fp8_decode_step_rule():
    """`DecodeTiles.fp8_block_k` is taken where it is a power-of-two multiple of the scale group, capped at
    the input rounded up to a power of two; else the step stays one group (the launcher's block_k)."""
    tiles = TUNED.decode_tiles
    assert fp8_step(128, 128, replace(tiles, fp8_block_k=0), 2048) == 128  # 0: one group
    for step, group, in_dim, want in [
        (512, 128, 2048, 512),
        (256, 128, 768, 256),
        (512, 128, 300, 512),  # 300 -> 512: one step over the input, groups past it masked
        (512, 128, 200, 256),
        (384, 128, 2048, 128),  # not a power of two
        (64, 128, 2048, 128),  # below the group
        (256, 96, 2048, 96),  # 96 does not divide 256
    ]:
        assert fp8_step(min(tiles.block_k, group), group, replace(tiles, fp8_block_k=step), in_dim) == want


@pytest.mark.parametrize("sums", ["after the loop", "each step", "each group"])
@pytest.mark.parametrize(("case", "step"), [(CPU_CASES[0], 32), (CPU_CASES[0], 64), (CPU_CASES[2], 64)])
def test_fp8_decode_steps_over_groups(case, step: int, sums: str):
    """The decode GEMVs with K steps over several scale groups (`DecodeTiles.fp8_block_k`; groups of 16
    here, a partial last group where I = 48, steps past the input where H = 32), each step's products
    summed after the loop, at once (`step_sum`) or a group at a time and then scaled (`fp8_group_sums`),
    without and with LoRA, invalid ids and slots mixed in: the twin's products on the dequantised
    weights; with `step_sum`, 16-bit weights too."""
    decode = KernelPlan(decode_pairs=1 << 30, fp8_activation_rows=None)
    step_sum, groups = sums != "after the loop", sums == "each group"
    choice = dict(fp8_block_k=step, step_sum=step_sum, fp8_step_sum=step_sum, fp8_group_sums=groups)
    plan = replace(
        decode,
        decode_tiles=replace(decode.decode_tiles, **choice),
        decode_down_tiles=replace(decode.decode_down_tiles, **choice),
    )
    check_fused_moe(case, case[0] + 8, plan, fp8_group=16, w8a8=False)
    check_fused_moe_lora(case, case[0] + 9, num_slots=3, rank=8, plan=plan, fp8_group=16, w8a8=False)
    if step_sum:
        check_fused_moe(case, case[0] + 10, plan)
        check_fused_moe_lora(case, case[0] + 1, num_slots=3, rank=8, plan=plan)


@pytest.mark.parametrize("seed", [5, 6])
def test_w8a8_twin_sums_gate_up_unrounded(seed: int):
    """W8A8 amplifies one ulp of h: a row's FP8 scale is its largest magnitude, and a value one ulp off
    may round to the FP8 step next to the kernel's (1/8 apart). The kernels keep gate/up in fp32 up to
    h; a twin rounding gate/up to x's dtype first was 0.12-0.17 of the output's largest value off on these
    seeds (the H200's test_fp8_experts_gpu at 2,048 tokens found it; 0.02 allowed)."""
    plan = KernelPlan(decode_pairs=0, down_shrink_in_gate_up=False)
    check_fused_moe((256, 8, 16, 256, 128, torch.float16), seed, plan, fp8_group=128, w8a8=True)


@pytest.mark.parametrize("case", [CPU_CASES[1], CPU_CASES[2], CPU_CASES[3]])
def test_fp8_activations_match_twin(case, path: KernelPlan):
    """W8A8 (`KernelPlan.fp8_activation_rows`): x's and h's rows quantised per scale group (32 columns
    here) in a pass of their own, the aligned paths' GEMMs multiplying in FP8 (partial last groups where
    the group does not divide I), the LoRA on the unquantised rows; against the twin quantising them the
    same way, in fp16 (the interpreter has no bf16 dot). In fp32 the products stay fp32 (W8A16) whatever
    the plan. The decode GEMVs stay W8A16 (the plan's rows are never reached there)."""
    if path.decode_pairs:
        pytest.skip("the decode path multiplies in x's dtype")
    w8a8 = replace(path, fp8_activation_rows=0.0)
    half = (*case[:5], torch.float16)
    check_fused_moe(half, case[0] + 4, w8a8, fp8_group=32, w8a8=True)
    check_fused_moe_lora(half, case[0] + 5, num_slots=3, rank=8, plan=w8a8, fp8_group=32, w8a8=True)
    if case[5] == torch.float32:
        check_fused_moe(case, case[0] + 4, w8a8, fp8_group=32, w8a8=False)


@pytest.mark.parametrize(("cols", "group"), [(96, 32), (80, 32), (128, 128)])
def test_quantize_activations_match_twin(cols: int, group: int):
    """W8A8's activation pass against `ops.torch.fp8.quantize_rows`: the same FP8 values and scales,
    bit for bit, with a partial last group (80 columns), a zero row (scale 1) and rows of large and tiny
    magnitudes (no overflow, subnormals rounded as the twin rounds them)."""
    g = torch.Generator().manual_seed(cols + group)
    x = torch.randn(37, cols, generator=g)
    x[3] = 0.0
    x[5] *= 1e4
    x[7] *= 1e-3
    x = x.to(torch.bfloat16).to(DEV)
    q, scales = quantize_activations(x.t().contiguous().t(), group)  # any strides: column-major here
    want_q, want_scales = quantize_rows(x, group)
    assert q.dtype == want_q.dtype and scales.shape == want_scales.shape
    assert torch.equal(scales.cpu(), want_scales.cpu())
    assert torch.equal(q.cpu().view(torch.uint8), want_q.cpu().view(torch.uint8))
    assert scales[3].eq(1).all() and q[5].float().abs().max() == 448


def test_fp8_experts_refused_without_scales():
    _, x, w_gu, w_dn, ids, weights = moe_inputs(CPU_CASES[0], 0)
    q_gu, q_dn, ext = fp8_experts(w_gu, w_dn, None, 16)
    with pytest.raises(ValueError, match="float8_e4m3fn with scales, or neither"):
        triton_moe.fused_moe(x, q_gu, q_dn, ids, weights)
    with pytest.raises(ValueError, match="float8_e4m3fn with scales, or neither"):
        triton_moe.fused_moe(x, w_gu, w_dn, ids, weights, extras=ext)
    assert ext.scales is not None
    bad = replace(ext, scales=replace(ext.scales, down=ext.scales.down[:, :-1]))
    with pytest.raises(ValueError, match="FP8 down scales have shape"):
        triton_moe.fused_moe(x, q_gu, q_dn, ids, weights, extras=bad)


@pytest.mark.parametrize(("case", "rank"), [(CPU_CASES[1], 24), (CPU_CASES[2], 16)])
@pytest.mark.parametrize("apart", [True, False])
def test_fused_moe_lora_down_expand_both_ways(case, rank: int, apart: bool):
    """The down LoRA expand apart (bucketed kernel) and in the down GEMM's epilogue, whichever the shape
    rule would pick."""
    plan = KernelPlan(down_expand_apart=apart)
    check_fused_moe_lora(case, seed=case[0] + 2, num_slots=3, rank=rank, plan=plan)


@pytest.mark.parametrize("programs", [24, 36])
def test_fused_moe_lora_down_expand_column_splits(programs: int):
    """The bucketed down expand with each bucket's 4 column tiles split over 2 programs (2 tiles each) and
    over 3 (the last one's second tile past the columns)."""
    # 4 experts x 3 slots = 12 buckets
    plan = KernelPlan(down_expand_apart=True, expand_n=16, expand_programs=programs)
    check_fused_moe_lora(CPU_CASES[2], seed=31, num_slots=3, rank=16, plan=plan)


def test_fused_moe_lora_shrink_in_several_steps():
    """Buckets larger than the shrink's rows per step (~47 pairs per bucket, 16 rows a step)."""
    check_fused_moe_lora(CPU_CASES[3], seed=21, num_slots=3, rank=16, plan=KernelPlan(shrink_rows=16))


@pytest.mark.parametrize("tma", [True, False])
def test_big_down_gemm_with_and_without_tma(tma: bool, monkeypatch):
    """The large batches' down GEMM reads h and the weights through tensor descriptors where it can, by
    pointers where not (before Hopper, rows not 16-byte aligned): persistent over 2 programs without LoRA,
    one program per tile with the LoRA expand fused."""
    from moelora.ops.triton import moe_down

    plan = KernelPlan(moe_table=((float("inf"), BIG, BIG),), persistent_programs=2, down_expand_apart=False)
    calls = []
    monkeypatch.setattr(moe_down, "tma_ok", lambda *t: calls.append(t) or tma)  # the hardware's answer
    check_fused_moe(CPU_CASES[1], seed=22, plan=plan)
    check_fused_moe_lora(CPU_CASES[1], seed=22, num_slots=3, rank=8, plan=plan)
    assert len(calls) >= 2, "the big tiles did not reach the down GEMM"


def test_big_down_gemm_takes_strided_weights():
    """Weights that are a slice of a wider tensor (no TMA descriptor fits them) take the pointer loads:
    every pair's row is w_down[e] @ h[row], persistent over 2 programs."""
    from moelora.ops.triton.moe_down import moe_down

    big = BIG
    gen = torch.Generator().manual_seed(23)
    num_tokens, top_k, num_experts, hidden, inter = 21, 2, 3, 48, 40
    ids = torch.randint(-1, num_experts + 1, (num_tokens, top_k), generator=gen, dtype=torch.int32)
    sorted_pairs, block_expert = triton_align.moe_align(ids, None, num_experts, 0, big.block_m)
    h = torch.randn(sorted_pairs.numel(), inter, generator=gen)
    wide = torch.randn(num_experts, hidden, inter + 8, generator=gen)
    w_down = wide[..., :inter]
    d = moe_down(
        h, w_down, sorted_pairs, block_expert, num_tokens, top_k, big, None, KernelPlan(persistent_programs=2)
    )
    checked = 0
    for row, pair in enumerate(sorted_pairs.tolist()):
        if pair < num_tokens * top_k:
            e = int(ids.view(-1)[pair])
            torch.testing.assert_close(d[pair], w_down[e] @ h[row], rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked == int(((ids >= 0) & (ids < num_experts)).sum())


def test_decode_gate_up_lora_counters_and_padding():
    """The decode gate/up launch with LoRA (shrinks inside it, ordered by counters): afterwards every counter
    is zero again, a second launch gives the same h and down-shrink parts bit for bit, and with NaN in a
    slot's padding past the lanes it may read, the parts stay finite on every lane."""
    from moelora.ops.triton import moe_decode_gate_up as gu
    from moelora.ops.triton.counters import launch_counters

    case = CPU_CASES[1]
    g, x, w_gu, _, ids, _ = moe_inputs(case, seed=11)
    bufs = lora_buffers(g, 3, case[2], case[3], case[4], 16, x.dtype)
    a_gu, b_gu, a_dn = bufs.a_gu, bufs.b_gu, bufs.a_dn
    for t in (a_gu, a_dn):
        t[1, ..., lanes_read(8) :, :] = float("nan")
    b_gu[1, ..., lanes_read(8) :] = float("nan")
    slot = slots(g, x.shape[0], 3)
    slot_rank = torch.tensor([16, 8, 16], dtype=torch.int32, device=DEV)
    lora = (slot, a_gu, b_gu, a_dn, slot_rank)
    h, hp = gu.decode_gate_up(x, w_gu, ids, lora, TUNED.decode_tiles)
    assert not launch_counters(x.device, 0).any()
    h2, hp2 = gu.decode_gate_up(x, w_gu, ids, lora, TUNED.decode_tiles)
    runs = ((ids >= 0) & (ids < case[2])).view(-1)
    assert torch.equal(h[runs], h2[runs]) and torch.equal(hp, hp2)
    assert torch.isfinite(hp).all() and hp.abs().sum() > 0


def test_decode_down_sums_like_moe_sum():
    """The decode down launch adds each token's rows up itself (the last pair of a token to finish a tile):
    the weighted sum `moe_sum` makes of its per-pair rows, a token whose choices all run
    elsewhere gets zeros, and the counters are zero again afterwards."""
    from moelora.ops.triton.counters import launch_counters
    from moelora.ops.triton.moe_decode_down import decode_down
    from moelora.ops.triton.moe_sum import moe_sum

    g = torch.Generator().manual_seed(31)
    num_tokens, top_k, num_experts, hidden, inter = 5, 3, 4, 40, 24
    ids = pick(g, [-1, 9, 0, 1, 2, 3], num_tokens, top_k)
    ids[0] = -1  # every choice elsewhere
    h = rand(g, num_tokens * top_k, inter)
    w_down = rand(g, num_experts, hidden, inter, scale=inter**-0.5)
    weights = rand(g, num_tokens, top_k)
    y = decode_down(h, w_down, ids, weights, None, TUNED.decode_down_tiles)
    assert not launch_counters(h.device, 0).any()
    d = torch.zeros(num_tokens * top_k, hidden, device=DEV)
    for p, e in enumerate(ids.view(-1).tolist()):
        if 0 <= e < num_experts:
            d[p] = w_down[e] @ h[p]
    ref = moe_sum(d, ids, weights, num_experts)
    assert_close(y, ref, 1e-5)
    assert torch.equal(y[0], torch.zeros_like(y[0]))
    assert torch.equal(decode_down(h, w_down, ids, weights, None, TUNED.decode_down_tiles), y)


def test_decode_path_is_taken_for_few_pairs():
    """The choice itself: a decode step of a wide MoE skips the alignment, a prefill does not."""
    assert triton_moe.use_decode_path(8, 128, 8) and triton_moe.use_decode_path(2, 8, 2)
    assert not triton_moe.use_decode_path(64 * 8, 128, 8) and not triton_moe.use_decode_path(4, 8, 2)


def test_shrink_splits_rule():
    """The MoE-LoRA shrink splits its input for small batches only, in whole 256-column parts, at most 16;
    the gate/up GEMM writes the down shrink for small batches only, in few parts."""
    splits = tile_table.shrink_splits
    assert splits(64, 128, 4, 2048) == 8 and splits(64, 128, 4, 768) == 3 and splits(16, 8, 4, 14336) == 16
    assert splits(8 * 2048, 128, 4, 2048) == 1 and splits(4, 128, 4, 200) == 1
    small = tile_table.moe_tiles(64, 128, 4)
    assert tile_table.down_shrink_in_gate_up(64, 128, 768, small)
    assert not tile_table.down_shrink_in_gate_up(1024, 128, 768, small)
    assert not tile_table.down_shrink_in_gate_up(16, 8, 14336, small)  # 224 column tiles: too many parts


def test_fused_moe_ids_all_elsewhere_give_zeros(path: str):
    _, x, w_gu, w_dn, _, weights = moe_inputs(CPU_CASES[1], seed=3)
    ids = torch.tensor([-1, -7, 5, 8], dtype=torch.int32, device=DEV).repeat(x.shape[0], 1)[:, :3]
    assert torch.equal(triton_moe.fused_moe(x, w_gu, w_dn, ids, weights), torch.zeros_like(x))


def test_fused_moe_lora_without_valid_slots_equals_base(path: str):
    g, x, w_gu, w_dn, ids, weights = moe_inputs(CPU_CASES[1], seed=4)
    bufs = lora_buffers(g, 2, 5, 32, 80, 4, x.dtype)
    slot = pick(g, [-1, -3, 2, 9], x.shape[0])
    out = triton_moe.fused_moe_lora(x, w_gu, w_dn, ids, weights, slot, bufs)
    assert_close(out, torch_moe.fused_moe(x, w_gu, w_dn, ids, weights), 1e-5)


def check_add_lora(
    num_tokens: int, num_slots: int, rank: int, dtype: torch.dtype, seed: int, plan: KernelPlan = TUNED
) -> None:
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, parts = 48, 40, 2
    x = rand(g, num_tokens, d_in).to(dtype)
    # The caller passes one stacked part of A (strided) and a column slice of y and B.
    a = rand(g, num_slots, parts, rank, d_in, scale=d_in**-0.5).to(dtype)
    b = rand(g, num_slots, d_out + 8, rank, scale=rank**-0.5).to(dtype)
    a[1, :, rank // 2 :] = 0
    b[1, :, rank // 2 :] = 0
    slot = slots(g, num_tokens, num_slots)
    wide = rand(g, num_tokens, d_out + 8).to(dtype)
    got, ref = wide.clone(), wide.clone()
    triton_lora.add_lora(got[:, 3 : 3 + d_out], x, a[:, 1], b[:, 3 : 3 + d_out], slot, None, plan)
    torch_lora.add_lora(ref[:, 3 : 3 + d_out], x, a[:, 1], b[:, 3 : 3 + d_out], slot)
    assert torch.equal(got[:, :3], wide[:, :3]) and torch.equal(got[:, 3 + d_out :], wide[:, 3 + d_out :])
    base = (slot < 0) | (slot >= num_slots)
    assert torch.equal(got[base], wide[base]), "tokens without a valid slot must be left alone"
    assert_close(got, ref, CPU_TOL[dtype])
    # Given each slot's rank (a strided column, as the layers pass it), the padding (NaN) is not read.
    ranks = torch.full((num_slots, parts), rank, dtype=torch.int32, device=DEV)
    ranks[1, 1] = rank // 2
    a[1, :, lanes_read(rank // 2) :] = float("nan")
    b[1, :, lanes_read(rank // 2) :] = float("nan")
    noisy = wide.clone()
    triton_lora.add_lora(noisy[:, 3 : 3 + d_out], x, a[:, 1], b[:, 3 : 3 + d_out], slot, ranks[:, 1], plan)
    assert_close(noisy, ref, CPU_TOL[dtype])


@pytest.fixture(params=["table", "split-k"])
def lora_plan(request) -> KernelPlan:
    """The dense LoRA tile table as shipped, and one that splits the shrink's sum (in = 48: 32 + 16)."""
    if request.param == "split-k":
        return KernelPlan(lora_table=((float("inf"), LoraTiles(16, 16, 32, 32, 4, 2)),))
    return TUNED


@pytest.mark.parametrize(
    ("num_tokens", "rank", "dtype"), [(1, 4, torch.float32), (37, 8, torch.float32), (70, 16, torch.float16)]
)
def test_add_lora_matches_twin(num_tokens: int, rank: int, dtype: torch.dtype, lora_plan: KernelPlan):
    check_add_lora(num_tokens, num_slots=3, rank=rank, dtype=dtype, seed=num_tokens, plan=lora_plan)


def test_add_lora_expands_many_slots_in_groups(lora_plan: KernelPlan):
    """11 slots of rank 16: the expand takes them 8 at a time (`common.slot_group`), a second group only
    partly backed by slots."""
    check_add_lora(40, num_slots=11, rank=16, dtype=torch.float32, seed=7, plan=lora_plan)


def check_add_lora_parts(
    num_tokens: int,
    rank: int,
    dtype: torch.dtype,
    seed: int,
    plan: KernelPlan = TUNED,
    sizes: tuple[int, ...] = (40, 8, 24),
) -> None:
    """q/k/v-like stacked parts: one shrink over the stacked A (or part by part for wide stacks), one
    expand for all parts where no column tile crosses a part (else one per part)."""
    g = torch.Generator().manual_seed(seed)
    d_in, num_slots = 48, 3
    x = rand(g, num_tokens, d_in).to(dtype)
    a = rand(g, num_slots, len(sizes), rank, d_in, scale=d_in**-0.5).to(dtype)
    b = rand(g, num_slots, sum(sizes), rank, scale=rank**-0.5).to(dtype)
    a[1, :, rank // 2 :] = 0
    b[1, :, rank // 2 :] = 0
    slot = slots(g, num_tokens, num_slots)
    slot[0] = num_slots - 1  # at least one token with an adapter
    y = rand(g, num_tokens, sum(sizes)).to(dtype)
    got, ref = y.clone(), y.clone()
    triton_lora.add_lora_parts(got, x, a, b, slot, sizes, None, plan)
    torch_lora.add_lora_parts(ref, x, a, b, slot, sizes)
    base = (slot < 0) | (slot >= num_slots)
    assert torch.equal(got[base], y[base]), "tokens without a valid slot must be left alone"
    assert_close(got, ref, CPU_TOL[dtype])
    assert (ref - y).abs().max() > 10 * CPU_TOL[dtype], "the LoRA delta must be visible"
    # Per-part ranks: slot 1 uses rank // 2 in every part, slot 2 nothing in part 1 (its lanes zeroed
    # in the reference); the kernels must not read the padding: NaN there changes nothing.
    ranks = torch.full((num_slots, len(sizes)), rank, dtype=torch.int32, device=DEV)
    ranks[1], ranks[2, 1] = rank // 2, 0
    a[2, 1], b[2, sizes[0] : sizes[0] + sizes[1]] = 0, 0
    ref = y.clone()
    torch_lora.add_lora_parts(ref, x, a, b, slot, sizes)
    a[1, :, lanes_read(rank // 2) :], b[1, :, lanes_read(rank // 2) :] = float("nan"), float("nan")
    a[2, 1], b[2, sizes[0] : sizes[0] + sizes[1]] = float("nan"), float("nan")
    noisy = y.clone()
    triton_lora.add_lora_parts(noisy, x, a, b, slot, sizes, ranks, plan)
    assert_close(noisy, ref, CPU_TOL[dtype])


@pytest.mark.parametrize(
    ("num_tokens", "rank", "dtype"), [(1, 8, torch.float32), (37, 16, torch.float16), (70, 48, torch.float32)]
)
def test_add_lora_parts_matches_twin(num_tokens: int, rank: int, dtype: torch.dtype, lora_plan: KernelPlan):
    check_add_lora_parts(num_tokens, rank, dtype, seed=num_tokens + 5, plan=lora_plan)


@pytest.mark.parametrize("num_tokens", [1, 37])
def test_add_lora_parts_in_one_expand(num_tokens: int):
    """Parts whose sizes are whole column tiles (8 here; q/k/v's 4096 + 512 + 512 at 64) take one expand
    launch, each tile its part's lanes and ranks."""
    plan = KernelPlan(lora_table=((float("inf"), LoraTiles(16, 16, 32, 8, 4, 2)),))
    check_add_lora_parts(num_tokens, 8, torch.float32, seed=num_tokens + 9, plan=plan, sizes=(40, 8, 24))
    check_add_lora_parts(num_tokens, 16, torch.float16, seed=num_tokens, plan=plan, sizes=(16, 8, 8, 24))


def router_logits(g: torch.Generator, num_tokens: int, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """Distinct logits in every row (0.05 apart, exact in 16 bits), so that the top-k has no ties."""
    ranks = torch.stack([torch.randperm(num_experts, generator=g) for _ in range(num_tokens)])
    logits = ranks.float() * 0.05 - 3 + torch.randn(num_tokens, 1, generator=g)
    return logits.to(dtype).to(DEV)


def check_route(num_tokens: int, num_experts: int, k: int, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = router_logits(g, num_tokens, num_experts, dtype)
    for renormalize in (False, True):
        for fp32_weights in (False, True):
            w, ids = triton_router.route(logits, k, renormalize, fp32_weights)
            w_ref, ids_ref = torch_router.route(logits, k, renormalize, fp32_weights)
            assert torch.equal(ids, ids_ref)
            assert_close(w, w_ref, 1e-6 if w.dtype == torch.float32 else CPU_TOL[w.dtype])


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "k", "dtype"),
    [
        (1, 8, 2, torch.float32),
        (7, 60, 4, torch.float16),
        (33, 128, 8, torch.float32),
        (5, 4, 1, torch.float16),
    ],
)
def test_route_matches_twin(num_tokens: int, num_experts: int, k: int, dtype: torch.dtype):
    check_route(num_tokens, num_experts, k, dtype, seed=num_tokens)


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "k", "groups", "topk_groups", "sigmoid"),
    [
        (1, 16, 4, 4, 2, True),  # DeepSeek-V3's form, tiny
        (37, 64, 6, 8, 3, True),
        (9, 128, 8, 1, 1, True),  # GLM-4.5-Air: one group
        (20, 160, 6, 8, 3, False),  # DeepSeek-V2: groups of 20 (not a power of 2)
        (5, 64, 6, 1, 1, False),  # V2-Lite: greedy
    ],
)
def test_grouped_routers_match_twins(num_tokens, num_experts, k, groups, topk_groups, sigmoid):
    """DeepSeek's and GLM's group-limited choices in one launch after the fp32 linear layer: the twins' ids
    (random inputs: no near ties) and weights; where there are groups, they change some token's choice."""
    g = torch.Generator().manual_seed(num_tokens + num_experts)
    x = rand(g, num_tokens, 48).half()
    w = rand(g, num_experts, 48, scale=0.5)
    bias = rand(g, num_experts, scale=0.3)
    for renormalize, scaling in ((True, 2.5), (False, 1.0)):
        if sigmoid:
            got = triton_router.grouped_router(x, w, bias, k, groups, topk_groups, renormalize, scaling)
            ref = torch_router.grouped_router(x, w, bias, k, groups, topk_groups, renormalize, scaling)
            flat = torch_router.grouped_router(x, w, bias, k, 1, 1, renormalize, scaling)
        else:
            got = triton_router.softmax_grouped_router(x, w, k, groups, topk_groups, scaling)
            ref = torch_router.softmax_grouped_router(x, w, k, groups, topk_groups, scaling)
            flat = torch_router.softmax_grouped_router(x, w, k, 1, 1, scaling)
        assert torch.equal(got[1], ref[1])
        assert_close(got[0], ref[0], 1e-5)
        assert groups == 1 or not torch.equal(ref[1], flat[1]), "the groups must matter"


def test_grouped_router_rejects_bad_groups():
    x, w, bias = torch.zeros(2, 8, device=DEV), torch.zeros(12, 8, device=DEV), torch.zeros(12, device=DEV)
    with pytest.raises(ValueError, match="groups"):
        triton_router.grouped_router(x, w, bias, 4, 5, 2, True, 1.0)


def test_route_ties_take_the_lowest_ids():
    """Equal probabilities are taken lowest id first, in the route and in the one-launch router (one
    token: the sums in registers; three: the dot), whatever the lanes past the experts (6 of 8)."""
    rows = [[1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [0.5] * 6, [2.0, 1.0, 2.0, 1.0, 2.0, 1.0]]
    want = [[1, 2, 4], [0, 1, 2], [0, 2, 4]]
    logits = torch.tensor(rows).to(DEV)
    _, ids = triton_router.route(logits, 3, True, True)
    assert ids.cpu().tolist() == want
    # the router's logits are x @ w^T: one-hot x picks a column of w, which holds each row's logits
    w = torch.zeros(6, 16)
    w[:, :3] = torch.tensor(rows).t()
    x = torch.zeros(3, 16)
    x[torch.arange(3), torch.arange(3)] = 1.0
    x, w = x.half().to(DEV), w.half().to(DEV)
    for n in (1, 3):
        weights, ids = triton_router.router(x[:n], w, 3, True, True)
        assert ids.cpu().tolist() == want[:n]
        assert torch.equal(weights[:, 0], weights[:, 1])


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "k", "in_dim"),
    [(1, 128, 8, 300), (1, 60, 4, 2048), (5, 60, 4, 96), (16, 8, 2, 64)],  # one token: no dot
)
def test_router_matches_twin(num_tokens: int, num_experts: int, k: int, in_dim: int):
    """The router's linear layer and top-k in one launch (fp16: the interpreter has no bf16 dot), split
    along the input. Each token's x is one-hot, so its logits are one column of the weights, exact in any
    summation order: distinct values 0.05 apart give the same ids as the twin, weights to rounding.
    Random inputs: the same ids wherever the twin's k-th and (k+1)-th probabilities are apart."""
    g = torch.Generator().manual_seed(num_tokens + in_dim)
    cols = torch.randint(0, in_dim, (num_tokens,), generator=g)
    x = torch.zeros(num_tokens, in_dim)
    x[torch.arange(num_tokens), cols] = 1.0
    w = torch.randn(num_experts, in_dim, generator=g) * 0.1
    w[:, cols] = (torch.stack([torch.randperm(num_experts, generator=g) for _ in cols], 1) * 0.05 - 2).float()
    x, w = x.half().to(DEV), w.half().to(DEV)
    for renormalize in (False, True):
        got_w, got_ids = triton_router.router(x, w, k, renormalize, False)
        ref_w, ref_ids = torch_router.router(x, w, k, renormalize, False)
        assert torch.equal(got_ids, ref_ids)
        assert_close(got_w, ref_w, CPU_TOL[torch.float16])
    x = rand(g, num_tokens, in_dim).half()
    got_w, got_ids = triton_router.router(x, w, k, True, True)
    ref_w, ref_ids = torch_router.router(x, w, k, True, True)
    probs = torch.softmax(torch.nn.functional.linear(x, w).float(), dim=-1).sort(dim=-1, descending=True)[0]
    clear = (probs[:, k - 1] - probs[:, min(k, num_experts - 1)]) > 1e-2
    assert torch.equal(got_ids[clear], ref_ids[clear]) and got_w.dtype == torch.float32


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "k", "in_dim", "weight_first"),
    [(1, 128, 8, 300, False), (1, 60, 4, 2048, True), (5, 60, 4, 96, False), (16, 8, 2, 64, True)],
)
def test_add_norm_router_matches_twin(
    num_tokens: int, num_experts: int, k: int, in_dim: int, weight_first: bool
):
    """The residual add, RMSNorm and router in one launch (fp16: the interpreter has no bf16 dot) against
    the twin's `rms_norm` then `router`: the sums s exactly, the normed h to a rounding of fp16 (the squares
    summed in another order), the ids up to near-ties of the twin's logits. A
    strided x (a view of wider rows) and, with `weight_first`, an fp32 norm weight (Qwen3-Next's 1 + w)."""
    g = torch.Generator().manual_seed(num_tokens * 7 + in_dim)
    x = rand(g, num_tokens, in_dim + 5).half()[:, 3 : 3 + in_dim]
    residual = rand(g, num_tokens, in_dim, scale=3.0).half()
    norm_w = (1 + rand(g, in_dim, scale=0.2)).to(torch.float32 if weight_first else torch.float16)
    w = rand(g, num_experts, in_dim, scale=in_dim**-0.5).half()  # logits of about 1: fp16 rounds to 1e-3
    got = triton_router.add_norm_router(x, residual, norm_w, 1e-6, weight_first, w, k, True, False)
    ref = torch_router.add_norm_router(x, residual, norm_w, 1e-6, weight_first, w, k, True, False)
    assert torch.equal(got[3], ref[3])
    assert_close(got[2], ref[2], 2e-3)
    logits = torch.nn.functional.linear(ref[2].float(), w.float())
    top = logits.sort(dim=-1, descending=True)[0]
    # every chosen expert is among the twin's top k up to a near-tie, and where none is near, the same
    chosen = logits.gather(1, got[1].long())
    assert (chosen >= top[:, k - 1 : k] - 0.01).all() and (got[1].sort(dim=1)[0].diff(dim=1) > 0).all()
    clear = (top[:, k - 1] - top[:, k]) > 0.01
    assert torch.equal(got[1][clear], ref[1][clear])
    if clear.any():
        assert_close(got[0][clear], ref[0][clear], CPU_TOL[torch.float16])
    # more tokens than the one launch takes: the norm, then the router (cuBLAS and `route`)
    many = triton_router.ROUTER_TOKENS + 1
    xs, rs = rand(g, many, in_dim).half(), rand(g, many, in_dim).half()
    got = triton_router.add_norm_router(xs, rs, norm_w, 1e-6, weight_first, w, k, True, False)
    ref = torch_router.add_norm_router(xs, rs, norm_w, 1e-6, weight_first, w, k, True, False)
    assert torch.equal(got[3], ref[3]) and got[2].shape == ref[2].shape


def test_add_norm_router_bad_shapes():
    x, w = (
        torch.zeros(2, 32, dtype=torch.float16, device=DEV),
        torch.zeros(8, 32, dtype=torch.float16, device=DEV),
    )
    with pytest.raises(ValueError, match="residual like x"):
        triton_router.add_norm_router(x, x[:1], x[0], 1e-6, False, w, 2, True, False)
    with pytest.raises(ValueError, match="residual like x"):
        triton_router.add_norm_router(x, x, x[0, :16], 1e-6, False, w, 2, True, False)


def test_route_strided_logits_and_bad_k():
    g = torch.Generator().manual_seed(0)
    wide = router_logits(g, 9, 20, torch.float32)
    w, ids = triton_router.route(wide[:, 2:18], 3, True, False)
    w_ref, ids_ref = torch_router.route(wide[:, 2:18], 3, True, False)
    assert torch.equal(ids, ids_ref) and torch.allclose(w, w_ref, atol=1e-6)
    with pytest.raises(ValueError, match="top_k 17 must be in"):
        triton_router.route(wide[:, 2:18], 17, True, False)


def prompt_logprobs(
    adapters: dict, prompts: list[str], names: list[str | None], backend: str = "auto"
) -> list[list[float]]:
    """Each prompt's token log-probs under its adapter, all in one mixed batch (fp32, no sampling)."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    kwargs = dict(progress=False, lora_modules=adapters, max_loras_per_batch=4, cuda_graphs=False)
    with LLM("demo", device=DEV, kernel_backend=backend, **kwargs) as llm:
        outs = llm.generate(prompts, params, lora=names)
    return [[next(iter(lp.values())) for lp in out.prompt_logprobs[1:]] for out in outs]


def test_demo_adapters_through_the_kernels_match_the_twins(tmp_path, request):
    """End to end through the layers: the demo's adapters (ranks 8, 16 and 4 in a rank-16 pool, so the
    slots' ranks differ) through the MoE, LoRA and router kernels (fp32; the interpreter on CPU) give the
    twins' prompt log-probs: the pool's per-slot ranks reach the kernels and skip only padding."""
    adapters = demo_adapter_paths(tmp_path)
    prompts = ["The weather today is", "Hello there", "My computer keeps", "To make a simple soup,"]
    names: list[str | None] = [None, *adapters]
    ref = prompt_logprobs(adapters, prompts, names)
    request.addfinalizer(lambda: ops.use_backend("auto"))  # the process's choice, for the tests after
    got = prompt_logprobs(adapters, prompts, names, backend="triton")  # every op on its kernel, CPU too
    for g, r in zip(got, ref, strict=True):
        assert torch.allclose(torch.tensor(g), torch.tensor(r), atol=1e-4), (g, r)


def test_demo_decode_steps_through_the_kernels_match_the_twins(tmp_path, request, monkeypatch):
    """Decode steps of a mixed batch (the demo's adapters on q/k/v/o and the experts) with every op on
    its kernel (fp32; the interpreter on CPU): the input norm computes q/k/v's shrink and the decode
    attention o's (`ops.decode_o_shrink`: asserted to run), and the sampled tokens' log-probs match the
    twins' steps (tokens compared up to the reference's first near-tie); o, the post-attention norm and
    the router run in one launch (`linear.linear_norm_router`: asserted to run). A third run with the input
    norm inside q/k/v's launch (`norm_linear_tokens`; its norm launch then computes only the adapters'
    shrink, `norm.norm_shrink`): both asserted to run."""
    from moelora.ops.triton import attention as triton_attention
    from moelora.ops.triton import linear as triton_linear

    shrinks: list[bool] = []
    attend = triton_attention.rotary_decode
    monkeypatch.setattr(
        triton_attention,
        "rotary_decode",
        lambda *a, **k: shrinks.append(a[-1] is not None) or attend(*a, **k),
    )
    routed: list[int] = []
    o_route = triton_linear.linear_norm_router
    monkeypatch.setattr(
        triton_linear,
        "linear_norm_router",
        lambda x, *a, **k: routed.append(x.shape[0]) or o_route(x, *a, **k),
    )
    adapters = demo_adapter_paths(tmp_path)
    prompts = ["The weather today is", "Hello there", "My computer keeps", "To make a simple soup,"]
    names: list[str | None] = [None, *adapters]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=2, ignore_eos=True)
    kwargs = dict(progress=False, lora_modules=adapters, max_loras_per_batch=4, cuda_graphs=False)
    runs = []
    request.addfinalizer(lambda: ops.use_backend("auto"))
    for backend in ("auto", "triton"):
        with LLM("demo", device=DEV, kernel_backend=backend, **kwargs) as llm:
            runs.append(llm.generate(prompts, params, lora=names))
    assert shrinks and all(shrinks), "every decode step's attention computed o's shrink"
    assert routed and set(routed) == {len(prompts)}, "o's launch ran the norm and router at every step"
    from moelora.ops.triton import norm as triton_norm

    takes, fused = triton_linear.norms_input, []
    monkeypatch.setattr(  # as under MOELORA_PLAN="norm_linear_tokens=16"
        triton_linear,
        "norms_input",
        lambda *a: takes(*a[:5], replace(a[5], norm_linear_tokens=16), *a[6:]),
    )
    for name in ("norm_linear", "norm_shrink"):
        mod = triton_linear if name == "norm_linear" else triton_norm
        run = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _n=name, _run=run, **k: fused.append(_n) or _run(*a, **k))
    with LLM("demo", device=DEV, kernel_backend="triton", **kwargs) as llm:
        runs.append(llm.generate(prompts, params, lora=names))
    assert {"norm_linear", "norm_shrink"} <= set(fused), "q/k/v's launch ran the input norm"
    for got_runs in (runs[1], runs[2]):
        for ref, got in zip(runs[0], got_runs, strict=True):
            for want, have in zip(ref.outputs[0].logprobs, got.outputs[0].logprobs, strict=True):
                top = sorted(want.values(), reverse=True)
                first = next(iter(want))
                assert first in have and abs(have[first] - want[first]) < 1e-4, (want, have)
                if top[0] - top[1] < 1e-3:
                    break  # a near-tie: the two may pick different tokens from here on


GPU_CASES = [
    (1, 8, 16, 256, 192, torch.bfloat16),
    (33, 8, 16, 256, 192, torch.bfloat16),
    (300, 2, 8, 512, 384, torch.bfloat16),
    (2048, 8, 16, 256, 128, torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_fused_moe_gpu(case, path: KernelPlan):
    check_fused_moe(case, seed=case[0], plan=path)


@pytest.mark.gpu
@pytest.mark.parametrize(("case", "rank"), [(c, r) for c in GPU_CASES for r in (16, 64)])
def test_fused_moe_lora_gpu(case, rank: int, path: KernelPlan):
    check_fused_moe_lora(case, seed=case[0] + 7, num_slots=16, rank=rank, plan=path)


@pytest.mark.gpu
@pytest.mark.parametrize(("case", "seed"), [(GPU_CASES[0], 2), (GPU_CASES[1], 3), (GPU_CASES[3], 4)])
def test_gpt_oss_extras_gpu(case, seed: int, path: KernelPlan):
    check_fused_moe(case, seed, path, extras=True)
    check_fused_moe_lora(case, seed, num_slots=16, rank=16, plan=path, extras=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_fp8_experts_gpu(case, path: KernelPlan):
    """The plan as shipped: W8A8 on the aligned path from its `fp8_activation_rows`, else W8A16."""
    check_fused_moe(case, case[0] + 5, path, fp8_group=128)
    check_fused_moe_lora(case, case[0] + 6, num_slots=16, rank=16, plan=path, fp8_group=128)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 37, 1000])
def test_add_lora_gpu(num_tokens: int, lora_plan: KernelPlan):
    check_add_lora(num_tokens, num_slots=8, rank=32, dtype=torch.bfloat16, seed=num_tokens, plan=lora_plan)


@pytest.mark.gpu
@pytest.mark.parametrize(("num_tokens", "rank"), [(1, 16), (64, 32), (1000, 16), (1000, 64)])
def test_add_lora_parts_gpu(num_tokens: int, rank: int, lora_plan: KernelPlan):
    check_add_lora_parts(num_tokens, rank, torch.bfloat16, seed=num_tokens, plan=lora_plan)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "k"), [(1, 128, 8), (4096, 128, 8), (300, 8, 2), (64, 60, 4)]
)
def test_route_gpu(num_tokens: int, num_experts: int, k: int):
    check_route(num_tokens, num_experts, k, torch.bfloat16, seed=num_tokens)


@pytest.mark.gpu
@pytest.mark.cuda_graphs
def test_dependent_launches_in_a_graph_keep_the_stream_order():
    """The plan's `pdl` (programmatic dependent launch): a linear layer, the norm + router and the decode
    MoE launched as dependents of the kernel before each, captured in a graph and replayed with new
    inputs: each kernel must read what the one before it wrote that replay (the twins' result, the
    router's own eager result on that replay's input), not the last replay's."""
    from moelora.ops.triton import linear as triton_linear

    plan = replace(TUNED, pdl=True, decode_pairs=1 << 30)
    case = GPU_CASES[0]
    g, x, w_gu, w_dn, _, _ = moe_inputs(case, seed=11)
    hidden, num_experts, k = case[3], case[2], case[1]
    w = rand(g, hidden, hidden, scale=hidden**-0.5).to(x.dtype)
    w_router = rand(g, num_experts, hidden).to(x.dtype)
    residual, norm_w = rand(g, *x.shape).to(x.dtype), (1 + rand(g, hidden, scale=0.1)).to(x.dtype)

    def chain() -> tuple[torch.Tensor, ...]:
        y = triton_linear.linear(x, w, None, None, (hidden,), plan)
        weights, ids, h, s = triton_router.add_norm_router(
            y, residual, norm_w, 1e-6, False, w_router, k, True, False, pdl=True
        )
        return y, ids, h, s, triton_moe.fused_moe(h, w_gu, w_dn, ids, weights, plan)

    chain()  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, ids, h, s, out = chain()
    for seed in (1, 2, 3):
        x.copy_(rand(torch.Generator().manual_seed(seed), *x.shape).to(x.dtype))
        graph.replay()
        y_ref = torch_lora.linear(x, w, None, None, None, (hidden,))
        assert_close(y, y_ref, CPU_TOL[x.dtype])
        assert torch.equal(s, y + residual)
        # deterministic sums: the eager launch on this replay's y gives the same bits
        weights_now, ids_now, h_now, _ = triton_router.add_norm_router(
            y, residual, norm_w, 1e-6, False, w_router, k, True, False
        )
        assert torch.equal(ids, ids_now) and torch.equal(h, h_now)
        ref = torch_moe.fused_moe(h_now, w_gu, w_dn, ids_now, weights_now)
        assert_close(out, ref, CPU_TOL[x.dtype])


@pytest.mark.gpu
@pytest.mark.cuda_graphs
@pytest.mark.parametrize("fp8", [False, True])
def test_fused_moe_lora_cuda_graph_replay(path: KernelPlan, fp8: bool):
    """Captured once, replayed with new ids (invalid ones among them) and slots: the twin's result, with
    bf16 and with FP8 experts."""
    case = GPU_CASES[1]
    g, x, w_gu, w_dn, ids, weights = moe_inputs(case, seed=9)
    ext = None
    if fp8:
        w_gu, w_dn, ext = fp8_experts(w_gu, w_dn, None, 128)
    bufs = lora_buffers(g, 4, case[2], case[3], case[4], 16, x.dtype)
    slot = slots(g, x.shape[0], 4)
    triton_moe.fused_moe_lora(x, w_gu, w_dn, ids, weights, slot, bufs, path, ext)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_moe.fused_moe_lora(x, w_gu, w_dn, ids, weights, slot, bufs, path, ext)
    for seed in (1, 2):
        g2 = torch.Generator().manual_seed(seed)
        ids.copy_(expert_ids(g2, x.shape[0], case[1], case[2], empty=0))
        slot.copy_(slots(g2, x.shape[0], 4))
        graph.replay()
        w8a8 = fp8 and plan_w8a8(case, path, 128)
        ref = torch_lora.fused_moe_lora(x, w_gu, w_dn, ids, weights, slot, bufs, ext, fp8_activations=w8a8)
        assert_close(out, ref, CPU_TOL[x.dtype])
