"""The linear-attention token mixers of Qwen3-Next / Qwen3.5-MoE (issue #23): the PyTorch twins against
transformers' own torch functions (fp32), and the Triton one-token steps against the twins (Triton's
interpreter without a GPU), with padding rows whose slot is outside the state cache."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moelora.ops.plan import DeltaTiles, KernelPlan
from moelora.ops.torch import delta as twin

DEV = "cuda" if torch.cuda.is_available() else "cpu"
hf_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")


def problem(seed: int, tokens: int, hk: int, hv: int, dk: int, dv: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, hk, dk, generator=g)
    k = torch.randn(tokens, hk, dk, generator=g)
    v = torch.randn(tokens, hv, dv, generator=g)
    # decays as the layer makes them: -exp(A_log) * softplus(a + dt_bias), some near 0, some strong
    gate = (
        -torch.rand(hv, generator=g) * 2 * torch.nn.functional.softplus(torch.randn(tokens, hv, generator=g))
    )
    beta = torch.rand(tokens, hv, generator=g)
    return q, k, v, gate, beta


@pytest.mark.parametrize(("hk", "hv", "dk", "dv"), [(2, 2, 16, 8), (2, 6, 8, 16)])
def test_delta_rule_matches_transformers(hk, hv, dk, dv):
    """Three sequences back to back (one longer than transformers' 64-token chunk), the middle one from a
    nonzero state: outputs and final states equal transformers' chunked and recurrent functions'."""
    seq_lens = (5, 70, 1)
    q, k, v, gate, beta = problem(hk + hv, sum(seq_lens), hk, hv, dk, dv)
    initial = torch.randn(len(seq_lens), hv, dk, dv, generator=torch.Generator().manual_seed(1)) * 0.3
    initial[0] = 0
    out, finals = twin.gated_delta_rule(q, k, v, gate, beta, seq_lens, initial)
    start = 0
    for b, n in enumerate(seq_lens):
        rows = slice(start, start + n)
        # heads repeated here: transformers 5.17's functions take as many query/key heads as value heads
        qh, kh = (t[rows].repeat_interleave(hv // hk, dim=1) for t in (q, k))
        args = [t[None] for t in (qh, kh, v[rows], gate[rows], beta[rows])]
        for fn in (hf_next.torch_chunk_gated_delta_rule, hf_next.torch_recurrent_gated_delta_rule):
            ref, ref_state = fn(
                *args[:3], g=args[3], beta=args[4], initial_state=initial[b : b + 1],
                output_final_state=True, use_qk_l2norm_in_kernel=True,
            )  # fmt: skip
            torch.testing.assert_close(out[rows], ref[0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(finals[b], ref_state[0], atol=2e-5, rtol=1e-4)
        start += n


def test_delta_step_continues_the_sequence():
    """Decode steps from the state cache continue a prefill exactly; a padding row (slot -1) writes
    nothing, and slots not named are untouched."""
    q, k, v, gate, beta = problem(3, 9, 2, 4, 8, 8)
    whole, _ = twin.gated_delta_rule(q, k, v, gate, beta, (9,))
    _, state = twin.gated_delta_rule(q[:6], k[:6], v[:6], gate[:6], beta[:6], (6,))
    states = torch.full((3, 4, 8, 8), float("nan"))
    states[1] = state[0]
    for t in range(6, 9):
        rows = [t, t]  # the sequence in slot 1, and a padding row
        o = twin.gated_delta_step(
            q[rows], k[rows], v[rows], gate[rows], beta[rows], states, torch.tensor([1, -1])
        )
        torch.testing.assert_close(o[0], whole[t], atol=1e-6, rtol=1e-5)
    assert states[0].isnan().all() and states[2].isnan().all()


def test_conv_matches_transformers():
    """The depthwise causal convolution with SiLU over sequences back to back, one continuing from a
    state, and its one-token update: transformers' causal_conv1d_fn and causal_conv1d_update."""
    g = torch.Generator().manual_seed(4)
    channels, width, seq_lens = 6, 4, (7, 2, 1)
    x = torch.randn(sum(seq_lens), channels, generator=g)
    weight = torch.randn(channels, width, generator=g)
    initial = torch.randn(len(seq_lens), channels, width - 1, generator=g)
    y, states = twin.causal_conv(x, weight, seq_lens, initial)
    start = 0
    for b, n in enumerate(seq_lens):
        u = torch.cat((initial[b], x[start : start + n].T), dim=1)[None]
        ref = hf_next.causal_conv1d_fn(u, weight, None, activation="silu")[0, :, width - 1 :]
        torch.testing.assert_close(y[start : start + n], ref.T)
        torch.testing.assert_close(states[b], u[0, :, -(width - 1) :])
        start += n
    # one more token for each sequence, through the update
    cache = torch.full((5, channels, width - 1), float("nan"))
    cache[[3, 0, 4]] = states
    nxt = torch.randn(3, channels, generator=g)
    out = twin.causal_conv_step(nxt, weight, cache, torch.tensor([3, 0, 4]))
    for b, slot in enumerate((3, 0, 4)):
        hf_state = torch.cat((states[b], torch.zeros(channels, 1)), dim=1)[None]  # transformers keeps K
        hf_state = torch.roll(hf_state, 1, dims=2)  # (its state holds the K newest inputs)
        ref = hf_next.causal_conv1d_update(nxt[b][None, :, None], hf_state, weight, None, activation="silu")
        torch.testing.assert_close(out[b], ref[0, :, 0])
        torch.testing.assert_close(cache[slot], torch.cat((states[b][:, 1:], nxt[b][:, None]), dim=1))
    assert cache[[1, 2]].isnan().all()


def test_triton_delta_step_matches_twin():
    """The Triton step against the twin: grouped value heads, value columns over several programs, a
    padding row and slots not named (NaN) untouched."""
    from moelora.ops.triton import delta as kern

    q, k, v, gate, beta = (t.to(DEV) for t in problem(7, 3, 2, 6, 16, 48))
    g = torch.Generator().manual_seed(8)
    states = torch.full((5, 6, 16, 48), float("nan"))
    states[[4, 1]] = torch.randn(2, 6, 16, 48, generator=g)
    states = states.to(DEV)
    slots = torch.tensor([4, -1, 1], device=DEV)
    expect = states.clone()
    ref = twin.gated_delta_step(q, k, v, gate, beta, expect, slots)
    out = kern.gated_delta_step(q, k, v, gate, beta, states, slots)
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[[4, 1]], expect[[4, 1]], atol=1e-5, rtol=1e-5)
    assert states[[0, 2, 3]].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_delta_step_takes_its_gates(dtype):
    """The step given the projections a and b (`delta_step_with_gates`): against the Triton gates launch
    then the step, bit for bit (the same values: beta rounded to b's dtype as stored), and against the
    twins; a and b as the column halves of one projection's output, softplus past its threshold, a
    padding row; wrong-sized A_log refused."""
    from moelora import ops
    from moelora.ops.triton import delta as kern

    q, k, v, _, _ = (t.to(DEV, dtype) for t in problem(7, 3, 2, 6, 16, 48))
    g = torch.Generator().manual_seed(22)
    ab = (torch.randn(3, 12, generator=g) * 6).to(DEV, dtype)
    ab[0, :2] = torch.tensor([30.0, -30.0])
    a, b = ab[:, :6], ab[:, 6:]
    a_log, dt_bias = torch.randn(6, generator=g).to(DEV, dtype), torch.randn(6, generator=g).to(DEV, dtype)
    states = torch.full((5, 6, 16, 48), float("nan"))
    states[[4, 1]] = torch.randn(2, 6, 16, 48, generator=g)
    states = states.to(DEV)
    slots = torch.tensor([4, -1, 1], device=DEV)
    apart, ref, initial = states.clone(), states.clone(), states.clone().cpu()
    out = kern.delta_step_with_gates(q, k, v, a, b, a_log, dt_bias, states, slots)
    want = kern.gated_delta_step(q, k, v, *kern.delta_gates(a, b, a_log, dt_bias), apart, slots)
    assert torch.equal(out[[0, 2]], want[[0, 2]]) and torch.equal(states[[4, 1]], apart[[4, 1]])
    twin_out = twin.gated_delta_step(q, k, v, *twin.delta_gates(a, b, a_log, dt_bias), ref, slots)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[[0, 2]], twin_out[[0, 2]], atol=tol, rtol=tol)
    torch.testing.assert_close(states[[4, 1]], ref[[4, 1]], atol=tol, rtol=tol)
    assert states[[0, 2, 3]].isnan().all()
    args = (t.cpu() for t in (q, k, v, a, b, a_log, dt_bias))
    cpu = ops.delta_step_with_gates(*args, initial, slots.cpu())  # the twins on the CPU: gates, then step
    assert torch.equal(cpu[[0, 2]], twin_out[[0, 2]].cpu()) and torch.equal(
        initial[[4, 1]], ref[[4, 1]].cpu()
    )
    with pytest.raises(ValueError, match="A_log"):
        kern.delta_step_with_gates(q, k, v, a, b, a_log[:5], dt_bias, states, slots)


