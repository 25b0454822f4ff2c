"""The one-launch linear layer (`ops/triton/linear.py`: base GEMV, bias and dense multi-LoRA) against its
PyTorch twin (`ops.torch.lora.linear`: F.linear, then the LoRA delta), with invalid slots mixed in.

Without CUDA the kernel runs in Triton's interpreter (tiny shapes, fp32/fp16); the GPU cases run bf16 at
the Qwen3-30B-A3B projection shapes.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from moelora.ops.dense_lora import DenseLora  # noqa: E402
from moelora.ops.fp8 import RowScales  # noqa: E402
from moelora.ops.input_norm import InputNorm  # noqa: E402
from moelora.ops.plan import TUNED, KernelPlan, LinearTiles, Tiles  # noqa: E402
from moelora.ops.torch import lora as torch_lora  # noqa: E402
from moelora.ops.torch.fp8 import dequantize_rows, quantize_rows  # noqa: E402
from moelora.ops.triton import fp8_linear as triton_fp8  # noqa: E402
from moelora.ops.triton import linear as triton_linear  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
# Tiny tiles, so that the interpreter's small shapes still split the input (5 splits of 16 columns for
# in = 80) and the shrink (3 chunks of 32) and cut the output into several column tiles.
# an FP8 weight takes the same small tiles unless a test gives it its own
SMALL = KernelPlan(  # (the one launch up to 16 tokens: the cases below cross that line at 17)
    linear_tiles=LinearTiles(16, 16, 4, 2, programs_per_sm=64, shrink_chunk=32),
    fp8_linear_tiles=None,
    linear_tokens=16,
)


def rand(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(DEV)


def close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tol * max(1.0, ref.float().abs().max().item()), f"max error {err}"


def lora_inputs(g: torch.Generator, num_tokens: int, in_dim: int, sizes: tuple[int, ...], rank: int, dtype,
                num_slots: int = 4):  # fmt: skip
    a = rand(g, num_slots, len(sizes), rank, in_dim, scale=in_dim**-0.5).to(dtype)
    b = rand(g, num_slots, sum(sizes), rank, scale=rank**-0.5).to(dtype)
    ranks = torch.full((num_slots, len(sizes)), rank, dtype=torch.int32, device=DEV)
    # Slot 1 has half the rank in every part, slot 2 nothing in its last part: the padding is NaN, which
    # the kernel must not read (the twin gets zeros there).
    half = -(-(rank // 2) // 8) * 8  # lanes a kernel may read: the slot's rank rounded up to 8
    ranks[1], ranks[2, -1] = rank // 2, 0
    a[1, :, rank // 2 :], b[1, :, rank // 2 :] = 0, 0
    a[2, -1], b[2, sum(sizes[:-1]) :] = 0, 0
    noisy_a, noisy_b = a.clone(), b.clone()
    noisy_a[1, :, half:], noisy_b[1, :, half:] = float("nan"), float("nan")
    noisy_a[2, -1], noisy_b[2, sum(sizes[:-1]) :] = float("nan"), float("nan")
    choices = torch.tensor([-1, -3, num_slots, num_slots + 9, 0, 1, 2, 3, 1, 2, *range(4, num_slots)])
    slot = choices[torch.randint(0, len(choices), (num_tokens,), generator=g)].to(torch.int32).to(DEV)
    slot[0] = 1  # at least one token on an adapter
    return DenseLora(a, b, ranks), DenseLora(noisy_a, noisy_b, ranks), slot


def check_linear(num_tokens: int, in_dim: int, sizes: tuple[int, ...], rank: int, dtype, bias: bool,
                 plan: KernelPlan, seed: int, num_slots: int = 4) -> None:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    x = rand(g, num_tokens, in_dim).to(dtype)
    w = rand(g, sum(sizes), in_dim, scale=in_dim**-0.5).to(dtype)
    b = rand(g, sum(sizes)).to(dtype) if bias else None
    lora, noisy, slot = lora_inputs(g, num_tokens, in_dim, sizes, rank, dtype, num_slots)
    assert triton_linear.fits(x, len(sizes) * rank, sizes, plan)
    base = triton_linear.linear(x, w, b, None, sizes, plan)
    close(base, torch_lora.linear(x, w, b, None, None, sizes), TOL[dtype])
    got = triton_linear.linear(x, w, b, (noisy.a, noisy.b, noisy.rank, slot), sizes, plan)
    ref = torch_lora.linear(x, w, b, lora, slot, sizes)
    close(got, ref, TOL[dtype])
    assert (ref - base).abs().max() > 10 * TOL[dtype], "the LoRA delta must be visible"
    no_adapter = (slot < 0) | (slot >= lora.a.shape[0])
    assert torch.equal(got[no_adapter], base[no_adapter]), "a base row must not depend on its neighbours"
    again = triton_linear.linear(x, w, b, (noisy.a, noisy.b, noisy.rank, slot), sizes, plan)
    assert torch.equal(again, got), "counters must be back to zero after a launch"


@pytest.mark.parametrize(
    ("num_tokens", "sizes", "rank", "dtype", "bias"),
    [
        (1, (32, 16, 16), 8, torch.float32, False),
        (5, (48,), 16, torch.float32, True),
        (16, (32, 16), 8, torch.float16, True),
        (3, (16, 16, 16, 32), 4, torch.float32, False),
    ],
)
def test_linear_matches_twin(num_tokens: int, sizes: tuple[int, ...], rank: int, dtype, bias: bool):
    check_linear(num_tokens, 80, sizes, rank, dtype, bias, SMALL, seed=num_tokens)


def test_linear_expands_many_slots_in_groups():
    """11 slots of rank 16: the expand takes them 8 at a time (`common.slot_group`), so a second, partial
    group (slots 8-15, of which 11-15 do not exist) with tokens on it and on every invalid id."""
    assert triton_linear.slot_group(11, 16) == 8
    check_linear(16, 80, (32, 16), 16, torch.float32, True, SMALL, seed=5, num_slots=11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("programs_per_sm", [64, 0])  # 5 input splits of one step; 1 split of 5 steps
def test_one_token_folds_its_shrink_into_the_gemv(dtype, programs_per_sm):
    """One token: every GEMV program adds its input columns' part of the delta (`linear_fold_steps`), no
    shrink programs. Every slot kind (valid, half rank with NaN padding, an empty last part, -1 and ids
    past the slots), against the twin and against the unfolded launch; a token without an adapter gets
    the base's bits."""
    g = torch.Generator().manual_seed(11)
    sizes = (32, 16, 16)
    x = rand(g, 1, 80).to(dtype)
    w = rand(g, sum(sizes), 80, scale=80**-0.5).to(dtype)
    bias = rand(g, sum(sizes)).to(dtype)
    lora, noisy, _ = lora_inputs(g, 1, 80, sizes, 8, dtype)
    plan = replace(SMALL, linear_tiles=replace(SMALL.linear_tiles, programs_per_sm=programs_per_sm))
    unfolded = replace(plan, linear_fold_steps=0)
    assert plan.linear_fold_steps >= 5  # both layouts fold
    base = triton_linear.linear(x, w, bias, None, sizes, plan)
    for s in (0, 1, 2, 3, -1, 4, 1 << 20):
        slot = torch.tensor([s], dtype=torch.int32, device=DEV)
        args = (noisy.a, noisy.b, noisy.rank, slot)
        got = triton_linear.linear(x, w, bias, args, sizes, plan)
        close(got, torch_lora.linear(x, w, bias, lora, slot, sizes), TOL[dtype])
        close(got, triton_linear.linear(x, w, bias, args, sizes, unfolded), TOL[dtype])
        if not 0 <= s < 4:
            assert torch.equal(got, base), f"slot {s}: a token without an adapter gets the base's bits"
        else:
            assert (got.float() - base.float()).abs().max() > 10 * TOL[dtype], f"slot {s}: no delta"


