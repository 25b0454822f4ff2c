"""The small per-layer Triton kernels against their PyTorch twins: RMSNorm with and without the fused
residual add, rotary embedding of q and k (with Qwen3's per-head q/k norm), and the paged KV write.

Ragged token counts, hidden sizes off the powers of two, head dims 64 and 128, GQA ratios 1, 4 and 8,
q/k/v as the strided column slices the attention block passes. Without CUDA the kernels run in Triton's
interpreter (tiny shapes, fp32/fp16); `TRITON_INTERPRET` must be set before `triton.language` is
imported (tests/conftest.py does; the line below covers another conftest). On GPU: bf16, Qwen3-30B-A3B
shapes, and one CUDA-graph capture of all of them replayed with new inputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from moelora import LLM, SamplingParams, ops  # noqa: E402
from moelora.layers.rotary import RotaryEmbedding  # noqa: E402
from moelora.models.config import rope_from_hf  # noqa: E402
from moelora.ops.cache_write import CacheWrite  # noqa: E402
from moelora.ops.torch import attention as twin_attention  # noqa: E402
from moelora.ops.torch import norm as twin_norm  # noqa: E402
from moelora.ops.torch import rotary as twin_rotary  # noqa: E402
from moelora.ops.triton import kv_write as kern_kv  # noqa: E402
from moelora.ops.triton import norm as kern_norm  # noqa: E402
from moelora.ops.triton import rotary as kern_rotary  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-6


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Max error relative to the reference's largest entry: one rounding step of the dtype at most."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "non-finite output"
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= TOL[out.dtype] * max(1.0, ref.double().abs().max().item()), err


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype, offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) + offset).to(dtype).to(DEV)


def qkv_views(g: torch.Generator, t: int, heads: tuple[int, int], d: int, dtype: torch.dtype):
    """q [T, Hq, D], k and v [T, Hkv, D] as column slices of one projection, as SelfAttention has them."""
    hq, hkv = heads
    qkv = randn(g, t, (hq + 2 * hkv) * d, dtype=dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)


def cos_sin(g: torch.Generator, t: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's cos/sin rows for random positions (up to 32k), Qwen3's rope_theta."""
    hf = type("Cfg", (), {"rope_theta": 1e6, "head_dim": d, "hidden_size": d, "num_attention_heads": 1})
    rope = RotaryEmbedding(*rope_from_hf(hf)).to(DEV)
    positions = torch.randint(0, 32768, (t,), generator=g).to(DEV)
    return rope.cos_sin(positions, dtype)


def check_rms_norm(seed: int, t: int, hidden: int, dtype: torch.dtype, residual: bool, first=False) -> None:
    g = torch.Generator().manual_seed(seed)
    x = randn(g, t, hidden, dtype=dtype)
    w = randn(g, hidden, dtype=dtype, offset=1.0)
    if not residual:
        out = kern_norm.rms_norm(x, w, EPS, weight_first=first)
        assert out.dtype == x.dtype
        assert_close(out, twin_norm.rms_norm(x, w, EPS, weight_first=first))
        return
    r = randn(g, t, hidden, dtype=dtype)
    y, s = kern_norm.rms_norm(x, w, EPS, r, first)
    y_ref, s_ref = twin_norm.rms_norm(x, w, EPS, r, first)
    assert torch.equal(s, s_ref), "the residual add rounds as the twin's"
    assert_close(y, y_ref)


