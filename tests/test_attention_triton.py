"""The Triton attention kernels against their PyTorch twins: ragged batches, lengths off the block size,
GQA ratios 1, 4 and 8, head dims 64 and 128, sliding windows, cached prefixes, split-KV decode.

Without CUDA they run in Triton's interpreter (tiny shapes, fp32/fp16: bf16 `tl.dot` is broken there);
`TRITON_INTERPRET` must be set before the kernels are decorated, hence before the imports below (as in
tests/test_kernels_triton.py). Cache slots no sequence owns hold NaN, so a kernel reading outside a
sequence's keys fails the comparison.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from moelora.ops.torch import attention as twin  # noqa: E402
from moelora.ops.triton import attention as kern  # noqa: E402
from moelora.ops.triton.counters import launch_counters  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
SCALE = 0.3


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "non-finite output"
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= TOL[out.dtype] * max(1.0, ref.double().abs().max().item()), err


def paged_problem(
    seed: int, kv_lens: tuple[int, ...], q_tokens: int, heads: tuple[int, int], d: int, page: int, dtype
):
    """q [q_tokens, Hq, D]; a NaN-filled cache whose owned slots hold random K/V; shuffled block tables."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    need = [-(-n // page) for n in kv_lens]
    num_blocks = sum(need) + 3
    k_cache = torch.full((num_blocks, page, hkv, d), float("nan"))
    v_cache = torch.full((num_blocks, page, hkv, d), float("nan"))
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(kv_lens), max(need) + 2, dtype=torch.int32)  # padded with block 0, as the engine
    for b, n in enumerate(kv_lens):
        blocks, order = order[: need[b]], order[need[b] :]
        tables[b, : need[b]] = torch.tensor(blocks)
        flat = torch.tensor([blk * page + i for blk in blocks for i in range(page)][:n])
        k_cache.view(-1, hkv, d)[flat] = torch.randn(n, hkv, d, generator=g)
        v_cache.view(-1, hkv, d)[flat] = torch.randn(n, hkv, d, generator=g)
    q = torch.randn(q_tokens, hq, d, generator=g)
    return (t.to(DEV) for t in (q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), tables))


def sinks_for(seed: int, heads: int, dtype, with_sinks: bool) -> torch.Tensor | None:
    """GPT-OSS's per-head sink logits (spread wide: some outweigh every key, some are negligible)."""
    if not with_sinks:
        return None
    return (torch.randn(heads, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype).to(DEV)


def check_paged(seed, seq_lens, kv_lens, heads, d, page, dtype, window, with_sinks=False) -> None:
    q, k_cache, v_cache, tables = paged_problem(seed, kv_lens, sum(seq_lens), heads, d, page, dtype)
    sinks = sinks_for(seed, heads[0], dtype, with_sinks)
    out = kern.paged_attention(q, k_cache, v_cache, tables, seq_lens, kv_lens, SCALE, window, sinks=sinks)
    ref = twin.paged_attention(q, k_cache, v_cache, tables, seq_lens, kv_lens, SCALE, window, sinks)
    assert_close(out, ref)


def check_decode_splits(seed, kv_lens, heads, d, page, dtype, window, splits, with_sinks=False) -> None:
    q, k_cache, v_cache, tables = paged_problem(seed, kv_lens, len(kv_lens), heads, d, page, dtype)
    sinks = sinks_for(seed, heads[0], dtype, with_sinks)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    out = kern.paged_decode(q, k_cache, v_cache, tables, lens, SCALE, window, splits=splits, sinks=sinks)
    ones = (1,) * len(kv_lens)
    assert_close(out, twin.paged_attention(q, k_cache, v_cache, tables, ones, kv_lens, SCALE, window, sinks))
    # The last split to finish merges them (counters): zero again afterwards, the same bits next time.
    assert not launch_counters(q.device, 0).any()
    again = kern.paged_decode(q, k_cache, v_cache, tables, lens, SCALE, window, splits=splits, sinks=sinks)
    assert torch.equal(again, out)


def check_prefill(seed, seq_lens, heads, d, dtype, window, with_sinks=False) -> None:
    g = torch.Generator().manual_seed(seed)
    t = sum(seq_lens)
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype).to(DEV) for h in (heads[0], heads[1], heads[1]))
    sinks = sinks_for(seed, heads[0], dtype, with_sinks)
    out = kern.prefill_attention(q, k, v, seq_lens, SCALE, window, sinks)
    assert_close(out, twin.prefill_attention(q, k, v, seq_lens, SCALE, window, sinks))


