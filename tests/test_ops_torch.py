"""The PyTorch ops against direct per-token formulas written from their Semantics docstrings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