def test_linear_takes_up_to_64_tokens_where_the_plan_says():
    """`linear_tokens` past 16: 40 tokens in one 64-row block, every slot kind among them."""
    plan = replace(SMALL, linear_tokens=64)
    check_linear(40, 80, (32, 16, 16), 8, torch.float32, False, plan, seed=7)
    assert not triton_linear.fits(torch.empty(65, 80), 24, (32, 16, 16), plan)


def test_linear_in_one_split():
    """The shipped tiles on a small layer: one input split, no partial sums."""
    check_linear(2, 96, (64, 32), 8, torch.float32, True, TUNED, seed=3)


def check_norm_shrink(num_tokens: int, in_dim: int, sizes: tuple[int, ...], rank: int, dtype,
                      weight_first: bool, plan: KernelPlan, seed: int, group: int = 0) -> int:  # fmt: skip
    """`norm.add_norm_shrink` against `rms_norm` (the same bits: one reduction) and its twin, then `linear`
    given that shrink against the twin's layer (a base row: the base launch's bits; twice the shrink:
    twice the delta, so the launch takes it and adds none of its own); `group`: the layer's weight in FP8
    with scales over groups of that many columns. Returns the chunk."""
    from moelora.ops.torch import norm as torch_norm
    from moelora.ops.triton import norm as triton_norm

    g = torch.Generator().manual_seed(seed)
    x, residual = rand(g, num_tokens, in_dim).to(dtype), rand(g, num_tokens, in_dim).to(dtype)
    weight = (1 + 0.3 * rand(g, in_dim)).to(dtype)
    w = rand(g, sum(sizes), in_dim, scale=in_dim**-0.5).to(dtype)
    lora, noisy, slot = lora_inputs(g, num_tokens, in_dim, sizes, rank, dtype)
    scales = None
    if group:
        w, scales = fp8_weight(g, sum(sizes), in_dim, group)
    chunk = triton_linear.shrink_chunk(x, noisy, sizes, True, plan, scales.group if scales else None)
    assert chunk > 0
    y, s, xa = triton_norm.add_norm_shrink(x, weight, 1e-6, residual, weight_first, noisy, slot, chunk)
    plain = triton_norm.rms_norm(x, weight, 1e-6, residual, weight_first)
    assert torch.equal(y, plain[0]) and torch.equal(s, plain[1]), "the same rows as the plain norm"
    ref_y, ref_s, ref_xa = torch_norm.add_norm_shrink(
        x, weight, 1e-6, residual, weight_first, lora, slot, chunk
    )
    close(y, ref_y, TOL[dtype])
    assert torch.equal(s, ref_s)
    valid = (slot >= 0) & (slot < lora.a.shape[0])
    assert xa.shape == (-(-in_dim // chunk), num_tokens, len(sizes) * rank)
    close(xa[:, valid], ref_xa[:, valid], TOL[dtype])
    alone = triton_norm.norm_shrink(x, weight, 1e-6, residual, weight_first, noisy, slot, chunk)
    assert torch.equal(alone[:, valid], xa[:, valid]), "the shrink alone: the same launch's bits"
    # (one launch up to linear_tokens, past it cuBLAS with the dense LoRA's expand of the given xa)
    got = triton_linear.linear_layer(y, w, None, noisy, slot, sizes, True, plan, scales, xa)
    close(got, torch_lora.linear(y, w, None, lora, slot, sizes, scales), TOL[dtype])
    late = replace(plan, linear_expand_early=not plan.linear_expand_early)
    other = triton_linear.linear_layer(y, w, None, noisy, slot, sizes, True, late, scales, xa)
    assert torch.equal(got, other), "B and xa loaded before the GEMV or after it: the same sums"
    base = triton_linear.linear_layer(y, w, None, None, None, sizes, True, plan, scales)
    assert torch.equal(got[~valid], base[~valid]), "a base row must not depend on its neighbours"
    assert (got[valid] - base[valid]).abs().max() > 10 * TOL[dtype], "the LoRA delta must be visible"
    doubled = triton_linear.linear_layer(y, w, None, noisy, slot, sizes, True, plan, scales, 2 * xa)
    # (plus the roundings of the three outputs to their dtype: up to 2.5 of their spacing, which for large
    # outputs, an FP8 weight's, exceeds the delta's tolerance)
    delta = 2 * (got.float() - base.float())
    err = (doubled.float() - base.float() - delta).abs().max().item()
    spacing = torch.finfo(dtype).eps * base.float().abs().max().item()
    assert err <= TOL[dtype] * max(1.0, delta.abs().max().item()) + 3 * spacing, err
    return chunk


@pytest.mark.parametrize(
    ("num_tokens", "dtype", "weight_first", "programs_per_sm", "group"),
    [
        (1, torch.float32, False, 0, 0),
        (5, torch.float16, False, 64, 0),
        (3, torch.float32, True, 64, 0),
        (20, torch.float32, False, 64, 0),
        (3, torch.float32, False, 64, 16),
    ],
)  # one token over 5 K steps in one split (not folded at linear_fold_steps 4); 5 splits of one step; past
# the one launch (20 tokens: cuBLAS and the dense LoRA's expand); an FP8 weight in groups of 16 columns
def test_norm_computes_the_shrink_of_the_linear_after_it(num_tokens, dtype, weight_first, programs_per_sm,
                                                         group):  # fmt: skip
    """The input norm's launch computes the q/k/v shrink of its normed rows by chunks (3 of 32 columns for
    80, the last partial) for every slot kind (valid, half rank with NaN padding, an empty part, -1 and
    ids past the slots); `linear` takes it in place of its shrink programs (`check_norm_shrink`)."""
    plan = replace(SMALL, linear_tiles=replace(SMALL.linear_tiles, programs_per_sm=programs_per_sm),
                   linear_fold_steps=4)  # fmt: skip
    seed = 20 + num_tokens
    assert check_norm_shrink(num_tokens, 80, (32, 16, 16), 8, dtype, weight_first, plan, seed, group) == 32


def check_norm_linear(num_tokens: int, in_dim: int, sizes: tuple[int, ...], rank: int, dtype,
                      weight_first: bool, residual: bool, plan: KernelPlan, seed: int,
                      group: int = 0) -> str:  # fmt: skip
    """`linear.norm_linear` (the input norm inside the layer's launch) against the twin's norm and layer,
    without adapters and with every slot kind; the adapters' shrink where the norm's launch would compute
    it (`norm.norm_shrink`), else folded or in shrink programs, both normalising their input too; a base
    row gets the launch-without-adapters' bits. Returns how the shrink ran."""
    from moelora.ops.triton import norm as triton_norm

    g = torch.Generator().manual_seed(seed)
    x = rand(g, num_tokens, in_dim).to(dtype)
    res = rand(g, num_tokens, in_dim).to(dtype) if residual else None
    norm = InputNorm(res, (1 + 0.3 * rand(g, in_dim)).to(dtype), 1e-6, weight_first)
    w = rand(g, sum(sizes), in_dim, scale=in_dim**-0.5).to(dtype)
    lora, noisy, slot = lora_inputs(g, num_tokens, in_dim, sizes, rank, dtype)
    scales = None
    if group:
        w, scales = fp8_weight(g, sum(sizes), in_dim, group)
    assert triton_linear.norms_input(x, norm, len(sizes) * rank, sizes, True, plan, group > 0)
    base, s = triton_linear.norm_linear(x, norm, w, None, None, sizes, plan, scales)
    ref_base, ref_s = torch_lora.norm_linear(x, norm, w, None, None, None, sizes, scales)
    close(base, ref_base, TOL[dtype])
    assert torch.equal(s, ref_s), "x + residual in x's dtype (x itself without a residual)"
    chunk = triton_linear.shrink_chunk(x, noisy, sizes, True, plan, group or None)
    xa, how = None, "shrink programs"
    if chunk and res is not None:
        xa, how = triton_norm.norm_shrink(x, norm.weight, 1e-6, res, weight_first, noisy, slot, chunk), "norm"
    elif num_tokens == 1 and not chunk:
        how = "folded"
    args = (noisy.a, noisy.b, noisy.rank, slot)
    got, s2 = triton_linear.norm_linear(x, norm, w, None, args, sizes, plan, scales, xa)
    ref, _ = torch_lora.norm_linear(x, norm, w, None, lora, slot, sizes, scales)
    close(got, ref, TOL[dtype])
    assert torch.equal(s2, s)
    valid = (slot >= 0) & (slot < lora.a.shape[0])
    assert torch.equal(got[~valid], base[~valid]), "a base row must not depend on its neighbours"
    assert (got[valid].float() - base[valid].float()).abs().max() > 10 * TOL[dtype], "no delta"
    return how


@pytest.mark.parametrize(
    ("num_tokens", "dtype", "weight_first", "residual", "norm_shrink", "group", "how"),
    [
        (1, torch.float32, False, True, 64, 0, "folded"),
        (5, torch.float16, False, True, 64, 0, "norm"),
        (3, torch.float32, True, True, 0, 0, "shrink programs"),
        (4, torch.float32, False, False, 64, 0, "shrink programs"),  # the first layer's norm: no residual
        (3, torch.float32, False, True, 64, 16, "norm"),  # an FP8 weight in groups of 16 columns
    ],
)
def test_norm_runs_inside_the_linear_layer(
    num_tokens, dtype, weight_first, residual, norm_shrink, group, how
):
    """The input norm inside the layer's one launch (`norm_linear_tokens`): 5 input splits of one 16-column
    step; the residual's sum stored by column tile 0's programs."""
    plan = replace(SMALL, norm_linear_tokens=16, norm_shrink_tokens=norm_shrink)
    seed = 20 + num_tokens
    assert check_norm_linear(num_tokens, 80, (32, 16, 16), 8, dtype, weight_first, residual, plan, seed,
                             group) == how  # fmt: skip


def test_norms_input_says_where_the_norm_runs_inside():
    """Only up to `norm_linear_tokens` tokens of a layer that takes its one launch, a norm output in x's
    dtype (an fp32 weight applied after the cast would promote it) and a residual like x."""
    g = torch.Generator().manual_seed(3)
    x, sizes = rand(g, 4, 80), (32, 16, 16)
    plan = replace(SMALL, norm_linear_tokens=4)

    ones = torch.ones(80, device=DEV)

    def takes(x=x, residual=x, weight=ones, weight_first=False, plan=plan, one=True):
        return triton_linear.norms_input(
            x, InputNorm(residual, weight, 1e-6, weight_first), 24, sizes, one, plan
        )

    assert takes() and takes(residual=None)
    assert not takes(plan=SMALL) and not takes(one=False)  # off by default; the twin
    assert not takes(x=rand(g, 5, 80), residual=None)  # more tokens than the plan's
    half = x.half()
    assert not takes(x=half, residual=half, weight=ones)  # fp32 weight: h in fp32
    assert takes(x=half, residual=half, weight=ones, weight_first=True)
    assert not takes(residual=rand(g, 80, 4).t())  # a residual whose rows are strided


def test_shrink_chunk_says_where_the_norm_takes_the_shrink():
    """The norm computes a layer's shrink only where the launch would run shrink programs: not folded (one
    token over few K steps), at most `norm_shrink_tokens` tokens; past the one launch where the dense LoRA
    expands stacked parts from one shrink; a chunk of the plan's width, narrower for many lanes (the
    norm's program holds a chunk of A for every lane)."""
    g = torch.Generator().manual_seed(2)
    sizes = (32, 16)
    lora, _, _ = lora_inputs(g, 1, 80, sizes, 8, torch.float32)
    wide, _, _ = lora_inputs(g, 1, 80, sizes, 128, torch.float32)
    unfolded = replace(SMALL, linear_fold_steps=0)

    def chunk(tokens, lora=lora, sizes=sizes, one_launch=True, plan=SMALL):
        return triton_linear.shrink_chunk(rand(g, tokens, 80), lora, sizes, one_launch, plan)

    assert chunk(1, plan=unfolded) == 32
    assert chunk(1) == 0  # folded
    assert chunk(2) == 32
    assert chunk(2, lora=wide) == 32  # 256 lanes: 64 columns, capped at the plan's 32
    assert chunk(17) == chunk(2, one_launch=False) == 32  # cuBLAS, then the stacked expand from xa
    assert chunk(17, lora=wide) == 0  # 256 lanes: the dense LoRA shrinks part by part
    assert chunk(17, lora=lora_inputs(g, 1, 80, (48,), 8, torch.float32)[0], sizes=(48,)) == 0  # one part
    assert chunk(65) == 0 and chunk(2, plan=replace(SMALL, norm_shrink_tokens=0)) == 0
    # A launch that would fold its shrink runs unfolded where given one (`takes_shrink`: the attention's
    # shrink of o)
    x1, w1 = rand(g, 1, 80), rand(g, 48, 80)
    args1 = (lora.a, lora.b, lora.rank, torch.ones(1, dtype=torch.int32, device=DEV))
    xa1 = rand(g, 3, 1, 16)
    given = triton_linear.linear(x1, w1, None, args1, sizes, SMALL, xa=xa1)
    assert torch.equal(given, triton_linear.linear(x1, w1, None, args1, sizes, unfolded, xa=xa1))
    args2 = (lora.a, lora.b, lora.rank, torch.zeros(2, dtype=torch.int32, device=DEV))
    for bad in (torch.zeros(3, 2, 16, device=DEV).half(), torch.zeros(3, 16, 2, device=DEV).transpose(1, 2)):
        with pytest.raises(ValueError, match="shrink xa"):  # fp16; not contiguous
            triton_linear.linear(rand(g, 2, 80), rand(g, 48, 80), None, args2, sizes, SMALL, xa=bad)
    good = triton_linear.linear(
        rand(g, 2, 80), rand(g, 48, 80), None, args2, sizes, SMALL, xa=torch.zeros(3, 2, 16, device=DEV)
    )
    assert good.shape == (2, 48)


def test_one_part_takes_a_given_shrink_past_the_one_launch():
    """o past its one launch (20 tokens) given its shrink (`takes_shrink`: the decode attention's, chunks
    over groups of heads): cuBLAS, then the dense LoRA's expand of that xa alone, as the twin's layer."""
    g = torch.Generator().manual_seed(4)
    lora, noisy, slot = lora_inputs(g, 20, 64, (48,), 8, torch.float32)
    x, w = rand(g, 20, 64), rand(g, 48, 64, scale=0.125)
    assert triton_linear.takes_shrink(x, 8, (48,), True, SMALL, False)
    valid = (slot >= 0) & (slot < 4)
    a = lora.a[slot.clamp(0, 3).long(), 0]  # [T, R, in]
    xa = torch.einsum("tc,trc->tr", x, a).reshape(1, 20, 8).repeat(2, 1, 1) / 2  # two equal chunks
    xa[:, ~valid] = float("nan")  # rows without a slot: never read
    got = triton_linear.linear_layer(x, w, None, noisy, slot, (48,), True, SMALL, None, xa.contiguous())
    close(got, torch_lora.linear(x, w, None, lora, slot, (48,)), TOL[torch.float32])
    doubled = triton_linear.linear_layer(x, w, None, noisy, slot, (48,), True, SMALL, None, 2 * xa)
    base = x @ w.T
    close(doubled - base, 2 * (got - base), TOL[torch.float32])  # the given xa, not a shrink of its own


def test_linear_layer_falls_back_where_it_does_not_fit():
    """Too many tokens, or a part boundary that cuts every column tile: cuBLAS plus the LoRA kernels,
    the same result."""
    g = torch.Generator().manual_seed(0)
    for num_tokens, sizes in ((17, (32, 16)), (3, (24, 8))):
        x = rand(g, num_tokens, 40)
        w = rand(g, sum(sizes), 40, scale=40**-0.5)
        lora, _, slot = lora_inputs(g, num_tokens, 40, sizes, 8, torch.float32)
        assert not triton_linear.fits(x, len(sizes) * 8, sizes, SMALL)
        got = triton_linear.linear_layer(x, w, None, lora, slot, sizes, True, SMALL)
        close(got, torch_lora.linear(x, w, None, lora, slot, sizes), TOL[torch.float32])


def test_linear_layer_base_rows_same_bits_in_every_batch():
    """A base row gets the same bits in a mixed batch, in a batch without adapters and on a layer without
    slots (a server started without LoRA): all three take the one launch."""
    g = torch.Generator().manual_seed(4)
    sizes = (32, 16)
    x = rand(g, 3, 40)
    w = rand(g, sum(sizes), 40, scale=40**-0.5)
    lora, _, slot = lora_inputs(g, 3, 40, sizes, 8, torch.float32)
    slot[1] = -1
    mixed = triton_linear.linear_layer(x, w, None, lora, slot, sizes, True, SMALL)
    base = triton_linear.linear_layer(x, w, None, lora, None, sizes, True, SMALL)
    no_slots = triton_linear.linear_layer(x, w, None, None, None, sizes, True, SMALL)
    assert torch.equal(mixed[1], base[1]) and torch.equal(base, no_slots)
    assert torch.equal(no_slots, triton_linear.linear(x, w, None, None, sizes, SMALL))


def check_linear_norm_router(num_tokens: int, num_experts: int, k: int, weight_first: bool, adapters: str,
                             plan: KernelPlan, seed: int, fp8: bool = False, dims: tuple[int, int] = (64, 48),
                             dtype: torch.dtype = torch.float16) -> None:  # fmt: skip
    """o (dims: in 64 -> out 48), the residual add, the RMSNorm and the router in o's one launch
    (`linear_norm_router`) against the twin (o, then `add_norm_router`) and against the launches apart
    (o's one launch, then the one-launch router): the sums s exactly as the launches apart give them, h
    to a rounding, the chosen experts wherever the twin's k-th and (k+1)-th logits are apart, and every
    token's weights: the twin's probabilities of the experts it chose.
    adapters: "none", "slots" (every slot kind, NaN padding) or "given" (xa from before, as the decode
    attention's)."""
    from moelora.ops.norm_router import NormRouter
    from moelora.ops.torch import router as torch_router
    from moelora.ops.triton import router as triton_router

    g = torch.Generator().manual_seed(seed)
    in_dim, out_dim = dims
    margin = 0.01 if dtype == torch.float16 else 0.05  # logits of about 1: fp16 rounds to 1e-3, bf16 to 8e-3
    x = rand(g, num_tokens, in_dim).to(dtype)
    w = rand(g, out_dim, in_dim, scale=in_dim**-0.5).to(dtype)
    scales = None
    if fp8:
        w, scales = fp8_weight(g, out_dim, in_dim, 16 if in_dim < 128 else 128)
    lora, noisy, slot = lora_inputs(g, num_tokens, in_dim, (out_dim,), 8, dtype)
    residual = rand(g, num_tokens, out_dim, scale=2.0).to(dtype)
    norm_w = (1 + rand(g, out_dim, scale=0.2)).to(torch.float32 if weight_first else dtype)
    w_router = rand(g, num_experts, out_dim, scale=out_dim**-0.5).to(dtype)
    route = NormRouter(residual, norm_w, 1e-6, weight_first, w_router, k, True, False)
    args, ref_lora, xa = None, None, None
    if adapters != "none":
        args, ref_lora = (noisy.a, noisy.b, noisy.rank, slot), lora
    if adapters == "given":
        a = lora.a[slot.clamp(0, 3).long(), 0].float()  # [T, R, in]
        xa = torch.einsum("tc,trc->tr", x.float(), a).reshape(1, num_tokens, 8).contiguous()
    assert triton_linear.fits(x, 8, (out_dim,), plan, fp8)
    assert triton_linear.routes(x, w, (out_dim,), route, plan)
    got = triton_linear.linear_norm_router(x, w, None, args, (out_dim,), route, plan, scales, xa)
    ref = torch_router.linear_norm_router(x, w, None, ref_lora, slot, scales, route)
    y = triton_linear.linear(x, w, None, args, (out_dim,), plan, scales, xa)
    apart = triton_router.add_norm_router(y, residual, norm_w, 1e-6, weight_first, w_router, k, True, False)
    assert torch.equal(got[3], apart[3]), "the sums as o's launch, then the norm's add give them"
    close(got[3], ref[3], TOL[dtype])
    close(got[2], apart[2], 2e-3 if dtype == torch.float16 else TOL[dtype])
    logits = torch.nn.functional.linear(ref[2].float(), w_router.float())
    top = logits.sort(dim=-1, descending=True)[0]
    chosen = logits.gather(1, got[1].long())
    assert (chosen >= top[:, k - 1 : k] - margin).all() and (got[1].sort(dim=1)[0].diff(dim=1) > 0).all()
    # the same experts wherever the twin's k-th and (k+1)-th logits are apart (their order may differ
    # among near-equal weights); every token's weights: the twin's probabilities of the chosen experts
    clear = (top[:, k - 1] - top[:, k]) > margin
    assert clear.any() or num_tokens < 4
    assert torch.equal(got[1][clear].sort(dim=1)[0], ref[1][clear].sort(dim=1)[0])
    p = torch.softmax(logits, dim=-1).gather(1, got[1].long())
    close(got[0], (p / p.sum(dim=1, keepdim=True)).to(got[0].dtype), TOL[dtype])
    again = triton_linear.linear_norm_router(x, w, None, args, (out_dim,), route, plan, scales, xa)
    assert all(torch.equal(p, q) for p, q in zip(got, again, strict=True)), "counters back to zero"


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "k", "weight_first", "adapters"),
    [
        (1, 60, 4, False, "slots"),
        (1, 128, 8, True, "given"),
        (3, 60, 4, True, "none"),
        (16, 8, 2, False, "slots"),
        (5, 60, 4, False, "given"),
    ],
)
def test_linear_norm_router_matches_twin(num_tokens, num_experts, k, weight_first, adapters):
    """In SMALL's tiles: 4 input splits of 16 columns, 3 output tiles of 16 (the partials of 3 tiles); up to
    the one-launch router's 16 tokens (`o_router_tokens` raised to it)."""
    plan = replace(SMALL, o_router_tokens=16)
    check_linear_norm_router(num_tokens, num_experts, k, weight_first, adapters, plan, seed=num_tokens)