# (seq_lens, kv_lens, (Hq, Hkv), D, block_size, dtype, window)
CPU_DECODE = [
    ((1, 1, 1), (1, 17, 40), (4, 4), 64, 16, torch.float32, None),
    ((1, 1, 1, 1), (33, 5, 16, 70), (8, 2), 128, 16, torch.float16, None),
    ((1, 1), (45, 3), (8, 1), 64, 8, torch.float32, 7),
    ((1, 1), (20, 9), (4, 2), 8, 16, torch.float32, None),  # head dim 8 (the test models')
]
CPU_PAGED_PREFILL = [
    # a prompt from scratch, a decode and a prompt continuing a cached prefix, in one batch
    ((5, 1, 20), (5, 30, 50), (4, 4), 64, 16, torch.float32, None),
    ((19, 3), (19, 40), (8, 2), 128, 16, torch.float16, None),
    ((17, 2, 1), (40, 2, 9), (8, 1), 64, 8, torch.float32, 6),
    ((150,), (170,), (4, 1), 64, 16, torch.float16, None),  # two query tiles
]


@pytest.mark.parametrize("case", CPU_DECODE + CPU_PAGED_PREFILL)
def test_paged_attention_matches_twin(case):
    check_paged(len(case[0]) + case[1][0], *case)


@pytest.mark.parametrize(
    ("kv_lens", "heads", "d", "dtype", "window", "splits"),
    [
        ((1, 37, 64), (8, 1), 128, torch.float16, None, 4),  # splits without keys for the short sequences
        ((50, 23), (4, 4), 64, torch.float32, 9, 3),
        ((80,), (8, 2), 64, torch.float32, None, 8),
    ],
)
def test_split_decode_matches_twin(kv_lens, heads, d, dtype, window, splits):
    check_decode_splits(sum(kv_lens), kv_lens, heads, d, 16, dtype, window, splits)


