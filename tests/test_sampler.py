"""The sampler against hand-computed cases and the distributions its docstring promises."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moelora.engine.sampler import SamplingInput, sample
from moelora.sampling_params import SamplingParams


def make_input(prompt=(5,), output=(), row_seed=0, eos=(), **params) -> SamplingInput:
    """One row (its draws from `row_seed`); keyword arguments other than the SamplingInput fields go to
    SamplingParams."""
    return SamplingInput(SamplingParams(**params), list(prompt), list(output), row_seed, tuple(eos))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(rows, vocab, generator=seeded(seed))


def tokens(logits: torch.Tensor, inputs: list[SamplingInput]) -> list[int]:
    return [s.token for s in sample(logits, inputs)]


def test_raw_logprobs_ignore_temperature_penalties_and_truncation():
    logits = random_logits(4, 50)
    raw = torch.log_softmax(logits, dim=-1)
    inputs = [
        make_input(temperature=0.3, top_k=5, top_p=0.8, logprobs=5, row_seed=1),
        make_input(output=[1, 2, 2], repetition_penalty=1.7, frequency_penalty=1.0, logprobs=3),
        make_input(temperature=0, presence_penalty=-2.0, output=[7], logprobs=0),
        make_input(output=[], eos=[int(logits[3].argmax())], min_tokens=3, temperature=5.0, min_p=0.2),
    ]
    for row, s in enumerate(sample(logits, inputs)):
        assert s.logprob == pytest.approx(float(raw[row, s.token]), abs=1e-6)
        for token, value in (s.top_logprobs or {}).items():
            assert value == pytest.approx(float(raw[row, token]), abs=1e-6)


def test_greedy_is_argmax():
    logits = random_logits(6, 100, seed=3)
    inputs = [make_input(temperature=0) for _ in range(6)]
    assert tokens(logits, inputs) == logits.argmax(dim=-1).tolist()


def test_tiny_temperature_does_not_overflow():
    logits = random_logits(3, 40, seed=4, scale=30.0)
    inputs = [make_input(temperature=1e-30, row_seed=i) for i in range(3)]
    assert tokens(logits, inputs) == logits.argmax(dim=-1).tolist()


def test_seeded_draws_are_reproducible():
    logits = random_logits(1, 30, seed=5, scale=0.5)
    first = [tokens(logits, [make_input(row_seed=s)])[0] for s in range(20)]
    again = [tokens(logits, [make_input(row_seed=s)])[0] for s in range(20)]
    assert first == again
    assert len(set(first)) > 5  # the seeds really do give different draws


@pytest.mark.parametrize("options", [{}, {"top_k": 10}, {"top_p": 0.9}, {"min_p": 0.05, "temperature": 0.7}])
def test_seeded_draw_is_independent_of_the_batch(options):
    vocab = 64
    target = random_logits(1, vocab, seed=6, scale=0.5)
    alone = [tokens(target, [make_input(row_seed=s, **options)])[0] for s in range(10)]
    others = random_logits(4, vocab, seed=7)
    for s in range(10):
        batch = [
            make_input(temperature=0),
            make_input(row_seed=100 + s, top_p=0.5),
            make_input(row_seed=77, top_k=3),
            make_input(row_seed=s, **options),
            make_input(row_seed=s, repetition_penalty=1.5, output=[1, 2]),
        ]
        logits = torch.cat([others[:3], target, others[3:]])
        order = torch.randperm(5, generator=seeded(s)).tolist()
        got = tokens(logits[order], [batch[i] for i in order])
        assert got[order.index(3)] == alone[s]


@pytest.mark.parametrize("options", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_full_truncation_is_greedy(options):
    logits = random_logits(8, 200, seed=8, scale=0.3)
    inputs = [make_input(row_seed=i, temperature=1.5, **options) for i in range(8)]
    assert tokens(logits, inputs) == logits.argmax(dim=-1).tolist()


# probabilities 0.5, 0.3, 0.15, 0.05 (times a constant, which softmax drops)
SKEWED = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()


@pytest.mark.parametrize(
    ("options", "allowed"),
    [
        ({"top_k": 2}, {0, 1}),
        ({"top_k": 3}, {0, 1, 2}),
        ({"top_p": 0.45}, {0}),
        ({"top_p": 0.6}, {0, 1}),
        ({"top_p": 0.85}, {0, 1, 2}),
        ({"min_p": 0.35}, {0, 1}),  # keeps p >= 0.175
        ({"min_p": 0.2}, {0, 1, 2}),  # keeps p >= 0.1
        ({"top_k": 2, "top_p": 0.6}, {0}),  # top-p of the top-k mass: 0.5 >= 0.6 * 0.8
        ({"top_k": 3, "min_p": 0.35}, {0, 1}),
    ],
)
def test_truncation_keeps_exactly_the_allowed_tokens(options, allowed):
    logits = SKEWED.expand(300, 4)
    drawn = set(tokens(logits, [make_input(row_seed=i, **options) for i in range(300)]))
    assert drawn == allowed


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    positive = torch.tensor([[2.0, 1.8, -1.0, -1.2]])  # 2.0 / 1.5 = 1.33 < 1.8
    negative = torch.tensor([[-1.0, -1.2, -3.0, -4.0]])  # -1.0 * 1.5 = -1.5 < -1.2
    for logits in (positive, negative):
        assert tokens(logits, [make_input(temperature=0, prompt=[0, 3])]) == [0]
        assert tokens(logits, [make_input(temperature=0, prompt=[0], repetition_penalty=1.5)]) == [1]
        assert tokens(
            logits, [make_input(temperature=0, prompt=[3], output=[0], repetition_penalty=1.5)]
        ) == [1]
        assert tokens(logits, [make_input(temperature=0, prompt=[1], repetition_penalty=1.5)]) == [0]


def test_frequency_penalty_scales_with_the_count():
    logits = torch.tensor([[3.0, 2.0, 0.5, -0.5]])
    greedy = {"temperature": 0, "frequency_penalty": 0.6}
    assert tokens(logits, [make_input(output=[0], **greedy)]) == [0]  # 3 - 0.6 = 2.4 > 2
    assert tokens(logits, [make_input(output=[0, 0], **greedy)]) == [1]  # 3 - 1.2 = 1.8 < 2
    assert tokens(logits, [make_input(prompt=[0, 0, 0], output=[2], **greedy)]) == [0]  # prompt not counted
    assert tokens(logits, [make_input(output=[3, 3], temperature=0, frequency_penalty=-2.0)]) == [3]


def test_presence_penalty_ignores_the_count():
    logits = torch.tensor([[3.0, 2.5, 0.5, -0.5]])
    assert tokens(logits, [make_input(output=[0] * 5, temperature=0, presence_penalty=0.4)]) == [0]
    assert tokens(logits, [make_input(output=[0], temperature=0, presence_penalty=0.6)]) == [1]
    assert tokens(logits, [make_input(prompt=[0], temperature=0, presence_penalty=2.0)]) == [0]


def test_penalties_apply_per_row_in_a_batch():
    logits = torch.tensor([[3.0, 2.5, 0.5, -0.5]]).expand(3, 4)
    inputs = [
        make_input(output=[0], temperature=0, presence_penalty=0.6),
        make_input(output=[0], temperature=0),
        make_input(prompt=[0], temperature=0, repetition_penalty=2.0),
    ]
    assert tokens(logits, inputs) == [1, 0, 1]


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])  # 0 is EOS, 1 a stop token id
    rule = {"temperature": 0, "eos": [0], "stop_token_ids": [1], "min_tokens": 2}
    assert tokens(logits, [make_input(output=[], **rule)]) == [2]
    assert tokens(logits, [make_input(output=[3], **rule)]) == [2]
    assert tokens(logits, [make_input(output=[3, 3], **rule)]) == [0]
    drawn = tokens(
        logits.expand(50, 4),
        [make_input(row_seed=i, **{**rule, "temperature": 1}) for i in range(50)],
    )
    assert set(drawn) == {2, 3}


def test_min_tokens_leaves_a_row_alone_when_everything_would_be_masked():
    logits = torch.tensor([[1.0, 2.0]])
    row = make_input(temperature=0, eos=[0], stop_token_ids=[1, 99], min_tokens=5)
    assert tokens(logits, [row]) == [1]


def test_temperature_one_matches_softmax():
    logits = random_logits(1, 4, seed=9, scale=1.0).expand(4000, 4)
    drawn = torch.tensor(tokens(logits, [make_input(row_seed=10_000 + i) for i in range(4000)]))
    freq = torch.bincount(drawn, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0], dim=-1), atol=0.03)


def test_temperature_and_top_k_reshape_the_distribution():
    logits = random_logits(1, 4, seed=11, scale=1.0).expand(4000, 4)
    drawn = torch.tensor(
        tokens(logits, [make_input(row_seed=i, temperature=0.5, top_k=3) for i in range(4000)])
    )
    want = torch.softmax(logits[0] / 0.5, dim=-1)
    want[want.argmin()] = 0
    freq = torch.bincount(drawn, minlength=4).float() / 4000
    assert torch.allclose(freq, want / want.sum(), atol=0.03)


def test_logprobs_are_the_top_n_plus_the_chosen_token():
    logits = random_logits(4, 30, seed=12)
    raw = torch.log_softmax(logits, dim=-1)
    low = int(logits[1].argmin())
    inputs = [
        make_input(temperature=0, logprobs=3),
        make_input(temperature=0, logprobs=3, eos=list(set(range(30)) - {low}), min_tokens=1),
        make_input(temperature=0, logprobs=0),
        make_input(temperature=0),
    ]
    out = sample(logits, inputs)
    top3 = raw[0].topk(3).indices.tolist()
    assert list(out[0].top_logprobs or {}) == top3 and out[0].token == top3[0]
    assert out[1].token == low and list(out[1].top_logprobs or {}) == [*raw[1].topk(3).indices.tolist(), low]
    assert out[2].top_logprobs == {out[2].token: out[2].logprob}
    assert out[3].top_logprobs is None


def test_logprobs_wider_than_the_vocabulary():
    out = sample(random_logits(1, 4, seed=13), [make_input(temperature=0, logprobs=20)])
    assert len(out[0].top_logprobs or {}) == 4


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"logits must have shape \[2, V\]"):
        sample(random_logits(3, 8), [make_input(), make_input()])
    assert sample(torch.empty(0, 8), []) == []


@pytest.mark.gpu
def test_cuda_draws_equal_cpu_draws():
    """The draws are a function of (seed, position, token) alone: the same on either device."""
    logits = random_logits(6, 500, seed=14, scale=0.5)
    options: list[dict[str, Any]] = [
        {},
        {"top_k": 20},
        {"top_p": 0.8, "repetition_penalty": 1.3, "output": [1, 2]},
    ]
    inputs = [make_input(row_seed=i, **options[i % 3]) for i in range(6)]
    assert tokens(logits.cuda(), inputs) == tokens(logits, inputs)


def test_rows_without_top_k_or_top_p_are_not_sorted(monkeypatch):
    def no_sort(*args):
        raise AssertionError("sorted a row that needs no sort")

    monkeypatch.setattr("moelora.engine.sampler._top_k_top_p", no_sort)
    inputs = [make_input(row_seed=0, min_p=0.1, temperature=0.5), make_input(temperature=0)]
    sample(random_logits(2, 16, seed=15), inputs)


def test_the_callers_logits_are_never_written():
    """The sampler reads fp32 logits in place (no copy unless a penalty changes a row): every option that
    edits logits must leave the caller's tensor as it was."""
    logits = random_logits(4, 30, seed=21)
    before = logits.clone()
    inputs = [
        make_input(output=[1, 2], repetition_penalty=1.5),
        make_input(output=[3, 3], frequency_penalty=0.5, presence_penalty=0.5),
        make_input(eos=[4], min_tokens=2),
        make_input(temperature=0.7, top_k=3, top_p=0.9, min_p=0.1, row_seed=2),
    ]
    sample(logits, inputs)
    assert torch.equal(logits, before)


def test_one_seed_s_draws_along_its_positions_follow_the_distribution():
    """A sequence's draws at successive positions (one seed) are as independent as draws across seeds."""
    logits = random_logits(1, 5, seed=22, scale=1.0).expand(4000, 5)
    rows = [make_input(row_seed=123, output=[0] * i) for i in range(4000)]
    freq = torch.bincount(torch.tensor(tokens(logits, rows)), minlength=5).float() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0], dim=-1), atol=0.03)


def test_llm_shutdown_forgets_the_vocabulary_hashes():
    """The race's per-device vocabulary hashes (1.2 MB of device memory for Qwen3) go with the LLM."""
    from moelora import LLM
    from moelora.ops.torch import sample as race

    with LLM("demo", device="cpu", progress=False) as llm:
        llm.generate("Hello", SamplingParams(temperature=1.0, max_tokens=2))
        assert race._COLUMNS
    assert not race._COLUMNS