def test_linear_norm_router_takes_the_plans_tokens():
    """`routes` up to `KernelPlan.o_router_tokens` tokens (never past the one-launch router's 16), one part
    as wide as the router's input, the residual in x's dtype."""
    from moelora.ops.norm_router import NormRouter

    w, w_router, norm_w = torch.zeros(48, 64), torch.zeros(8, 48), torch.ones(48)
    wide = replace(TUNED, o_router_tokens=64)
    for num_tokens in (1, TUNED.o_router_tokens, TUNED.o_router_tokens + 1, 17):
        x, res = torch.zeros(num_tokens, 64), torch.zeros(num_tokens, 48)
        route = NormRouter(res, norm_w, 1e-6, False, w_router, 2, True, False)
        assert triton_linear.routes(x, w, (48,), route) == (num_tokens <= TUNED.o_router_tokens)
        assert triton_linear.routes(x, w, (48,), route, wide) == (num_tokens <= 16)
        assert not triton_linear.routes(x, w, (16, 32), route, wide)  # two parts
        assert not triton_linear.routes(x, w, (48,), route._replace(residual=res.half()), wide)
        assert not triton_linear.routes(x, w, (48,), route._replace(weight=torch.zeros(8, 64)), wide)
    assert not triton_linear.routes(x[:1], w, (48,), route, replace(TUNED, o_router_tokens=0))


