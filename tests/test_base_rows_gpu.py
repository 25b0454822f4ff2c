"""On the GPU, a token without an adapter gets from every LoRA-capable op exactly what the op without
adapters gives it (bf16, the Triton kernels at every path the token count selects): base requests served
next to adapter requests are bit-identical to a server without adapters (a peer corrupted them, vLLM
#49063). The CPU twins' version is in tests/test_ops_torch.py."""

from __future__ import annotations

import pytest
import torch

from moelora import ops
from moelora.ops.dense_lora import DenseLora
from moelora.ops.expert_lora import ExpertLora

pytestmark = pytest.mark.gpu

DT = torch.bfloat16


def rand(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to("cuda", DT)


def slots(g: torch.Generator, num_tokens: int, num_slots: int) -> torch.Tensor:
    choices = torch.tensor([-1, -1, 0, 1, 2, num_slots + 3])
    slot = choices[torch.randint(0, len(choices), (num_tokens,), generator=g)].to(torch.int32)
    slot[0], slot[-1] = 1, -1  # one token without an adapter, and (given two) one on an adapter
    return slot.cuda()


@pytest.mark.parametrize("num_tokens", [1, 3, 8, 16, 64, 300, 2048])
def test_moe_base_rows_bit_for_bit(num_tokens: int):
    """Qwen3-30B-A3B's expert shapes (fewer experts): decode path, aligned path, large M."""
    g = torch.Generator().manual_seed(num_tokens)
    e, h, inter, k, s, r = 16, 2048, 768, 8, 3, 16
    x = rand(g, num_tokens, h)
    w_gu, w_dn = rand(g, e, 2 * inter, h, scale=h**-0.5), rand(g, e, h, inter, scale=inter**-0.5)
    lora = ExpertLora(
        rand(g, s, e, 2, r, h, scale=h**-0.5),
        rand(g, s, e, 2, inter, r, scale=r**-0.5),
        rand(g, s, e, r, inter, scale=inter**-0.5),
        rand(g, s, e, h, r, scale=r**-0.5),
    )
    logits = torch.randn(num_tokens, e, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    ids = ids.to(torch.int32)
    ids[torch.rand(num_tokens, k, generator=g) < 0.1] = -1  # experts another EP rank owns
    ids, weights = ids.cuda(), (weights / weights.sum(-1, keepdim=True)).to("cuda", DT)
    slot = slots(g, num_tokens, s)
    base_rows = (slot < 0) | (slot >= s)
    mixed = ops.fused_moe_lora(x, w_gu, w_dn, ids, weights, slot, lora)
    base = ops.fused_moe(x, w_gu, w_dn, ids, weights)
    assert torch.equal(mixed[base_rows], base[base_rows])
    if num_tokens > 1:
        assert not torch.equal(mixed[~base_rows], base[~base_rows])  # the adapters did something


@pytest.mark.parametrize("num_tokens", [1, 5, 16, 17, 64, 65, 512])
def test_linear_base_rows_bit_for_bit(num_tokens: int):
    """Qwen3-30B-A3B's q/k/v (stacked, three parts): the one-launch kernel up to `linear_tokens` (64),
    cuBLAS and the dense LoRA kernels above."""
    g = torch.Generator().manual_seed(100 + num_tokens)
    h, sizes, s, r = 2048, (4096, 512, 512), 3, 16
    x, w = rand(g, num_tokens, h), rand(g, sum(sizes), h, scale=h**-0.5)
    a = rand(g, s, len(sizes), r, h, scale=h**-0.5)
    b = rand(g, s, sum(sizes), r, scale=r**-0.5)
    lora = DenseLora(a, b, torch.full((s, len(sizes)), r, dtype=torch.int32, device="cuda"))
    slot = slots(g, num_tokens, s)
    base_rows = (slot < 0) | (slot >= s)
    mixed = ops.linear(x, w, None, lora, slot, sizes)
    base = ops.linear(x, w, None, None, None, sizes)
    assert torch.equal(mixed[base_rows], base[base_rows])
    if num_tokens > 1:
        assert not torch.equal(mixed[~base_rows], base[~base_rows])
