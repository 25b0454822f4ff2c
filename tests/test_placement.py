"""The single expert placement rule and the parallel state's validation."""

from __future__ import annotations

import pytest
import torch

from moelora.parallel.sharding import place_experts, shard_range
from moelora.parallel.state import ParallelState


def test_eight_experts_over_ep4():
    p = place_experts(8, 4, 2)
    assert (p.first, p.count) == (4, 2)
    assert list(p.global_ids()) == [4, 5]
    assert [p.local_id(g) for g in range(8)] == [-1, -1, -1, -1, 0, 1, -1, -1]


def test_128_experts_over_ep4_rank3():
    p = place_experts(128, 4, 3)
    assert list(p.global_ids()) == list(range(96, 128))
    assert p.local_id(96) == 0 and p.local_id(127) == 31
    assert not p.owns(95) and not p.owns(128)
    assert p.local_id(95) == -1 and p.local_id(128) == -1


def test_uneven_split_is_balanced_and_contiguous():
    parts = [place_experts(7, 4, r) for r in range(4)]
    assert [p.count for p in parts] == [2, 2, 2, 1]
    owned = [g for p in parts for g in p.global_ids()]
    assert owned == list(range(7))


@pytest.mark.parametrize("num_experts,ep", [(6, 4), (8, 3), (60, 8), (5, 5)])
def test_every_expert_owned_exactly_once(num_experts: int, ep: int):
    owners = [sum(place_experts(num_experts, ep, r).owns(g) for r in range(ep)) for g in range(num_experts)]
    assert owners == [1] * num_experts
    counts = [place_experts(num_experts, ep, r).count for r in range(ep)]
    assert max(counts) - min(counts) <= 1


def test_ep1_is_identity():
    p = place_experts(8, 1, 0)
    assert torch.equal(p.expert_map(), torch.arange(8, dtype=torch.int32))


def test_expert_map_matches_local_id():
    p = place_experts(10, 3, 1)
    assert p.expert_map().tolist() == [p.local_id(g) for g in range(10)]
    assert p.expert_map().dtype == torch.int32


def test_more_ep_ranks_than_experts_fails():
    with pytest.raises(ValueError, match="ep_size 9 is larger than the model's 8 experts"):
        place_experts(8, 9, 0)


def test_parallel_state_layout():
    ps = ParallelState(tp_rank=5, tp_size=8, ep_size=4)
    assert (ps.moe_tp_size, ps.ep_rank, ps.moe_tp_rank) == (2, 2, 1)
    with pytest.raises(ValueError, match="ep_size 3 does not divide tp_size 4"):
        ParallelState(tp_rank=0, tp_size=4, ep_size=3)


def test_shard_range():
    assert shard_range(12, 3, 2, "x") == slice(8, 12)
    with pytest.raises(ValueError, match=r"vocab size \(10\) is not divisible by 4"):
        shard_range(10, 4, 0, "vocab size")