def test_linear_norm_router_in_one_split_and_fp8():
    """The shipped tiles (one split: every program finishes its tile), and an FP8 o."""
    check_linear_norm_router(2, 60, 4, False, "slots", TUNED, seed=7)
    check_linear_norm_router(3, 60, 4, False, "slots", SMALL, seed=8, fp8=True)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 4, 8, 16])
@pytest.mark.parametrize(
    ("adapters", "fp8"), [("none", False), ("slots", False), ("given", False), ("given", True)]
)
def test_linear_norm_router_gpu(num_tokens: int, adapters: str, fp8: bool):
    """Qwen3-30B-A3B's o (4,096 -> 2,048), norm and router (128 experts, top 8) in bf16, the shipped tiles
    (`o_router_tokens` raised to 16)."""
    plan = replace(TUNED, o_router_tokens=16)
    check_linear_norm_router(
        num_tokens, 128, 8, False, adapters, plan, seed=num_tokens, fp8=fp8, dims=(4096, 2048),
        dtype=torch.bfloat16,
    )  # fmt: skip


def fp8_weight(g: torch.Generator, rows: int, cols: int, group: int) -> tuple[torch.Tensor, RowScales]:
    """A random FP8 weight with its scales; rows' magnitudes spread over 100x, so that a scale read from
    the wrong row or group shows."""
    w = rand(g, rows, cols, scale=cols**-0.5) * torch.logspace(-1, 1, rows, device=DEV)[:, None]
    w8, table = quantize_rows(w, group)
    return w8, RowScales(table, group)