def test_triton_conv_step_matches_twin():
    from moelora.ops.triton import delta as kern

    g = torch.Generator().manual_seed(9)
    channels, width = 300, 4  # two channel tiles, the second part-filled
    x = torch.randn(3, channels, generator=g).to(DEV)
    weight = torch.randn(channels, width, generator=g).to(DEV)
    states = torch.full((4, channels, width - 1), float("nan"))
    states[[2, 0]] = torch.randn(2, channels, width - 1, generator=g)
    states = states.to(DEV)
    slots = torch.tensor([2, 0, -1], device=DEV)
    expect = states.clone()
    ref = twin.causal_conv_step(x, weight, expect, slots)
    out = kern.causal_conv_step(x, weight, states, slots)
    torch.testing.assert_close(out[:2], ref[:2])
    torch.testing.assert_close(states[[2, 0]], expect[[2, 0]])
    assert states[[1, 3]].isnan().all()


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize(("hk", "hv", "dk", "dv", "chunk"), [(2, 4, 16, 48, 16), (1, 2, 24, 16, 32)])
def test_triton_chunked_delta_rule_matches_twin(hk, hv, dk, dv, chunk, split: bool):
    """The chunked Triton prefill against the twin's recurrence: sequences shorter than, equal to and
    longer than a chunk (a partial last chunk), grouped value heads, value columns over several programs,
    head dims that are not powers of two, from zeros and from a given state; each chunk's (I + A)^-1
    solved in a launch of its own (`split`, every chunk of every sequence at once) or in the walk."""
    from moelora.ops.triton import delta_prefill as kern

    seq_lens = (3, chunk, 2 * chunk + 5)
    q, k, v, gate, beta = (t.to(DEV) for t in problem(11, sum(seq_lens), hk, hv, dk, dv))
    initial = torch.randn(len(seq_lens), hv, dk, dv, generator=torch.Generator().manual_seed(12)).to(DEV)
    for init in (None, initial * 0.3):
        ref, ref_finals = twin.gated_delta_rule(q, k, v, gate, beta, seq_lens, init)
        plan = KernelPlan(delta=DeltaTiles(chunk=chunk, split=split))
        out, finals = kern.gated_delta_rule(q, k, v, gate, beta, seq_lens, init, plan)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(finals, ref_finals, atol=2e-5, rtol=1e-4)


