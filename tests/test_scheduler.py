"""The scheduler's token budget with and without chunked prefill, driven directly (no model): which
sequences run in a step and how many tokens each, as the engine then advances them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moelora import SamplingParams
from moelora.cache.kv_cache import BlockAllocator
from moelora.config import EngineArgs
from moelora.engine.request import Request, Sequence
from moelora.engine.scheduler import Scheduler


def sequence(arrival: int, prompt_len: int) -> Sequence:
    prompt = list(range(3, 3 + prompt_len))
    request = Request(str(arrival), None, prompt, SamplingParams(max_tokens=4), None, None, arrival)  # type: ignore[arg-type]
    return Sequence(request, 0, list(prompt), None, 0)  # type: ignore[arg-type]


def run_step(scheduler: Scheduler, new_tokens: int) -> list[tuple[int, int]]:
    """One step as the engine runs it: each scheduled sequence computes its tokens; one whose prompt and
    tokens are all computed gets a token, and finishes once it has `new_tokens` of them. ->
    (arrival, tokens run) in batch order."""
    step = scheduler.schedule()
    assert not step.preempted
    for seq, n in zip(step.seqs, step.num_new, strict=True):
        assert 1 <= n <= seq.num_tokens - seq.num_cached
        seq.num_cached += n
        if seq.num_cached == seq.num_tokens:
            seq.token_ids.append(0)
            if len(seq.token_ids) - seq.num_prompt >= new_tokens:
                scheduler.finish(seq)
    return [(s.request.arrival, n) for s, n in zip(step.seqs, step.num_new, strict=True)]


def test_budget_goes_to_decoding_then_begun_prompts_then_new_ones():
    scheduler = Scheduler(BlockAllocator(64), 4, 8, 10, chunked_prefill=True)
    for arrival, size in enumerate((25, 4, 6)):
        scheduler.add(sequence(arrival, size))
    steps = [run_step(scheduler, new_tokens=3) for _ in range(5)]
    assert steps == [
        [(0, 10)],  # the long prompt takes the whole budget; nothing else is admitted
        [(0, 10)],
        [(0, 5), (1, 4), (2, 1)],  # its last part, then the next prompts while budget is left
        [(0, 1), (1, 1), (2, 5)],  # decoding first, then the rest of the begun prompt
        [(0, 1), (1, 1), (2, 1)],
    ]


def test_without_chunks_a_long_prompt_runs_whole_and_alone():
    scheduler = Scheduler(BlockAllocator(64), 4, 8, 10, chunked_prefill=False)
    for arrival, size in enumerate((25, 4)):
        scheduler.add(sequence(arrival, size))
    assert run_step(scheduler, new_tokens=3) == [(0, 25)]
    assert run_step(scheduler, new_tokens=3) == [(0, 1), (1, 4)]


def test_linear_attention_prompts_keep_their_state_slot_across_parts():
    """With state slots a prompt is computed in parts too, each part in the slot its first part took."""
    scheduler = Scheduler(BlockAllocator(64), 4, 8, 10, state_slots=True, chunked_prefill=True)
    first, second = sequence(0, 25), sequence(1, 3)
    scheduler.add(first)
    scheduler.add(second)
    assert run_step(scheduler, new_tokens=2) == [(0, 10)]
    slot = first.state_slot
    assert slot >= 0
    assert run_step(scheduler, new_tokens=2) == [(0, 10)]
    assert run_step(scheduler, new_tokens=2) == [(0, 5), (1, 3)]
    assert first.state_slot == slot and second.state_slot not in (slot, -1)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    budget=st.integers(1, 24),
    max_seqs=st.integers(1, 6),
    new_tokens=st.integers(1, 5),
    part_cap=st.integers(0, 12),
)
def test_chunked_steps_stay_in_budget_and_every_request_finishes(
    sizes, budget, max_seqs, new_tokens, part_cap
):
    """Any prompts, budget, sequence cap (at most the budget) and cap on a prompt's part (0: none): no
    step runs more than the budget, no prompt more than the part cap, and every request gets all its
    tokens."""
    max_seqs = min(max_seqs, budget)  # as EngineArgs requires: every running sequence decodes a step
    scheduler = Scheduler(
        BlockAllocator(512), 4, max_seqs, budget, chunked_prefill=True, long_prefill_token_threshold=part_cap
    )
    seqs = [sequence(i, n) for i, n in enumerate(sizes)]
    for seq in seqs:
        scheduler.add(seq)
    limit = sum(sizes) + len(sizes) * new_tokens + 1  # at least one token a step
    for _ in range(limit):
        if not scheduler.has_work():
            break
        step = run_step(scheduler, new_tokens)
        assert 0 < sum(n for _, n in step) <= budget
        assert not part_cap or all(n <= part_cap for _, n in step)
    assert not scheduler.has_work()
    assert all(len(s.token_ids) - s.num_prompt == new_tokens for s in seqs)


def advance(scheduler: Scheduler) -> list[tuple[int, int]]:
    """One step, each scheduled sequence computing its tokens and its blocks offered to the prefix cache
    (no token sampled). -> (arrival, tokens run)."""
    step = scheduler.schedule()
    for seq, n in zip(step.seqs, step.num_new, strict=True):
        seq.num_cached += n
        scheduler.cache_blocks(seq)
    return [(s.request.arrival, n) for s, n in zip(step.seqs, step.num_new, strict=True)]


def test_linear_attention_prefixes_keep_their_states_in_snapshot_slots():
    """With state slots and prefix caching: a prompt's part ends at its last full block (12 of 14 tokens,
    blocks of 4), whose states go to a snapshot slot (numbered after the 4 running slots) kept once that
    block is cached; the same prompt again starts after those 12 tokens from a copy of them; with one
    snapshot slot the next prompt's snapshot takes it over, and the first prompt's prefix is no use."""
    allocator = BlockAllocator(64)
    scheduler = Scheduler(
        allocator, 4, 4, 8, prefix_caching=True, state_slots=True, chunked_prefill=True, state_snapshots=1
    )
    first = sequence(0, 14)
    scheduler.add(first)
    assert advance(scheduler) == [(0, 8)]
    step = scheduler.schedule()
    assert step.num_new == [4] and step.snapshots == [first] and first.snapshots == [(2, 4, None)]
    first.num_cached += 4
    scheduler.cache_blocks(first)
    assert first.snapshots == [] and list(scheduler.snapshots.values()) == [4]
    assert advance(scheduler) == [(0, 2)]
    scheduler.finish(first)
    again = sequence(1, 14)
    scheduler.add(again)
    step = scheduler.schedule()
    assert step.num_new == [2] and again.num_cached == 12 and step.restores == [(4, again.state_slot)]
    scheduler.finish(again)
    other = sequence(2, 10)
    other.token_ids[0] = 99  # another prefix
    scheduler.add(other)
    assert advance(scheduler) == [(2, 8)]  # ends at its last full block: the one snapshot slot taken
    assert other.snapshots == [] and list(scheduler.snapshots.values()) == [4]
    scheduler.finish(other)
    third = sequence(3, 14)
    scheduler.add(third)
    assert scheduler.schedule().num_new == [8] and third.num_cached == 0  # no states: computed whole
    scheduler.finish(third)
    assert allocator.num_free == 64 and not scheduler._free_snapshots


def shared_prefix() -> tuple[Scheduler, list[Sequence]]:
    """Three prompts of 14 tokens with the same first 8 (blocks of 4), four snapshot slots; the first
    computed (in a part to its last full block, 12, whose states are kept, then the rest) and finished."""
    scheduler = Scheduler(
        BlockAllocator(64), 4, 4, 16, prefix_caching=True, state_slots=True, chunked_prefill=True,
        state_snapshots=4,
    )  # fmt: skip
    prompts = [sequence(i, 14) for i in range(3)]
    for i, seq in enumerate(prompts):
        seq.token_ids[8:] = [100 + i] * 6  # the same first 8 tokens, then another question
    scheduler.add(prompts[0])
    assert advance(scheduler) == [(0, 12)] and prompts[0].snapshots == []  # kept at 12
    assert advance(scheduler) == [(0, 2)]
    scheduler.finish(prompts[0])
    return scheduler, prompts


def test_a_shared_prefix_keeps_its_states_where_prompts_part():
    """The second prompt finds the first's two blocks cached without states there, computes them again
    with a part ending at 8 and keeps its states there (under the cached blocks' key); the third starts
    after them."""
    scheduler, prompts = shared_prefix()
    scheduler.add(prompts[1])
    assert advance(scheduler) == [(1, 8)] and prompts[1].num_cached == 8  # computed again, kept at 8
    assert prompts[1].divergence is not None and prompts[1].divergence[0] == 8
    assert advance(scheduler) == [(1, 4)]  # to its own last full block
    advance(scheduler)
    scheduler.finish(prompts[1])
    assert len(scheduler.snapshots) == 3
    scheduler.add(prompts[2])
    step = scheduler.schedule()
    assert prompts[2].num_cached == 8 and step.num_new == [4] and len(step.restores) == 1


def test_prompts_reaching_a_shared_prefix_together_keep_its_states_once():
    scheduler, prompts = shared_prefix()
    scheduler.add(prompts[1])
    scheduler.add(prompts[2])
    step = scheduler.schedule()
    assert step.num_new == [8, 8] and step.snapshots == [prompts[1]]  # both stop at 8; one snapshot
    assert [len(s.snapshots) for s in prompts[1:]] == [1, 0]
    scheduler.finish(prompts[1])
    scheduler.finish(prompts[2])
    assert not scheduler._pending and len(scheduler._free_snapshots) + len(scheduler.snapshots) == 4


def test_snapshots_need_chunked_prefill():
    """Without chunks no part ends at a block boundary: no states to keep, so no prefix caching for a
    model with linear attention."""
    scheduler = Scheduler(
        BlockAllocator(8), 4, 4, 8, prefix_caching=True, state_slots=True, state_snapshots=4
    )
    assert not scheduler.prefix_caching


def test_a_long_prompt_takes_at_most_the_part_cap_a_step():
    """`long_prefill_token_threshold` (vLLM's name): each prompt at most 4 tokens a step, so the second
    prompt starts beside the first instead of after it."""
    scheduler = Scheduler(BlockAllocator(64), 4, 8, 10, chunked_prefill=True, long_prefill_token_threshold=4)
    for arrival, size in enumerate((25, 6)):
        scheduler.add(sequence(arrival, size))
    steps = [run_step(scheduler, new_tokens=3) for _ in range(3)]
    assert steps == [[(0, 4), (1, 4)], [(0, 4), (1, 2)], [(0, 4), (1, 1)]]


def test_the_part_cap_needs_chunked_prefill():
    with pytest.raises(ValueError, match="long_prefill_token_threshold caps a prompt's part"):
        EngineArgs(long_prefill_token_threshold=64, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be >= 0"):
        EngineArgs(long_prefill_token_threshold=-1)


def test_a_budget_below_the_sequence_cap_is_refused():
    with pytest.raises(
        ValueError, match=r"max_num_batched_tokens \(8\) must be at least max_num_seqs \(16\)"
    ):
        EngineArgs(max_num_batched_tokens=8, max_num_seqs=16)