def check_fp8_linear(num_tokens: int, in_dim: int, sizes: tuple[int, ...], rank: int, dtype, group: int,
                     plan: KernelPlan, seed: int, one_launch: bool = True) -> None:  # fmt: skip
    """`linear_layer` on an FP8 weight against the twin (which dequantises it), with and without slots;
    `one_launch` says which path the tokens must take."""
    g = torch.Generator().manual_seed(seed)
    x = rand(g, num_tokens, in_dim).to(dtype)
    w8, scales = fp8_weight(g, sum(sizes), in_dim, group)
    b = rand(g, sum(sizes)).to(dtype)
    lora, noisy, slot = lora_inputs(g, num_tokens, in_dim, sizes, rank, dtype)
    assert triton_linear.fits(x, len(sizes) * rank, sizes, plan, fp8=True) == one_launch
    base = triton_linear.linear_layer(x, w8, b, None, None, sizes, True, plan, scales)
    close(base, torch_lora.linear(x, w8, b, None, None, sizes, scales), TOL[dtype])
    lora_in = noisy if one_launch else lora  # the cuBLAS path's LoRA kernels read the padding
    got = triton_linear.linear_layer(x, w8, b, lora_in, slot, sizes, True, plan, scales)
    ref = torch_lora.linear(x, w8, b, lora, slot, sizes, scales)
    close(got, ref, TOL[dtype])
    assert (ref - base).abs().max() > 10 * TOL[dtype], "the LoRA delta must be visible"
    no_adapter = (slot < 0) | (slot >= lora.a.shape[0])
    assert torch.equal(got[no_adapter], base[no_adapter]), "a base row must not depend on its neighbours"