def check_o_shrink(seed, kv_lens, heads, d, dtype, splits, rank=16) -> None:
    """`paged_decode` with `o_shrink`: the attention's output unchanged, and xa[h, b] the output projection's
    shrink of o[b] over KV head h's query heads (o as stored) for b's slot; slot 1 of half rank with NaN
    in its padding lanes (not read), sequences without a slot (-1, an id past the slots) leave their xa
    rows as they were."""
    from moelora.ops.dense_lora import DenseLora, GivenShrink

    q, k_cache, v_cache, tables = paged_problem(seed, kv_lens, len(kv_lens), heads, d, 16, dtype)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    a = (torch.randn(3, 1, rank, hq * d, generator=g) * (hq * d) ** -0.5).to(dtype).to(DEV)
    ranks = torch.tensor([[rank], [rank // 2], [rank]], dtype=torch.int32, device=DEV)
    noisy = a.clone()
    a[1, :, rank // 2 :] = 0
    noisy[1, :, rank // 2 :] = float("nan")
    lora = DenseLora(noisy, torch.zeros(3, 8, rank, dtype=dtype, device=DEV), ranks)
    slot = torch.tensor([1, -1, 0, 3, 2, 2][: len(kv_lens)], dtype=torch.int32, device=DEV)
    xa = torch.full((hkv, len(kv_lens), rank), 123.0, device=DEV)
    out = kern.paged_decode(q, k_cache, v_cache, tables, lens, SCALE, None, splits=splits,
                            o_shrink=GivenShrink(xa, lora, slot))  # fmt: skip
    plain = kern.paged_decode(q, k_cache, v_cache, tables, lens, SCALE, None, splits=splits)
    assert torch.equal(out, plain), "the attention's output does not change"
    assert not launch_counters(q.device, 0).any()
    cols = hq // hkv * d
    for b, s in enumerate(slot.tolist()):
        if not 0 <= s < 3:
            assert (xa[:, b] == 123.0).all(), "no slot: its rows untouched"
            continue
        o = out[b].reshape(hkv, cols).double()
        want = torch.einsum("hc,rhc->hr", o, a[s, 0].reshape(rank, hkv, cols).double())
        err = (xa[:, b].double() - want).abs().max().item()
        assert err <= TOL[dtype] * max(1.0, want.abs().max().item()), err


@pytest.mark.parametrize(
    ("kv_lens", "heads", "d", "dtype", "splits"),
    [
        ((9, 37, 20, 5, 64), (8, 2), 32, torch.float16, 4),  # group 4, splits without keys
        ((50, 23, 3), (4, 4), 16, torch.float32, 1),  # MHA (group 1), one split: no merge
        ((40, 7), (6, 2), 16, torch.float32, 2),  # group 3: a padded head in the group
    ],
)
def test_decode_computes_the_output_projection_shrink(kv_lens, heads, d, dtype, splits):
    check_o_shrink(len(kv_lens), kv_lens, heads, d, dtype, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1])
@pytest.mark.parametrize("heads", [(32, 4), (64, 8)])  # Qwen3-30B-A3B; GPT-OSS (head dim 64 there)
def test_decode_o_shrink_gpu(heads, splits):
    check_o_shrink(7, (1, 512, 2000, 33), heads, 128 if heads[0] == 32 else 64, torch.bfloat16, splits)


def test_o_shrink_is_refused_where_it_does_not_fit():
    from moelora.ops.dense_lora import DenseLora, GivenShrink
    from moelora.ops.triton.attn_decode import o_shrink_fits

    assert o_shrink_fits(32, 4, 128, 16) and not o_shrink_fits(32, 4, 128, 32)
    q, k_cache, v_cache, tables = paged_problem(0, (5,), 1, (4, 2), 16, 16, torch.float32)
    lens = torch.tensor([5], dtype=torch.int32, device=DEV)
    lora = DenseLora(torch.zeros(2, 1, 8, 64, device=DEV), torch.zeros(2, 8, 8, device=DEV),
                     torch.full((2, 1), 8, dtype=torch.int32, device=DEV))  # fmt: skip
    slot = torch.zeros(1, dtype=torch.int32, device=DEV)
    for xa in (torch.zeros(2, 1, 4, device=DEV), torch.zeros(2, 1, 8, device=DEV).half()):
        with pytest.raises(ValueError, match="o_shrink"):
            kern.paged_decode(
                q, k_cache, v_cache, tables, lens, SCALE, None, o_shrink=GivenShrink(xa, lora, slot)
            )


def twin_rotated(x, weight, eps, weight_first, cos, sin):
    """The twins' per-head RMSNorm (weight None: none) then the rotary embedding of the first R features
    (cos [B, R]) of x [B, H, D], the rest passed through: what the layer's separate launches do."""
    from moelora.ops.torch import norm as twin_norm
    from moelora.ops.torch import rotary as twin_rotary

    b, _, d = x.shape
    if weight is not None:
        x = twin_norm.rms_norm(x.reshape(-1, d), weight, eps, weight_first=weight_first).view(b, -1, d)
    rot = cos.shape[-1]
    part, _ = twin_rotary.rotary(x[..., :rot], x[..., :rot], cos, sin)
    return torch.cat((part, x[..., rot:]), dim=-1)


def check_rotary_decode(seed, kv_lens, heads, d, page, dtype, window, splits, norm, rot, sinks=False) -> None:
    """The decode kernel given q, k and v before the per-head norm and the rotary embedding (`paged_decode`'s
    `rotary`; norm 0: none, 1: Qwen3's, 2: a zero-centred one, fp32 weights applied first; rot < d:
    partial rotary): against the twins' norm, rotary and cache write, then their paged attention. The
    new key's cache row starts as NaN (the kernel must store it before it reads it); the last sequence's
    slot lies outside the cache (a padding row: nothing stored, its old row read). The caches equal the
    twins' bit for bit in the interpreter; on the GPU within a rounding of the stored dtype (torch's
    rsqrt and sums round differently)."""
    from moelora.ops.triton.attn_decode import DecodeRotary

    q, k_cache, v_cache, tables = paged_problem(seed, kv_lens, len(kv_lens), heads, d, page, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    b, hkv = len(kv_lens), heads[1]
    k, v = (torch.randn(b, hkv, d, generator=g).to(dtype).to(DEV) for _ in range(2))
    angles = torch.randn(b, rot // 2, generator=g) * 3
    cos, sin = (f(torch.cat((angles, angles), -1)).to(dtype).to(DEV) for f in (torch.cos, torch.sin))
    rows = [int(tables[i, (n - 1) // page]) * page + (n - 1) % page for i, n in enumerate(kv_lens)]
    slots = torch.tensor([*rows[:-1], -1], dtype=torch.int64, device=DEV)
    for row in rows[:-1]:  # the new keys' rows: NaN until the kernel stores them
        k_cache.view(-1, hkv, d)[row] = float("nan")
        v_cache.view(-1, hkv, d)[row] = float("nan")
    qw = kw = None
    if norm:
        w_dtype = torch.float32 if norm == 2 else dtype
        qw, kw = ((1 + 0.3 * torch.randn(d, generator=g)).to(w_dtype).to(DEV) for _ in range(2))
    sink_logits = sinks_for(seed, heads[0], dtype, sinks)
    q_rot = twin_rotated(q, qw, 1e-6, norm == 2, cos, sin)
    k_rot = twin_rotated(k, kw, 1e-6, norm == 2, cos, sin)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()  # the twin's write_kv, but for the slot outside
    k_ref.view(-1, hkv, d)[rows[:-1]], v_ref.view(-1, hkv, d)[rows[:-1]] = k_rot[:-1], v[:-1]
    ones = (1,) * b
    ref = twin.paged_attention(q_rot, k_ref, v_ref, tables, ones, kv_lens, SCALE, window, sink_logits)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    rotary = DecodeRotary(k, v, cos, sin, slots, qw, kw, 1e-6, norm == 2)
    out = kern.paged_decode(
        q, k_cache, v_cache, tables, lens, SCALE, window, splits=splits, sinks=sink_logits, rotary=rotary
    )
    assert_close(out, ref)
    tol = 0.0 if DEV == "cpu" else 2**-7
    for got, want in ((k_cache, k_ref), (v_cache, v_ref)):
        torch.testing.assert_close(got, want, rtol=tol, atol=2 * tol, equal_nan=True)


@pytest.mark.parametrize(
    ("kv_lens", "heads", "d", "dtype", "window", "splits", "norm", "rot", "sinks"),
    [
        ((1, 37, 64, 20), (8, 2), 64, torch.float16, None, 4, 1, 64, False),  # the new key in split 0, 1, 3
        ((50, 23, 9), (4, 4), 32, torch.float32, 9, 3, 0, 32, False),  # a window
        ((80, 17), (8, 1), 64, torch.float32, None, 1, 1, 64, True),  # one split; GPT-OSS's sinks
        ((30, 70), (4, 2), 64, torch.float16, None, 2, 0, 32, False),  # GLM's partial rotary
        ((45, 12), (4, 1), 64, torch.float16, None, 3, 2, 16, False),  # Qwen3.5's: a quarter, zero-centred
        ((20, 33), (2, 1), 48, torch.float32, None, 2, 1, 24, False),  # a head of 48 (a 64-wide tile)
    ],
)
def test_rotary_in_decode_matches_twin(kv_lens, heads, d, dtype, window, splits, norm, rot, sinks):
    check_rotary_decode(sum(kv_lens), kv_lens, heads, d, 16, dtype, window, splits, norm, rot, sinks)


def test_rotary_decode_attention_op():
    """`ops.fuses_rotary_decode`: no on the twins, with `rotary_in_decode` off, or for a prefill step (the
    caller runs the separate ops; `rotary_decode_attention` refuses the twins); on the Triton kernels (the
    interpreter here) the decode launch does it all, and refuses a prefill step, a cos of the wrong shape
    and one norm weight without the other."""
    from moelora import ops
    from moelora.ops.cache_write import CacheWrite
    from moelora.ops.plan import TUNED
    from moelora.ops.triton.attn_decode import DecodeRotary, check_rotary

    q, k_cache, v_cache, tables = paged_problem(2, (5, 9), 2, (4, 2), 32, 16, torch.float32)
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(2, 2, 32, generator=g).to(DEV) for _ in range(2))
    cos, sin = torch.full((2, 16), 0.6, device=DEV), torch.full((2, 16), 0.8, device=DEV)
    slots = torch.tensor([int(tables[0, 0]) * 16 + 4, int(tables[1, 0]) * 16 + 8], device=DEV)
    write = CacheWrite(v, k_cache, v_cache, slots)
    args = (q, k, cos, sin, None, write, tables, (1, 1), (5, 9), SCALE, None)
    assert not ops.fuses_rotary_decode(q, k, write, (1, 1))
    with pytest.raises(ValueError, match="Triton kernels only"):
        ops.rotary_decode_attention(*args)
    ops.use_backend("triton")
    try:
        assert ops.fuses_rotary_decode(q, k, write, (1, 1))
        fused = ops.rotary_decode_attention(*args)
        off = dataclasses.replace(TUNED, rotary_in_decode=False)
        assert not ops.fuses_rotary_decode(q, k, write, (1, 1), plan=off)
        assert not ops.fuses_rotary_decode(q, k, write, (2, 1))  # a prefill step
    finally:
        ops.use_backend("auto")
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_rot, k_rot = twin_rotated(q, None, 0.0, False, cos, sin), twin_rotated(k, None, 0.0, False, cos, sin)
    k_ref.view(-1, 2, 32)[slots], v_ref.view(-1, 2, 32)[slots] = k_rot, v
    assert_close(fused, twin.paged_attention(q_rot, k_ref, v_ref, tables, (1, 1), (5, 9), SCALE, None))
    with pytest.raises(ValueError, match="one new token per sequence"):
        kern.rotary_decode(q, k, cos, sin, None, write, tables, (2,), (9,), SCALE, None)
    with pytest.raises(ValueError, match="even and at most"):
        check_rotary(DecodeRotary(k, v, cos[:, :5], sin[:, :5], slots, None, None, 0.0), q)
    with pytest.raises(ValueError, match="needs both weights"):
        check_rotary(DecodeRotary(k, v, cos, sin, slots, torch.ones(32), None, 1e-6), q)


def test_split_count_follows_the_batch_and_stays_capped():
    """One sequence in the engine's wide block table (Qwen3: 40,960 keys, 4 KV heads) no longer takes 128
    splits, most of them empty; larger batches take as many as before; a power of two, at least 1."""
    from moelora.ops.plan import TUNED
    from moelora.ops.triton.attn_decode import num_splits

    tiles = TUNED.attn_decode_tiles

    cpu = torch.device("cpu")  # counted as 132 multiprocessors
    got = {b: num_splits(b, 4, 40960, cpu, tiles) for b in (1, 2, 4, 16, 64, 256)}
    assert got == {1: 32, 2: 32, 4: 32, 16: 8, 64: 2, 256: 1}
    assert num_splits(1, 4, 1000, cpu, tiles) == 8  # capped by the capacity: 1000 / 128 keys
    uncapped = dataclasses.replace(tiles, max_splits=1 << 30)
    assert num_splits(1, 4, 40960, cpu, uncapped) == 128


@pytest.mark.parametrize(
    ("seq_lens", "heads", "d", "dtype", "window"),
    [
        ((5, 1, 20), (4, 4), 64, torch.float32, None),
        ((13, 30), (8, 2), 128, torch.float16, 5),
        ((140, 7), (8, 1), 64, torch.float32, None),
        ((9, 4), (4, 2), 8, torch.float32, None),  # a head dim below the dot's 16 (the test models')
    ],
)
def test_prefill_attention_matches_twin(seq_lens, heads, d, dtype, window):
    check_prefill(seq_lens[0], seq_lens, heads, d, dtype, window)


@pytest.mark.parametrize("case", [CPU_DECODE[1], CPU_DECODE[2], CPU_PAGED_PREFILL[2]])
def test_sinks_match_twin(case):
    """GPT-OSS's sinks: decode (one split and several), prefill over the cache and the dense prefill,
    sliding windows included; each head's sink joins its softmax once."""
    check_paged(len(case[0]) + 3, *case, with_sinks=True)
    seq_lens, kv_lens, heads, d, page, dtype, window = case
    if max(seq_lens) == 1:
        check_decode_splits(5, kv_lens, heads, d, page, dtype, window, 4, with_sinks=True)
    else:
        check_prefill(7, seq_lens, heads, d, dtype, window, with_sinks=True)


def test_paged_attention_rejects_inconsistent_lengths():
    q, k_cache, v_cache, tables = paged_problem(0, (5, 9), 3, (4, 2), 64, 16, torch.float32)
    with pytest.raises(ValueError, match="seq_lens"):
        kern.paged_attention(q, k_cache, v_cache, tables, (1, 1), (5, 9), SCALE, None)
    with pytest.raises(ValueError, match="kv_lens"):
        kern.paged_attention(q, k_cache, v_cache, tables, (2, 1), (1, 9), SCALE, None)


GPU_DECODE = [
    ((1,) * 13, (1, 16, 17, 255, 256, 1000, 3000, 4097, 77, 5, 64, 2048, 129), h, d, 16, torch.bfloat16, w)
    for h, d, w in [((32, 4), 128, None), ((8, 8), 64, None), ((16, 2), 128, 1024), ((32, 4), 64, 100)]
]
GPU_PAGED_PREFILL = [
    ((1000, 1, 300, 7), (1000, 3000, 2348, 7), (32, 4), 128, 16, torch.bfloat16, None),
    ((513, 1, 64), (4000, 90, 64), (8, 8), 64, 16, torch.bfloat16, 256),
    ((700, 260), (700, 1500), (16, 2), 128, 32, torch.bfloat16, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_DECODE + GPU_PAGED_PREFILL)
def test_paged_attention_gpu(case):
    check_paged(len(case[0]) + 7, *case)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("seq_lens", "heads", "d", "window"),
    [((2048,), (32, 4), 128, None), ((1000, 1, 517), (8, 1), 64, None), ((900, 33), (16, 2), 128, 200)],
)
def test_prefill_attention_gpu(seq_lens, heads, d, window):
    check_prefill(len(seq_lens), seq_lens, heads, d, torch.bfloat16, window)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [GPU_DECODE[3], GPU_PAGED_PREFILL[1]])
def test_sinks_gpu(case):
    """GPT-OSS's sinks (its 64-dim heads, 128-token windows) in bf16 on the GPU, decode and prefill."""
    check_paged(len(case[0]) + 11, *case, with_sinks=True)
    check_prefill(3, (700, 129), case[2], case[3], torch.bfloat16, case[6], with_sinks=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("heads", "d", "window", "norm", "rot"),
    [
        ((32, 4), 128, None, 1, 128),
        ((32, 4), 64, 100, 0, 64),
        ((16, 2), 256, None, 2, 64),
        ((96, 8), 128, None, 0, 64),
    ],
)  # Qwen3; GPT-OSS's head and window; Qwen3.5's full-attention layers; GLM-4.5-Air's partial rotary
@pytest.mark.parametrize("splits", [None, 32])
def test_rotary_in_decode_gpu(heads, d, window, norm, rot, splits):
    """The norm and rotary embedding inside the decode launch in bf16: the new key stored by the split
    that holds it, read back after the block's barrier, by every split count."""
    kv_lens = GPU_DECODE[0][1]
    check_rotary_decode(3, kv_lens, heads, d, 16, torch.bfloat16, window, splits, norm, rot)


@pytest.mark.gpu
@pytest.mark.cuda_graphs
def test_paged_decode_cuda_graph_replay():
    """Captured once, replayed with other lengths and block tables: no host sync, shapes-only sizing."""
    q, k_cache, v_cache, tables = paged_problem(5, (3000,) * 4, 4, (32, 4), 128, 16, torch.bfloat16)
    lens = torch.tensor((3000, 17, 1, 800), dtype=torch.int32, device=DEV)
    kern.paged_decode(q, k_cache, v_cache, tables, lens, SCALE, None)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kern.paged_decode(q, k_cache, v_cache, tables, lens, SCALE, None)
    for new_lens in ((2999, 40, 2, 1), (16, 3000, 1000, 33)):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        tables.copy_(tables.roll(1, 0))
        graph.replay()
        ones = (1,) * len(new_lens)
        assert_close(out, twin.paged_attention(q, k_cache, v_cache, tables, ones, new_lens, SCALE, None))


def check_latent_decode(seed, kv_lens, heads, rank, rope, page, dtype, splits=None) -> None:
    """DeepSeek's absorbed decode over a paged cache of latents (one K "head": the latent, one V "head":
    the rotated key part), NaN in every slot no sequence owns; the keys in `splits` (None: the shape
    rule's count)."""
    from moelora.ops.torch import mla as twin_mla
    from moelora.ops.triton import mla as kern_mla

    g = torch.Generator().manual_seed(seed)
    need = [-(-n // page) for n in kv_lens]
    num_blocks = sum(need) + 2
    latents = torch.full((num_blocks, page, 1, rank), float("nan"))
    rots = torch.full((num_blocks, page, 1, rope), float("nan"))
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(kv_lens), max(need) + 1, dtype=torch.int32)
    for b, n in enumerate(kv_lens):
        blocks, order = order[: need[b]], order[need[b] :]
        tables[b, : need[b]] = torch.tensor(blocks)
        flat = torch.tensor([blk * page + i for blk in blocks for i in range(page)][:n])
        latents.view(-1, rank)[flat] = torch.randn(n, rank, generator=g)
        rots.view(-1, rope)[flat] = torch.randn(n, rope, generator=g)
    q_lat = torch.randn(len(kv_lens), heads, rank, generator=g) * 0.3
    q_rot = torch.randn(len(kv_lens), heads, rope, generator=g) * 0.3
    q_lat, q_rot, latents, rots = (t.to(dtype).to(DEV) for t in (q_lat, q_rot, latents, rots))
    tables = tables.to(DEV)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    out = kern_mla.latent_decode(q_lat, q_rot, latents, rots, tables, lens, SCALE, splits=splits)
    assert_close(out, twin_mla.latent_decode(q_lat, q_rot, latents, rots, tables, kv_lens, SCALE))


@pytest.mark.parametrize(
    ("kv_lens", "heads", "rank", "rope", "page", "dtype"),
    [((1, 40, 17), 4, 32, 16, 16, torch.float32), ((33, 5), 20, 64, 8, 8, torch.float16)],
)
@pytest.mark.parametrize("splits", [1, 3, None])
def test_latent_decode_matches_twin(kv_lens, heads, rank, rope, page, dtype, splits):
    """The keys in one split, in three (short sequences leave some empty), and in the shape rule's count."""
    check_latent_decode(sum(kv_lens), kv_lens, heads, rank, rope, page, dtype, splits)


@pytest.mark.gpu
def test_latent_decode_gpu():
    """DeepSeek-V3's shapes (latent 512, rotated part 64, 16 heads a rank at TP 8) in bf16."""
    check_latent_decode(1, (1, 300, 4097, 64, 2000), 16, 512, 64, 16, torch.bfloat16)
    check_latent_decode(2, (512,), 16, 512, 64, 16, torch.bfloat16)  # batch 1: the keys split


def check_mla_prefill(seed, seq_lens, kv_lens, heads, dqk, dv, dtype) -> None:
    """Latent attention's expanded prefill: each sequence's new queries over all its keys (the cached ones
    first), keys wider than the values."""
    from moelora.ops.torch import mla as twin_mla

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(seq_lens), heads, dqk, generator=g).to(dtype).to(DEV)
    k = torch.randn(sum(kv_lens), heads, dqk, generator=g).to(dtype).to(DEV)
    v = torch.randn(sum(kv_lens), heads, dv, generator=g).to(dtype).to(DEV)
    out = kern.mla_attention(q, k, v, seq_lens, kv_lens, SCALE)
    assert out.shape == (q.shape[0], heads, dv)
    assert_close(out, twin_mla.mla_attention(q, k, v, seq_lens, kv_lens, SCALE))


@pytest.mark.parametrize(
    ("seq_lens", "kv_lens", "heads", "dqk", "dv", "dtype"),
    [((3, 5, 1), (7, 5, 40), 2, 24, 16, torch.float32), ((20, 2), (20, 9), 3, 48, 32, torch.float16)],
)
def test_mla_prefill_matches_twin(seq_lens, kv_lens, heads, dqk, dv, dtype):
    check_mla_prefill(sum(kv_lens), seq_lens, kv_lens, heads, dqk, dv, dtype)


def test_mla_prefill_rejects_inconsistent_lengths():
    q, k, v = torch.zeros(4, 2, 24), torch.zeros(9, 2, 24), torch.zeros(9, 2, 16)
    with pytest.raises(ValueError, match="kv_lens sum"):
        kern.mla_attention(q, k, v, (4,), (8,), SCALE)
    with pytest.raises(ValueError, match="seq_lens"):
        kern.mla_attention(q, k, v, (4,), (3,), SCALE)


@pytest.mark.gpu
def test_mla_prefill_gpu():
    """DeepSeek's expanded shapes (keys 128 + 64, values 128, 16 heads) in bf16, prompts continuing a
    cached prefix and whole ones."""
    check_mla_prefill(3, (1000, 300, 7, 129), (1500, 300, 20, 129), 16, 192, 128, torch.bfloat16)


def small_attention_config(preset: str, rotated: int):
    """A preset's model config with its attention shrunk to 4 heads of 32 (2 KV heads) over a 64-wide
    hidden state, the first `rotated` rotary frequencies kept."""
    from moelora.loader.model_loader import read_model_config
    from moelora.loader.presets import preset_path

    full, _ = read_model_config(preset_path(preset))
    return dataclasses.replace(
        full,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rope_inv_freq=full.rope_inv_freq[:rotated],
    )


def randomize(module: torch.nn.Module, g: torch.Generator) -> None:
    """Random weights: norms near 1, the rest scaled by their input width."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if "norm" in name else noise * p.shape[-1] ** -0.5)


@pytest.mark.parametrize(
    ("preset", "layer", "rotated"),
    [("qwen3-30b-a3b", 0, 16), ("glm-4.5-air", 1, 8), ("qwen3.5-35b-a3b", 3, 4)],
)  # rotary frequencies kept of a 32-wide head: whole (Qwen3's head norm), half (GLM, q/k/v biases),
# a quarter (Qwen3.5's gated full attention, zero-centred fp32 norms)
def test_attention_block_decode_in_one_launch(preset, layer, rotated, monkeypatch):
    """A decode step of a model's attention block (shrunk to 4 heads of 32) on the Triton kernels, where
    the decode launch takes the q/k norm, rotary and cache write (`ops.rotary_decode_attention`: the
    layer's wiring of the norm weights and the partial rotary), against the same step on the twins'
    separate ops: outputs and caches (within the q/k/v projection's rounding, which differs between the
    two; `weight_first`'s one rounding is checked exactly by `test_rotary_in_decode_matches_twin`)."""
    from moelora import ops
    from moelora.batch import ForwardBatch, PagedKV
    from moelora.cache.kv_cache import KVCache
    from moelora.layers.rotary import RotaryEmbedding
    from moelora.models.blocks import SelfAttention
    from moelora.ops.triton import attention as triton_attention
    from moelora.parallel.state import ParallelState

    cfg = small_attention_config(preset, rotated)
    block = SelfAttention(cfg, layer, ParallelState(), torch.float16)
    g = torch.Generator().manual_seed(layer)
    randomize(block, g)
    kv_lens, page = (5, 11), 4
    tables = torch.tensor([[2, 5, 0], [1, 3, 6]], dtype=torch.int32)
    slots = torch.tensor(
        [int(tables[b, (n - 1) // page]) * page + (n - 1) % page for b, n in enumerate(kv_lens)]
    )
    caches = []
    for _ in range(2):
        cache = KVCache(layer + 1, 8, page, 2, 32, torch.float16, torch.device("cpu"))
        cache.k[layer].copy_(torch.randn(cache.k[layer].shape, generator=torch.Generator().manual_seed(9)))
        cache.v[layer].copy_(torch.randn(cache.v[layer].shape, generator=torch.Generator().manual_seed(8)))
        caches.append(cache)
    positions = torch.tensor([n - 1 for n in kv_lens])
    cos, sin = RotaryEmbedding(cfg.rope_inv_freq, cfg.rope_attention_scaling).cos_sin(
        positions, torch.float16
    )
    x = torch.randn(2, 64, generator=g).half()
    calls = []
    fused = triton_attention.rotary_decode
    monkeypatch.setattr(triton_attention, "rotary_decode", lambda *a, **k: calls.append(1) or fused(*a, **k))
    outs = []
    for backend, cache in zip(("torch", "triton"), caches, strict=True):
        lens_dev = torch.tensor(kv_lens, dtype=torch.int32)
        batch = ForwardBatch(positions, (1, 1), PagedKV(cache, slots, tables, kv_lens, lens_dev))
        ops.use_backend(backend)
        try:
            outs.append(block(x, batch, cos, sin))
        finally:
            ops.use_backend("auto")
    assert calls == [1], "the Triton run takes the one decode launch"
    assert_close(outs[1], outs[0])
    for got, want in ((caches[1].k[layer], caches[0].k[layer]), (caches[1].v[layer], caches[0].v[layer])):
        torch.testing.assert_close(got, want, rtol=4e-3, atol=1e-3)  # (q/k/v: F.linear or the one launch)


@pytest.mark.parametrize(
    ("preset", "layer", "rotated"), [("qwen3-30b-a3b", 0, 16), ("glm-4.5-air", 1, 8), ("gpt-oss-20b", 0, 16)]
)  # Qwen3's head norm; GLM's q/k/v biases and half rotary; GPT-OSS's norm weight first, biases and sinks
def test_decoder_layer_takes_the_qkv_shrink_from_its_norm(preset, layer, rotated, monkeypatch):
    """A decode step of a decoder layer (the model's attention shrunk to 4 heads of 32, a small dense MLP)
    with adapters on q/k/v and o: on the Triton kernels the input norm's launch computes q/k/v's LoRA
    shrink (`ops.add_norm_shrink`) and q/k/v takes it, and the decode attention's launch computes o's
    (`ops.decode_o_shrink`); the same step on the twins, where each layer shrinks its own, gives the same
    outputs (within the fp16 roundings of the two), as does the Triton step with both shrinks apart."""
    from moelora import ops
    from moelora.batch import ForwardBatch, PagedKV
    from moelora.cache.kv_cache import KVCache
    from moelora.layers.rotary import RotaryEmbedding
    from moelora.models.blocks import DenseBlock, SelfAttention
    from moelora.models.decoder import DecoderLayer
    from moelora.ops.dense_lora import DenseLora
    from moelora.ops.plan import use_plan
    from moelora.ops.triton import attention as triton_attention
    from moelora.ops.triton import norm as triton_norm
    from moelora.parallel.state import ParallelState

    cfg = small_attention_config(preset, rotated)
    block = DecoderLayer(cfg, layer, ParallelState(), torch.float16)
    block.mlp = DenseBlock(64, 32, ParallelState(), torch.float16)
    g = torch.Generator().manual_seed(3)
    randomize(block, g)
    assert isinstance(block.self_attn, SelfAttention)
    qkv = block.self_attn.qkv
    a = (torch.randn(3, 3, 16, 64, generator=g) * 64**-0.5).half()
    b = (torch.randn(3, sum(qkv.out_sizes), 16, generator=g) * 0.5).half()
    qkv.lora = DenseLora(a, b, torch.tensor([[16, 16, 16], [8, 8, 8], [16, 16, 0]], dtype=torch.int32))
    b[1, :, 8:] = 0
    b[2, 128 + 64 :] = 0
    o_a = (torch.randn(3, 1, 16, 128, generator=g) * 128**-0.5).half()
    o_b = (torch.randn(3, 64, 16, generator=g) * 0.5).half()
    o_a[2, :, :, 8:] = float("nan")  # slot 2's o has rank 8: NaN padding, never read
    o_b[2, :, 8:] = float("nan")
    o_rank = torch.tensor([[16], [16], [8]], dtype=torch.int32)
    block.self_attn.o_proj.lora = DenseLora(o_a, o_b, o_rank)
    token_slot = torch.tensor([1, -1, 0], dtype=torch.int32)  # an adapter, none, another
    kv_lens, page = (5, 11, 3), 4
    tables = torch.tensor([[2, 5, 0], [1, 3, 6], [4, 7, 8]], dtype=torch.int32)
    slots = torch.tensor(
        [int(tables[i, (n - 1) // page]) * page + (n - 1) % page for i, n in enumerate(kv_lens)]
    )
    positions = torch.tensor([n - 1 for n in kv_lens])
    cos, sin = RotaryEmbedding(cfg.rope_inv_freq, cfg.rope_attention_scaling).cos_sin(
        positions, torch.float16
    )
    x, residual = torch.randn(3, 64, generator=g).half(), torch.randn(3, 64, generator=g).half()
    calls, o_calls = [], []
    fused = triton_norm.add_norm_shrink
    monkeypatch.setattr(triton_norm, "add_norm_shrink", lambda *a, **k: calls.append(1) or fused(*a, **k))
    attend = triton_attention.rotary_decode
    monkeypatch.setattr(
        triton_attention,
        "rotary_decode",
        lambda *a, **k: o_calls.append(a[-1] is not None) or attend(*a, **k),
    )
    outs = []
    apart = "norm_shrink_tokens=0, o_shrink_tokens=0"
    for backend, plan in (("torch", ""), ("triton", apart), ("triton", "")):
        cache = KVCache(layer + 1, 12, page, 2, 32, torch.float16, torch.device("cpu"))
        cache.k[layer].copy_(torch.randn(cache.k[layer].shape, generator=torch.Generator().manual_seed(9)))
        cache.v[layer].copy_(torch.randn(cache.v[layer].shape, generator=torch.Generator().manual_seed(8)))
        lens_dev = torch.tensor(kv_lens, dtype=torch.int32)
        batch = ForwardBatch(
            positions, (1, 1, 1), PagedKV(cache, slots, tables, kv_lens, lens_dev), token_slot
        )
        ops.use_backend(backend)
        use_plan(plan)
        try:
            outs.append(block(x, residual, batch, cos, sin))
        finally:
            ops.use_backend("auto")
            use_plan("")
    assert calls == [1], "the shipped plan's Triton run computes q/k/v's shrink in the norm's launch"
    assert o_calls == [False, True], "and o's in the attention's launch"
    for got, apart, want in zip(outs[2], outs[1], outs[0], strict=True):
        # against q/k/v's own shrink on the same kernels: xa summed in another order only
        torch.testing.assert_close(got, apart, rtol=2e-3, atol=1e-3)
        # against the twins: fp16 roundings in different places (fused rotary, one-launch GEMV)
        torch.testing.assert_close(got, want, rtol=4e-3, atol=4e-3)
    qkv.lora = block.self_attn.o_proj.lora = None
    ops.use_backend("torch")
    try:
        base = block(x, residual, batch, cos, sin)[0]
    finally:
        ops.use_backend("auto")
    assert (base[0] - outs[0][0][0]).abs().max() > 0.05, "the adapter must move the output"