def check_rotary(seed: int, t: int, heads: tuple[int, int], d: int, dtype: torch.dtype, norm: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    q, k, _ = qkv_views(g, t, heads, d, dtype)
    cos, sin = cos_sin(g, t, d, dtype)
    if norm:
        qw, kw = randn(g, d, dtype=dtype, offset=1.0), randn(g, d, dtype=dtype, offset=1.0)
        out = kern_rotary.qk_norm_rotary(q, k, qw, kw, EPS, cos, sin)
        ref = twin_rotary.qk_norm_rotary(q, k, qw, kw, EPS, cos, sin)
    else:
        out, ref = kern_rotary.rotary(q, k, cos, sin), twin_rotary.rotary(q, k, cos, sin)
    assert_close(out[0], ref[0])
    assert_close(out[1], ref[1])


def kv_problem(seed: int, t: int, hkv: int, d: int, page: int, dtype: torch.dtype, cache_dtype: torch.dtype):
    """k, v as projection slices; random-filled caches with room for 3t tokens; t distinct shuffled slots."""
    g = torch.Generator().manual_seed(seed)
    _, k, v = qkv_views(g, t, (hkv, hkv), d, dtype)
    blocks = -(-3 * t // page)
    k_cache = randn(g, blocks, page, hkv, d, dtype=cache_dtype)
    v_cache = randn(g, blocks, page, hkv, d, dtype=cache_dtype)
    slots = torch.randperm(blocks * page, generator=g)[:t].to(DEV)
    return k, v, k_cache, v_cache, slots


def check_write_kv(seed: int, t: int, hkv: int, d: int, page: int, dtype, cache_dtype) -> None:
    k, v, k_cache, v_cache, slots = kv_problem(seed, t, hkv, d, page, dtype, cache_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    twin_attention.write_kv(k, v, k_ref, v_ref, slots)
    kern_kv.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(
    ("t", "hidden", "dtype"),
    [(1, 96, torch.float32), (7, 160, torch.float16), (33, 96, torch.float16), (7, 64, torch.float32)],
)
def test_rms_norm_matches_twin(t, hidden, dtype, residual):
    check_rms_norm(t + hidden, t, hidden, dtype, residual)
    check_rms_norm(t + hidden, t, hidden, dtype, residual, first=True)  # GPT-OSS's order


@pytest.mark.parametrize(("t", "inter", "dtype"), [(1, 24, torch.float32), (5, 1100, torch.float16)])
def test_silu_mul_matches_twin(t, inter, dtype):
    """The dense MLP's silu(gate) * up from its stacked gate/up output (the rows a strided view, the
    intermediate over one and several column tiles)."""
    from moelora.ops.torch import activation as twin_act
    from moelora.ops.triton import activation as kern_act

    g = torch.Generator().manual_seed(t)
    gate_up = (torch.randn(t, 2 * inter + 8, generator=g) * 3).to(DEV, dtype)[:, : 2 * inter]
    assert_close(kern_act.silu_mul(gate_up), twin_act.silu_mul(gate_up))


@pytest.mark.parametrize(("t", "hidden", "dtype"), [(1, 40, torch.float32), (6, 1100, torch.float16)])
def test_add_gated_matches_twin(t, hidden, dtype):
    """The gated shared expert's add (sigmoid of one logit a token, product, sum) against the twin,
    logits from strongly negative to strongly positive, the gate a column of a wider tensor."""
    from moelora.ops.torch import activation as twin_act
    from moelora.ops.triton import activation as kern_act

    g = torch.Generator().manual_seed(t + 40)
    base, x = (torch.randn(t, hidden, generator=g) * 2).to(DEV, dtype), torch.randn(t, hidden, generator=g)
    gate = (torch.randn(t, 3, generator=g) * 6).to(DEV, dtype)[:, 1:2]
    x = x.to(DEV, dtype)
    assert_close(kern_act.add_gated(base, x, gate), twin_act.add_gated(base, x, gate))


def test_rms_norm_of_head_rows_and_strided_input():
    """[T, H, D] input (the twin's any-leading-dims form) and a column slice of a wider tensor."""
    g = torch.Generator().manual_seed(3)
    x = randn(g, 5, 3, 64, dtype=torch.float32)
    w = randn(g, 64, dtype=torch.float32, offset=1.0)
    assert_close(kern_norm.rms_norm(x, w, EPS), twin_norm.rms_norm(x, w, EPS))
    wide = randn(g, 7, 200, dtype=torch.float16)[:, 40:136]
    w = randn(g, 96, dtype=torch.float16, offset=1.0)
    y, s = kern_norm.rms_norm(wide, w, EPS, wide)
    y_ref, s_ref = twin_norm.rms_norm(wide, w, EPS, wide)
    assert torch.equal(s, s_ref)
    assert_close(y, y_ref)


# (tokens, (Hq, Hkv), D, dtype): GQA ratios 1, 4, 8
CPU_ROTARY = [
    (1, (4, 4), 64, torch.float32),
    (7, (8, 2), 128, torch.float16),
    (33, (8, 1), 64, torch.float16),
    (7, (4, 4), 128, torch.float32),
    (33, (8, 2), 64, torch.float32),
]


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("case", CPU_ROTARY)
def test_rotary_matches_twin(case, norm):
    check_rotary(case[0] + case[2], *case, norm)


# (tokens, Hkv, D, block size, k/v dtype, cache dtype)
CPU_WRITE_KV = [
    (1, 4, 64, 16, torch.float32, torch.float32),
    (7, 2, 128, 16, torch.float16, torch.float16),
    (33, 1, 64, 8, torch.float16, torch.float16),
    (7, 4, 128, 16, torch.float32, torch.float16),  # cast to the cache's dtype
]


@pytest.mark.parametrize("case", CPU_WRITE_KV)
def test_write_kv_matches_twin(case):
    check_write_kv(case[0], *case)


def test_write_kv_never_writes_outside_the_cache():
    """Slots outside [0, num_slots) are outside the contract; the kernel must not write anything for them."""
    k, v, k_cache, v_cache, slots = kv_problem(4, 9, 2, 64, 8, torch.float32, torch.float32)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    bad = torch.tensor([0, 3, 8], device=DEV)
    slots[bad] = torch.tensor([-1, num_slots, -num_slots - 5], device=DEV)
    good = torch.ones(9, dtype=torch.bool, device=DEV)
    good[bad] = False
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    twin_attention.write_kv(k[good], v[good], k_ref, v_ref, slots[good])
    kern_kv.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("case", [CPU_ROTARY[1], CPU_ROTARY[3]])
def test_rotary_writes_the_cache_like_write_kv(case, norm):
    """The rotary launch that also stores the step's keys (rotated) and values: the same q and k as the
    twin, the caches equal to the twin's write_kv of the rotated k (cast to a cache of another dtype
    too), and slots outside the cache never written."""
    t, heads, d, dtype = case
    g = torch.Generator().manual_seed(t + d)
    q, k, v = qkv_views(g, t, heads, d, dtype)
    cos, sin = cos_sin(g, t, d, dtype)
    blocks, page = -(-3 * t // 4), 4
    for cache_dtype in (dtype, torch.float16):
        k_cache = randn(g, blocks, page, heads[1], d, dtype=cache_dtype)
        v_cache = randn(g, blocks, page, heads[1], d, dtype=cache_dtype)
        slots = torch.randperm(blocks * page, generator=g)[:t].to(DEV)
        slots[0] = -1 if t > 1 else slots[0]  # outside the cache: nothing written for that token
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        weights = (randn(g, d, dtype=dtype, offset=1.0), randn(g, d, dtype=dtype, offset=1.0))
        kern_args, twin_args = (k_cache, v_cache), (k_ref, v_ref)
        if norm:
            out = kern_rotary.qk_norm_rotary(q, k, *weights, EPS, cos, sin, CacheWrite(v, *kern_args, slots))
            ref = twin_rotary.qk_norm_rotary(q, k, *weights, EPS, cos, sin)
        else:
            out = kern_rotary.rotary(q, k, cos, sin, CacheWrite(v, *kern_args, slots))
            ref = twin_rotary.rotary(q, k, cos, sin)
        good = slots >= 0
        twin_attention.write_kv(out[1][good], v[good], *twin_args, slots[good])
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        assert_close(out[0], ref[0])
        assert_close(out[1], ref[1])


def test_launchers_refuse_mismatched_shapes():
    g = torch.Generator().manual_seed(0)
    q, k, v = qkv_views(g, 4, (4, 2), 64, torch.float32)
    cos, sin = cos_sin(g, 4, 64, torch.float32)
    with pytest.raises(ValueError, match="partial rotary"):
        kern_rotary.rotary(q, k, cos[:, :32], sin[:, :32])
    with pytest.raises(ValueError, match="one dtype"):
        kern_rotary.rotary(q, k, cos.half(), sin.half())
    with pytest.raises(ValueError, match="residual"):
        kern_norm.rms_norm(q.reshape(4, -1), torch.ones(256, device=DEV), EPS, q.reshape(4, -1).half())
    cache = torch.zeros(2, 16, 2, 32, device=DEV)
    with pytest.raises(ValueError, match="write_kv"):
        kern_kv.write_kv(k, v, cache, cache, torch.arange(4, device=DEV))


def generate(folder: Path) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prompt logits (cacheless forward) and greedy tokens (paged KV cache) of a tiny model in fp32."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (6, 1, 11)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with LLM(str(folder), device=DEV, progress=False, num_kv_blocks=16) as llm:
        return llm.logits(prompts), [out.token_ids for out in llm.generate(prompts, params)]


# per-head q/k norm; whole-projection norm; per-head norm with half of each head rotated (GLM-4.5)
@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "glm4_moe"])
def test_model_with_small_kernels_matches_twins(family, checkpoints, monkeypatch):
    """The decoder's residual carry, q/k norm, rotary and KV writes through the kernels (fp32: the
    interpreter on CPU, forced on GPU) give the twins' logits and greedy tokens; other ops as chosen."""
    logits, tokens = generate(checkpoints[family])
    twin_kernels = ops._half_kernels

    def small_ops_on_triton(name, t, *others):
        if name in ("norm", "rotary", "kv_write"):
            return ops._triton_module(name)
        return twin_kernels(name, t, *others)

    monkeypatch.setattr(ops, "_half_kernels", small_ops_on_triton)
    kern_logits, kern_tokens = generate(checkpoints[family])
    assert kern_tokens == tokens
    for out, ref in zip(kern_logits, logits, strict=True):
        assert_close(out, ref)


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_model_with_attention_kernels_matches_twins(family, checkpoints, tmp_path, monkeypatch):
    """DeepSeek's absorbed decode (the latent kernel, fed the step's device lengths) and GPT-OSS's sinks
    (the prefill and decode kernels, sliding windows shorter than the prompts) inside the model give the
    twins' logits and greedy tokens (fp32: the interpreter on CPU, forced on GPU)."""
    from tests.hf_models import build_hf_model

    folder = checkpoints.get(family)
    if folder is None:
        folder = tmp_path / family
        build_hf_model(family).save_pretrained(folder)
    logits, tokens = generate(folder)
    twin_kernels = ops._half_kernels

    def attention_on_triton(name, t, *others):
        if name in ("mla", "attention"):
            return ops._triton_module(name)
        return twin_kernels(name, t, *others)

    monkeypatch.setattr(ops, "_half_kernels", attention_on_triton)
    kern_logits, kern_tokens = generate(folder)
    assert kern_tokens == tokens
    for out, ref in zip(kern_logits, logits, strict=True):
        assert_close(out, ref)


GPU_ROTARY = [(t, (32, 4), 128) for t in (1, 7, 33, 2048)] + [
    (33, (8, 8), 64),
    (513, (16, 2), 128),
    (7, (8, 1), 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(("t", "hidden"), [(1, 2048), (7, 96), (33, 160), (2048, 2048), (8192, 4096)])
def test_rms_norm_gpu(t, hidden, residual):
    check_rms_norm(t, t, hidden, torch.bfloat16, residual)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize(("t", "heads", "d"), GPU_ROTARY)
def test_rotary_gpu(t, heads, d, norm):
    check_rotary(t, t, heads, d, torch.bfloat16, norm)


@pytest.mark.gpu
@pytest.mark.parametrize(("t", "hkv", "d"), [(1, 4, 128), (7, 1, 64), (33, 2, 128), (8192, 4, 128)])
def test_write_kv_gpu(t, hkv, d):
    check_write_kv(t, t, hkv, d, 16, torch.bfloat16, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.cuda_graphs
def test_small_ops_cuda_graph_replay():
    """Captured once, replayed with new inputs, positions and slots: no host sync, shapes-only sizing."""
    g = torch.Generator().manual_seed(9)
    t, hidden, heads, d, dtype = 64, 2048, (32, 4), 128, torch.bfloat16
    x, r = randn(g, t, hidden, dtype=dtype), randn(g, t, hidden, dtype=dtype)
    w = randn(g, hidden, dtype=dtype, offset=1.0)
    q, k, v = qkv_views(g, t, heads, d, dtype)
    qw, kw = randn(g, d, dtype=dtype, offset=1.0), randn(g, d, dtype=dtype, offset=1.0)
    cos, sin = cos_sin(g, t, d, dtype)
    _, _, k_cache, v_cache, slots = kv_problem(1, t, heads[1], d, 16, dtype, dtype)

    def step():
        y, s = kern_norm.rms_norm(x, w, EPS, r)
        qo, ko = kern_rotary.qk_norm_rotary(q, k, qw, kw, EPS, cos, sin)
        kern_kv.write_kv(ko, v, k_cache, v_cache, slots)
        return y, s, qo, ko

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        for buf in (x, r, q, k, v):
            buf.copy_(randn(g, *buf.shape, dtype=dtype))
        new_cos, new_sin = cos_sin(g, t, d, dtype)
        cos.copy_(new_cos)
        sin.copy_(new_sin)
        slots.copy_(torch.randperm(k_cache.shape[0] * 16, generator=g)[:t].to(DEV))
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        graph.replay()
        y_ref, s_ref = twin_norm.rms_norm(x, w, EPS, r)
        qo_ref, ko_ref = twin_rotary.qk_norm_rotary(q, k, qw, kw, EPS, cos, sin)
        twin_attention.write_kv(ko_ref, v, k_ref, v_ref, slots)
        for out, ref in zip(outs, (y_ref, s_ref, qo_ref, ko_ref), strict=True):
            assert_close(out, ref)
        assert_close(k_cache, k_ref)
        assert torch.equal(v_cache, v_ref)