@pytest.mark.parametrize("scale_dots", [False, True])
@pytest.mark.parametrize(
    ("num_tokens", "sizes", "group", "dtype"),
    [(1, (32, 16, 16), 16, torch.float32), (5, (48,), 32, torch.float32), (16, (32, 16), 16, torch.float16)],
)
def test_fp8_linear_matches_twin(
    num_tokens: int, sizes: tuple[int, ...], group: int, dtype, scale_dots: bool
):
    """The one launch on an FP8 weight, in 80 input columns: 5 groups of 16 or 3 of 32 (the last one
    partial), a K step of at most one group, the weight tile scaled before each dot or the dot after it
    (`fp8_linear_scale_dots`); split input, invalid slots, NaN padding."""
    plan = replace(SMALL, fp8_linear_scale_dots=scale_dots)
    check_fp8_linear(num_tokens, 80, sizes, 8, dtype, group, plan, seed=num_tokens + 20)


def test_fp8_linear_takes_its_own_tiles():
    """`fp8_linear_tiles`: an FP8 weight's launch takes them (here one input split, 32-column tiles and
    more stages), a 16-bit weight keeps `linear_tiles`; both against the twin."""
    fp8_tiles = LinearTiles(32, 16, 4, 6, programs_per_sm=0, shrink_chunk=32)
    plan = replace(SMALL, fp8_linear_tiles=fp8_tiles)
    assert triton_linear._tiles(plan, True) is fp8_tiles
    assert triton_linear._tiles(plan, False) is SMALL.linear_tiles is triton_linear._tiles(SMALL, True)
    check_fp8_linear(3, 80, (32, 32), 8, torch.float32, 16, plan, seed=7)
    check_linear(3, 80, (32, 32), 8, torch.float32, False, plan, seed=7)