def test_triton_conv_matches_twin():
    """The Triton convolution over whole sequences against the twin: sequences shorter than the kernel's
    width (their state partly the initial one), longer than a token tile, two channel tiles."""
    from moelora.ops.triton import delta_prefill as kern

    g = torch.Generator().manual_seed(13)
    channels, width, seq_lens = 200, 4, (1, 2, 37, 5)
    x = torch.randn(sum(seq_lens), channels, generator=g).to(DEV)
    weight = torch.randn(channels, width, generator=g).to(DEV)
    initial = torch.randn(len(seq_lens), channels, width - 1, generator=g).to(DEV)
    for init in (None, initial):
        ref, ref_states = twin.causal_conv(x, weight, seq_lens, init)
        out, states = kern.causal_conv(x, weight, seq_lens, init)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(states, ref_states)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_delta_gates_match_twin(dtype):
    """The log decay and write strength in one launch against the twin's expressions (transformers'):
    a and b as the column halves of one projection's output (strided rows), softplus past its threshold
    of 20 and far below 0."""
    from moelora.ops.triton import delta as kern

    g = torch.Generator().manual_seed(21)
    ab = (torch.randn(9, 12, generator=g) * 6).to(DEV, dtype)
    ab[0, :3] = torch.tensor([100.0, -30.0, 19.5])  # exp(100) overflows fp32: the threshold must hold
    a, b = ab[:, :6], ab[:, 6:]
    a_log, dt_bias = torch.randn(6, generator=g).to(DEV, dtype), torch.randn(6, generator=g).to(DEV, dtype)
    got = kern.delta_gates(a, b, a_log, dt_bias)
    want = twin.delta_gates(a, b, a_log, dt_bias)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-3 if dtype == torch.float16 else 1e-6, rtol=0)


@pytest.mark.parametrize(
    ("dtype", "weight_dtype"),
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)],
)
def test_triton_gated_rms_norm_matches_twin(dtype, weight_dtype):
    """Linear attention's output norm in one launch against the twin: rows of 48 (not a power of two),
    the gate a strided view, the weight in x's dtype (its product rounded there) or in fp32; and heads:
    x [T, 3, 48], the gate each token's head-split part of a wider row (as the model passes z: no copy)."""
    from moelora.ops.torch import norm as twin_norm
    from moelora.ops.triton import norm as kern

    g = torch.Generator().manual_seed(22)
    x = torch.randn(7, 48, generator=g).to(DEV, dtype)
    z = torch.randn(7, 96, generator=g).to(DEV, dtype)[:, ::2]
    w = (1 + 0.2 * torch.randn(48, generator=g)).to(DEV, weight_dtype)
    tol = dict(atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)
    got = kern.gated_rms_norm(x, z, w, 1e-6)
    want = twin_norm.gated_rms_norm(x, z, w, 1e-6)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, **tol)
    xh = torch.randn(5, 3, 48, generator=g).to(DEV, dtype)
    zh = torch.randn(5, 200, generator=g).to(DEV, dtype)[:, 40:184].view(5, 3, 48)
    got = kern.gated_rms_norm(xh, zh, w, 1e-6)
    assert got.shape == xh.shape
    torch.testing.assert_close(got, twin_norm.gated_rms_norm(xh, zh, w, 1e-6), **tol)
