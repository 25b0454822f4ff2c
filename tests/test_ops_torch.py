"""The PyTorch ops against direct per-token formulas written from their Semantics docstrings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelora.ops.expert_lora import ExpertLora
from moelora.ops.torch.attention import prefill_attention
from moelora.ops.torch.moe import fused_moe


def per_token_moe(x, w_gate_up, w_down, ids, weights):
    """y[t] = sum over valid choices of weight * down(silu(gate) * up), one token at a time in fp64."""
    e_loc, inter = w_down.shape[0], w_down.shape[2]
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < e_loc:
                continue
            gu = w_gate_up[e].double() @ x[t].double()
            h = F.silu(gu[:inter]) * gu[inter:]
            y[t] += float(weights[t, j]) * (w_down[e].double() @ h)
    return y


@pytest.mark.parametrize("num_tokens", [1, 5, 33])
def test_fused_moe_skips_ids_outside_local_range(num_tokens: int):
    g = torch.Generator().manual_seed(num_tokens)
    e_loc, hidden, inter, k = 4, 16, 8, 3
    x = torch.randn(num_tokens, hidden, generator=g)
    w_gate_up = torch.randn(e_loc, 2 * inter, hidden, generator=g)
    w_down = torch.randn(e_loc, hidden, inter, generator=g)
    choices = torch.tensor([-1, -7, 0, 1, 2, 3, e_loc, e_loc + 3])
    ids = choices[torch.randint(0, len(choices), (num_tokens, k), generator=g)].to(torch.int32)
    weights = torch.rand(num_tokens, k, generator=g)
    out = fused_moe(x, w_gate_up, w_down, ids, weights)
    assert torch.allclose(out.double(), per_token_moe(x, w_gate_up, w_down, ids, weights), atol=1e-4)


def test_fused_moe_all_ids_elsewhere_gives_zeros():
    x = torch.randn(3, 8)
    out = fused_moe(x, torch.randn(2, 8, 8), torch.randn(2, 8, 4), torch.full((3, 2), -1), torch.rand(3, 2))
    assert torch.equal(out, torch.zeros(3, 8))


@pytest.mark.parametrize("window", [None, 3])
def test_prefill_attention_per_query(window):
    g = torch.Generator().manual_seed(0)
    lens, hq, hkv, d = (5, 1, 7), 4, 2, 8
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
    out = prefill_attention(q, k, v, lens, 0.3, window)
    start = 0
    for n in lens:
        for i in range(n):
            for h in range(hq):
                kv = h // (hq // hkv)
                js = [j for j in range(i + 1) if window is None or i - j < window]
                scores = torch.stack([0.3 * q[start + i, h] @ k[start + j, kv] for j in js])
                p = scores.softmax(0)
                expect = sum(p[m] * v[start + j, kv] for m, j in enumerate(js))
                assert torch.allclose(out[start + i, h], expect, atol=1e-5)
        start += n


def rand(g, *shape):
    return torch.randn(*shape, generator=g)


def test_add_lora_per_token_with_invalid_slots():
    from moelora.ops.torch.lora import add_lora

    g = torch.Generator().manual_seed(11)
    t, d_in, d_out, s, r = 9, 12, 10, 3, 4
    x, y0 = rand(g, t, d_in), rand(g, t, d_out)
    a, b = rand(g, s, r, d_in), rand(g, s, d_out, r)
    a[1, 2:] = 0  # slot 1 holds a rank-2 adapter, zero-padded
    b[1, :, 2:] = 0
    slot = torch.tensor([0, -1, 1, 2, s, -5, s + 2, 1, 0], dtype=torch.int32)
    y = y0.clone()
    add_lora(y, x, a, b, slot)
    for i in range(t):
        si = int(slot[i])
        expect = y0[i].double()
        if 0 <= si < s:
            expect = expect + b[si].double() @ (a[si].double() @ x[i].double())
        assert torch.allclose(y[i].double(), expect, atol=1e-4)


def test_add_lora_into_a_column_slice():
    from moelora.ops.torch.lora import add_lora

    g = torch.Generator().manual_seed(12)
    x, wide = rand(g, 4, 6), rand(g, 4, 10)
    a, b = rand(g, 2, 3, 6), rand(g, 2, 4, 3)
    slot = torch.tensor([1, 0, -1, 1], dtype=torch.int32)
    out = wide.clone()
    add_lora(out[:, 3:7], x, a, b, slot)
    assert torch.equal(out[:, :3], wide[:, :3]) and torch.equal(out[:, 7:], wide[:, 7:])
    assert torch.allclose(out[0, 3:7], wide[0, 3:7] + b[1] @ (a[1] @ x[0]), atol=1e-5)


def per_token_moe_lora(x, w_gu, w_dn, ids, weights, slot, a_gu, b_gu, a_dn, b_dn):
    e_loc, inter, s_max = w_dn.shape[0], w_dn.shape[2], a_gu.shape[0]
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        s = int(slot[t])
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < e_loc:
                continue
            xt = x[t].double()
            g = w_gu[e, :inter].double() @ xt
            u = w_gu[e, inter:].double() @ xt
            if 0 <= s < s_max:
                g = g + b_gu[s, e, 0].double() @ (a_gu[s, e, 0].double() @ xt)
                u = u + b_gu[s, e, 1].double() @ (a_gu[s, e, 1].double() @ xt)
            h = F.silu(g) * u
            d = w_dn[e].double() @ h
            if 0 <= s < s_max:
                d = d + b_dn[s, e].double() @ (a_dn[s, e].double() @ h)
            y[t] += float(weights[t, j]) * d
    return y


@pytest.mark.parametrize("num_tokens", [1, 7, 40])
def test_fused_moe_lora_per_token(num_tokens: int):
    from moelora.ops.torch.lora import fused_moe_lora

    g = torch.Generator().manual_seed(100 + num_tokens)
    e_loc, h, inter, k, s, r = 4, 16, 8, 2, 3, 4
    x = rand(g, num_tokens, h)
    w_gu, w_dn = rand(g, e_loc, 2 * inter, h), rand(g, e_loc, h, inter)
    a_gu, b_gu = rand(g, s, e_loc, 2, r, h), rand(g, s, e_loc, 2, inter, r)
    a_dn, b_dn = rand(g, s, e_loc, r, inter), rand(g, s, e_loc, h, r)
    a_gu[2, :, :, 3:] = 0  # slot 2: rank 3 in the rank-4 buffers
    b_gu[2, :, :, :, 3:] = 0
    choices = torch.tensor([-1, -7, 0, 1, 2, 3, e_loc, e_loc + 3])
    ids = choices[torch.randint(0, len(choices), (num_tokens, k), generator=g)].to(torch.int32)
    slots = torch.tensor([-1, 0, 1, 2, s, s + 4, -3])
    slot = slots[torch.randint(0, len(slots), (num_tokens,), generator=g)].to(torch.int32)
    weights = torch.rand(num_tokens, k, generator=g)
    out = fused_moe_lora(x, w_gu, w_dn, ids, weights, slot, ExpertLora(a_gu, b_gu, a_dn, b_dn))
    ref = per_token_moe_lora(x, w_gu, w_dn, ids, weights, slot, a_gu, b_gu, a_dn, b_dn)
    assert torch.allclose(out.double(), ref, atol=1e-3, rtol=1e-4)


def test_fused_moe_lora_without_valid_slots_equals_base():
    from moelora.ops.torch.lora import fused_moe_lora

    g = torch.Generator().manual_seed(5)
    x, w_gu, w_dn = rand(g, 6, 8), rand(g, 3, 8, 8), rand(g, 3, 8, 4)
    ids = torch.randint(-1, 4, (6, 2), generator=g).to(torch.int32)
    weights = torch.rand(6, 2, generator=g)
    gate_up = rand(g, 2, 3, 2, 2, 8), rand(g, 2, 3, 2, 4, 2)
    bufs = ExpertLora(*gate_up, rand(g, 2, 3, 2, 4), rand(g, 2, 3, 8, 2))
    slot = torch.tensor([-1, 2, -1, 5, -1, -2], dtype=torch.int32)
    assert torch.allclose(
        fused_moe_lora(x, w_gu, w_dn, ids, weights, slot, bufs), fused_moe(x, w_gu, w_dn, ids, weights)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rows_without_an_adapter_are_the_base_ops_bit_for_bit(dtype: torch.dtype):
    """In a mixed batch, every token without a valid slot gets exactly what the base op gives it: base
    requests served next to adapter requests are bit-identical to a server without adapters (a peer
    corrupted them, vLLM #49063). In 16 bits the two twins used to round h at different points (0.09 of
    a log-prob apart on the demo model)."""
    from moelora.ops.torch.lora import fused_moe_lora

    g = torch.Generator().manual_seed(7)
    num_tokens, e_loc, h, inter, k, s, r = 40, 4, 32, 16, 2, 3, 8
    x = rand(g, num_tokens, h).to(dtype)
    w_gu, w_dn = (rand(g, e_loc, 2 * inter, h) / 4).to(dtype), (rand(g, e_loc, h, inter) / 4).to(dtype)
    lora = ExpertLora(
        rand(g, s, e_loc, 2, r, h).to(dtype),
        rand(g, s, e_loc, 2, inter, r).to(dtype),
        rand(g, s, e_loc, r, inter).to(dtype),
        rand(g, s, e_loc, h, r).to(dtype),
    )
    ids = torch.randint(-1, e_loc + 1, (num_tokens, k), generator=g).to(torch.int32)
    weights = torch.rand(num_tokens, k, generator=g)
    slot = torch.tensor([-1, 0, 1, 2, 7, -3], dtype=torch.int32)[
        torch.randint(0, 6, (num_tokens,), generator=g)
    ]
    base_rows = (slot < 0) | (slot >= s)
    mixed = fused_moe_lora(x, w_gu, w_dn, ids, weights, slot, lora)
    base = fused_moe(x, w_gu, w_dn, ids, weights)
    assert torch.equal(mixed[base_rows], base[base_rows])
    assert not torch.equal(mixed[~base_rows], base[~base_rows])  # the adapters did something


@pytest.mark.parametrize(("groups", "topk_groups", "top_k"), [(1, 1, 4), (4, 2, 3), (8, 3, 2)])
def test_grouped_router_per_token(groups: int, topk_groups: int, top_k: int):
    """DeepSeek-V3's / GLM-4.5's choice, one token at a time from its description: sigmoid scores, the
    bias for the choice only, groups scored by their two best biased scores, the top_k of the allowed."""
    from moelora.ops.torch.router import grouped_router

    g = torch.Generator().manual_seed(groups)
    tokens, hidden, experts = 9, 16, 32
    x = torch.randn(tokens, hidden, generator=g)
    weight = torch.randn(experts, hidden, generator=g) * 0.5
    bias = torch.randn(experts, generator=g) * 0.3
    weights, ids = grouped_router(x, weight, bias, top_k, groups, topk_groups, True, 2.5)
    per_group = experts // groups
    for t in range(tokens):
        s = torch.sigmoid(weight.double() @ x[t].double())
        c = s + bias.double()
        group_score = [sorted(c[i * per_group : (i + 1) * per_group].tolist())[-2:] for i in range(groups)]
        best = sorted(range(groups), key=lambda i: -sum(group_score[i]))[:topk_groups]
        allowed = [e for e in range(experts) if e // per_group in best]
        chosen = sorted(allowed, key=lambda e: -float(c[e]))[:top_k]
        assert ids[t].tolist() == chosen
        want = s[chosen] / s[chosen].sum() * 2.5
        assert torch.allclose(weights[t].double(), want, atol=1e-6)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32


@pytest.mark.parametrize(("groups", "topk_groups", "top_k"), [(1, 1, 4), (4, 2, 3), (8, 3, 2)])
def test_softmax_grouped_router_per_token(groups: int, topk_groups: int, top_k: int):
    """DeepSeek-V2's choice, one token at a time: softmax scores, groups scored by their best score, the
    top_k of the allowed experts, weights their scores times the scaling (not renormalised)."""
    from moelora.ops.torch.router import softmax_grouped_router

    g = torch.Generator().manual_seed(10 + groups)
    tokens, hidden, experts = 9, 16, 32
    x = torch.randn(tokens, hidden, generator=g)
    weight = torch.randn(experts, hidden, generator=g) * 0.5
    weights, ids = softmax_grouped_router(x, weight, top_k, groups, topk_groups, 1.5)
    per_group = experts // groups
    for t in range(tokens):
        p = torch.softmax(weight.double() @ x[t].double(), dim=-1)
        best = sorted(range(groups), key=lambda i: -float(p[i * per_group : (i + 1) * per_group].max()))
        allowed = [e for e in range(experts) if e // per_group in best[:topk_groups]]
        chosen = sorted(allowed, key=lambda e: -float(p[e]))[:top_k]
        assert ids[t].tolist() == chosen
        assert torch.allclose(weights[t].double(), p[chosen] * 1.5, atol=1e-6)