def test_fp8_linear_takes_more_tokens_in_one_launch():
    """An FP8 weight keeps the one launch up to `fp8_linear_tokens` (cuBLAS would need a 16-bit copy of
    it); past that a Triton GEMM scales its tiles (several row and column tiles and K steps here), and from
    `fp8_copy_tokens` the weight is dequantised for cuBLAS; the LoRA kernels follow: the same result."""
    tiles = Tiles(16, 16, 16, 4, 2, group_m=2)
    plan = KernelPlan(linear_tiles=SMALL.linear_tiles, linear_tokens=4, fp8_linear_tokens=24)
    plan = replace(plan, fp8_copy_tokens=40, fp8_gemm_tiles=tiles)
    check_fp8_linear(20, 48, (32, 16), 8, torch.float32, 16, plan, seed=7)
    check_fp8_linear(30, 48, (32, 16), 8, torch.float32, 16, plan, seed=8, one_launch=False)
    check_fp8_linear(50, 48, (32, 16), 8, torch.float32, 16, plan, seed=9, one_launch=False)


def test_fp8_matmul_matches_twin():
    """The Triton GEMM on an FP8 weight alone: a partial last group (80 columns in groups of 32), partial
    row and column tiles, a bias."""
    g = torch.Generator().manual_seed(11)
    x = rand(g, 37, 80)
    w8, scales = fp8_weight(g, 72, 80, 32)
    b = rand(g, 72)
    plan = replace(TUNED, fp8_gemm_tiles=Tiles(16, 32, 32, 4, 2, group_m=2))
    got = triton_fp8.fp8_matmul(x, w8, scales, b, plan)
    close(got, torch_lora.linear(x, w8, b, None, None, (72,), scales), TOL[torch.float32])


def test_fp8_matmul_narrows_its_tiles_to_fill_the_card():
    """`filled_block_n`: a few row blocks of 128-wide tiles leave SMs idle, so the tiles narrow (never below
    32); with enough row blocks they stay. The narrowed GEMM against the twin (8 row blocks of 16, 64-wide
    tiles asked for: 32 taken)."""
    assert triton_fp8.filled_block_n(128, 1, 5120, 132) == 32  # 40 -> 80 -> 160 programs
    assert triton_fp8.filled_block_n(128, 2, 5120, 132) == 64  # 80 -> 160
    assert triton_fp8.filled_block_n(128, 32, 5120, 132) == 128
    assert triton_fp8.filled_block_n(32, 1, 64, 132) == 32
    g = torch.Generator().manual_seed(12)
    x = rand(g, 120, 64)
    w8, scales = fp8_weight(g, 96, 64, 32)
    plan = replace(TUNED, fp8_gemm_tiles=Tiles(16, 64, 32, 4, 2, group_m=2))
    got = triton_fp8.fp8_matmul(x, w8, scales, None, plan)
    close(got, torch_lora.linear(x, w8, None, None, None, (96,), scales), TOL[torch.float32])


def test_fp8_dequantize_is_exact():
    """The kernel that gives cuBLAS its 16-bit copy: W8 times its rows' scales, as the twin computes it."""
    g = torch.Generator().manual_seed(9)
    w8, scales = fp8_weight(g, 40, 72, 16)
    got = triton_fp8.dequantize(w8, scales, torch.float32)
    assert torch.equal(got, dequantize_rows(w8, scales.table, 16, torch.float32))


def test_fp8_linear_refuses_scales_that_do_not_fit():
    g = torch.Generator().manual_seed(2)
    x = rand(g, 2, 48)
    w8, scales = fp8_weight(g, 32, 48, 16)
    with pytest.raises(ValueError, match=r"need \[32, 3\]"):
        triton_linear.linear(x, w8, None, None, (32,), SMALL, RowScales(scales.table[:, :2], 16))
    with pytest.raises(ValueError, match="need float8_e4m3fn"):
        triton_linear.linear(x, w8.float(), None, None, (32,), SMALL, scales)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16, 64, 100, 2048])
@pytest.mark.parametrize(("in_dim", "sizes"), [(2048, (4096, 512, 512)), (4096, (2048,))])
def test_fp8_linear_gpu(num_tokens: int, in_dim: int, sizes: tuple[int, ...]):
    """Qwen3-30B-A3B's q/k/v and o in FP8 with bf16 activations and the shipped plan: the one launch up
    to `fp8_linear_tokens`, past it the Triton GEMM below `fp8_copy_tokens` (64 and 100 tokens) and the
    dequantised copy for cuBLAS from there."""
    one_launch = num_tokens <= TUNED.fp8_linear_tokens
    check_fp8_linear(num_tokens, in_dim, sizes, 16, torch.bfloat16, 128, TUNED, num_tokens, one_launch)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 4, 16, 64])
@pytest.mark.parametrize(
    ("in_dim", "sizes", "bias"),
    [(2048, (4096, 512, 512), False), (4096, (2048,), True), (2048, (128,), False)],
)
def test_linear_gpu(num_tokens: int, in_dim: int, sizes: tuple[int, ...], bias: bool):
    """Qwen3-30B-A3B's q/k/v, o and router shapes in bf16 with the shipped tiles (64 tokens: one 64-row
    block, `linear_tokens`)."""
    check_linear(num_tokens, in_dim, sizes, 16, torch.bfloat16, bias, TUNED, seed=num_tokens)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("num_tokens", "residual", "group"), [(1, True, 0), (4, True, 0), (16, False, 0), (1, True, 128)]
)
def test_norm_linear_gpu(num_tokens: int, residual: bool, group: int):
    """Qwen3-30B-A3B's input norm inside q/k/v's launch (`norm_linear_tokens=16`) in bf16 with the shipped
    tiles: one token folds nothing here (16 K steps), so its adapters' shrink comes from `norm_shrink`;
    group 128: an FP8 weight."""
    plan = replace(TUNED, norm_linear_tokens=16)
    how = check_norm_linear(num_tokens, 2048, (4096, 512, 512), 16, torch.bfloat16, False, residual, plan,
                            num_tokens, group)  # fmt: skip
    assert how == ("norm" if residual else "shrink programs")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("num_tokens", "weight_first", "group"),
    [(1, False, 0), (4, True, 0), (16, False, 0), (64, False, 0), (1, False, 128), (16, False, 128)],
)
def test_norm_shrink_gpu(num_tokens: int, weight_first: bool, group: int):
    """Qwen3-30B-A3B's input norm with q/k/v's shrink (2,048 columns, 3 parts of rank 16) in bf16 with the
    shipped plan: the plain norm's bits, then q/k/v given the shrink (64 tokens: the one 64-row launch, and
    with the one launch cut at 16 tokens cuBLAS and the dense LoRA's expand; group 128: an FP8 weight in its
    one launch)."""
    assert check_norm_shrink(num_tokens, 2048, (4096, 512, 512), 16, torch.bfloat16, weight_first, TUNED,
                             num_tokens, group) == 256  # fmt: skip
    if num_tokens == 64 and not group:
        plan = replace(TUNED, linear_tokens=16)
        sizes = (4096, 512, 512)
        assert check_norm_shrink(64, 2048, sizes, 16, torch.bfloat16, weight_first, plan, 65) == 256


