"""SamplingParams: defaults, normalisation of stop options, and one clear error per invalid field."""

from __future__ import annotations

import dataclasses
import math

import pytest

from moelora.sampling_params import SamplingParams


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.ignore_eos) == (None, 16, 0, False)
    assert (p.logprobs, p.prompt_logprobs, p.skip_special_tokens) == (None, None, True)
    assert p.stop == () and p.stop_token_ids == ()
    assert not p.greedy


@pytest.mark.parametrize(
    ("stop", "want"),
    [(None, ()), ("###", ("###",)), (["a", "bc"], ("a", "bc")), (("x",), ("x",)), ([], ())],
)
def test_stop_becomes_a_tuple(stop, want):
    assert SamplingParams(stop=stop).stop == want


@pytest.mark.parametrize(("ids", "want"), [(None, ()), ([7, 3], (7, 3)), ((0,), (0,)), (range(2), (0, 1))])
def test_stop_token_ids_become_a_tuple(ids, want):
    params = SamplingParams(stop_token_ids=ids)
    assert params.stop_token_ids == want
    assert type(params.stop_token_ids) is tuple


def test_greedy_and_greedy_copies():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0, n=4).n == 4
    assert not SamplingParams(temperature=1e-3).greedy


def test_frozen_and_hashable():
    p = SamplingParams(stop=["a"], stop_token_ids=[1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(stop="a", stop_token_ids=(1,)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 1.0, "top_k": 0, "min_p": 1.0},
        {"top_p": 1e-9, "top_k": 1, "min_p": 0.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0, "repetition_penalty": 1e-3},
        {"max_tokens": None, "min_tokens": 10_000},
        {"max_tokens": 5, "min_tokens": 5},
        {"logprobs": 0, "prompt_logprobs": 20},
        {"seed": -(2**63)},
        {"seed": 2**64 - 1},
        {"temperature": 0, "n": 3, "seed": 7},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    p = SamplingParams(**kwargs)
    assert all(getattr(p, k) == v for k, v in kwargs.items())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("n", 1.5),
        ("n", True),
        ("temperature", -1.0),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_k", -2),
        ("top_k", 2.0),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", -3.0),
        ("frequency_penalty", math.nan),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("seed", 1.0),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("logprobs", 21),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", 100),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [1.0]),
        ("stop_token_ids", "12"),
    ],
)
def test_invalid_field_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_message_states_the_rule():
    with pytest.raises(ValueError, match=r"^temperature must be >= 0 and finite, got -1.0$"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\], got 0$"):
        SamplingParams(top_p=0)