@pytest.mark.gpu
@pytest.mark.parametrize(("num_tokens", "fp8"), [(1, False), (8, False), (8, True), (100, True)])
def test_linear_cuda_graph_replay(num_tokens: int, fp8: bool):
    """Captured once, replayed with new inputs and slots: the counters and partials are graph-safe; so is
    an FP8 weight, in the one launch and (100 tokens) the Triton GEMM."""
    g = torch.Generator().manual_seed(1)
    sizes, in_dim = (512, 128, 128), 1024
    x = rand(g, num_tokens, in_dim).to(torch.bfloat16)
    w = rand(g, sum(sizes), in_dim, scale=in_dim**-0.5).to(torch.bfloat16)
    scales = None
    if fp8:
        w, scales = fp8_weight(g, sum(sizes), in_dim, 128)
    lora, _, slot = lora_inputs(g, num_tokens, in_dim, sizes, 16, torch.bfloat16)

    def run() -> torch.Tensor:
        return triton_linear.linear_layer(x, w, None, lora, slot, sizes, True, TUNED, scales)

    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    for seed in range(3):
        g2 = torch.Generator().manual_seed(seed + 10)
        x.copy_(rand(g2, num_tokens, in_dim).to(torch.bfloat16))
        slot.copy_(torch.randint(-1, 5, (num_tokens,), generator=g2).to(torch.int32).to(DEV))
        graph.replay()
        close(y, torch_lora.linear(x, w, None, lora, slot, sizes, scales), TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_norm_linear_cuda_graph_replay(pdl: bool):
    """The input norm inside q/k/v's launch with its adapters' shrink from `norm_shrink`, captured once and
    replayed with new inputs, residuals and slots: against the twin's norm and layer each time; the launch
    a programmatic dependent of the norm's or not (`pdl_off`)."""
    from moelora.ops.triton import norm as triton_norm

    g = torch.Generator().manual_seed(2)
    sizes, in_dim, num_tokens = (512, 128, 128), 1024, 4
    plan = replace(TUNED, norm_linear_tokens=16, pdl_off="" if pdl else "norm_linear")
    x, res = (rand(g, num_tokens, in_dim).to(torch.bfloat16) for _ in range(2))
    norm = InputNorm(res, (1 + 0.3 * rand(g, in_dim)).to(torch.bfloat16), 1e-6, False)
    w = rand(g, sum(sizes), in_dim, scale=in_dim**-0.5).to(torch.bfloat16)
    lora, _, slot = lora_inputs(g, num_tokens, in_dim, sizes, 16, torch.bfloat16)
    chunk = triton_linear.shrink_chunk(x, lora, sizes, True, plan)
    assert chunk and triton_linear.norms_input(x, norm, 48, sizes, True, plan)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        xa = triton_norm.norm_shrink(x, norm.weight, 1e-6, res, False, lora, slot, chunk)
        return triton_linear.norm_linear_layer(x, norm, w, None, lora, slot, sizes, True, plan, None, xa)

    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, s = run()
    for seed in range(3):
        g2 = torch.Generator().manual_seed(seed + 10)
        x.copy_(rand(g2, num_tokens, in_dim).to(torch.bfloat16))
        res.copy_(rand(g2, num_tokens, in_dim).to(torch.bfloat16))
        slot.copy_(torch.randint(-1, 5, (num_tokens,), generator=g2).to(torch.int32).to(DEV))
        graph.replay()
        ref_y, ref_s = torch_lora.norm_linear(x, norm, w, None, lora, slot, sizes)
        close(y, ref_y, TOL[torch.bfloat16])
        assert torch.equal(s, ref_s)


def test_fp8_linear_takes_the_norms_shrink_where_it_does_not_fold():
    """An FP8 weight's scale group narrows the launch's K steps (16 here against the tiles' 32), which can
    turn a folded one-token launch into one with shrink programs: `shrink_chunk` decides from the same
    steps as `linear`, so the norm's xa reaches a launch that takes it (and never one that folds)."""
    from moelora.ops.torch import norm as torch_norm

    g = torch.Generator().manual_seed(6)
    sizes = (32, 16, 16)
    tiles = LinearTiles(16, 32, 4, 2, programs_per_sm=0, shrink_chunk=32)  # one split of 80 columns
    plan = KernelPlan(linear_tiles=tiles, fp8_linear_tiles=None, linear_fold_steps=4)
    x = rand(g, 1, 80)
    lora, _, _ = lora_inputs(g, 1, 80, sizes, 8, torch.float32)
    slot = torch.tensor([0], dtype=torch.int32, device=DEV)
    assert triton_linear.shrink_chunk(x, lora, sizes, True, plan) == 0  # 3 steps of 32: folded
    assert triton_linear.shrink_chunk(x, lora, sizes, True, plan, group=16) == 32  # 5 steps of 16
    w8, scales = fp8_weight(g, sum(sizes), 80, 16)
    weight = 1 + 0.3 * rand(g, 80)
    y, _, xa = torch_norm.add_norm_shrink(x, weight, 1e-6, rand(g, 1, 80), False, lora, slot, 32)
    got = triton_linear.linear_layer(y, w8, None, lora, slot, sizes, True, plan, scales, xa)
    ref = torch_lora.linear(y, w8, None, lora, slot, sizes, scales)
    close(got, ref, TOL[torch.float32])
