"""The KV cache budget on CUDA leaves the largest step's activations free (the card's figures stubbed)."""

from pathlib import Path

import pytest
import torch

import moelora
from moelora.cache import budget
from moelora.config import EngineArgs
from moelora.loader.model_loader import read_model_config
from moelora.models.config import activation_bytes

GIB = 1 << 30
CUDA = torch.device("cuda", 0)
PRESETS = Path(moelora.__file__).parent / "presets"


@pytest.fixture
def card(monkeypatch):
    """A stub card: set free and total (bytes); mem_get_info reads them."""
    state = {"free": 0, "total": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], state["total"]))
    return state


def test_default_fraction_when_the_step_fits(card):
    card.update(free=100 * GIB, total=140 * GIB)
    blocks = budget.plan_kv_blocks(EngineArgs(), GIB, 4096, CUDA, activations=4 * GIB)
    assert blocks == 80  # 0.8 of free: the 20 left hold 4 x 1.25 + 1


def test_default_leaves_the_step_free_when_the_fraction_does_not(card):
    card.update(free=20 * GIB, total=140 * GIB)
    blocks = budget.plan_kv_blocks(EngineArgs(), GIB // 4, 4096, CUDA, activations=8 * GIB)
    assert blocks == 4 * (20 - 11)  # not 0.8 x 20 = 16 GiB: 8 GiB x 1.25 + 1 stay free


def test_share_of_the_card_leaves_the_larger_reserve(card):
    card.update(free=60 * GIB, total=100 * GIB)  # 40 in use
    args = EngineArgs(gpu_memory_utilization=0.9)
    assert budget.plan_kv_blocks(args, GIB, 4096, CUDA, activations=2 * GIB) == 90 - 40 - 9  # 10% of 90
    assert budget.plan_kv_blocks(args, GIB, 4096, CUDA, activations=12 * GIB) == 90 - 40 - 16


def test_explicit_budgets_are_kept(card):
    card.update(free=20 * GIB, total=140 * GIB)
    assert budget.plan_kv_blocks(EngineArgs(num_kv_blocks=7), GIB, 4096, CUDA, activations=50 * GIB) == 7
    args = EngineArgs(kv_cache_memory=18 * GIB)
    assert budget.plan_kv_blocks(args, GIB, 4096, CUDA, activations=50 * GIB) == 18


def test_activation_estimate_of_a_published_model():
    """Qwen3-30B-A3B, a step of 40,960 tokens (its default): the MoE pair buffers dominate, 8 choices x
    (3 x 768 + 2048) bf16 values a token; at least those, and not wildly more."""
    cfg, _ = read_model_config(PRESETS / "qwen3-30b-a3b")
    est = activation_bytes(cfg, 40960, 256, torch.bfloat16)
    pair_buffers = 40960 * 8 * (3 * 768 + 2048) * 2
    assert pair_buffers < est < 2 * pair_buffers
    assert activation_bytes(cfg, 2 * 40960, 256, torch.bfloat16) > 1.9 * est - 1


def test_adapter_slots_made_after_the_cache_are_not_counted_free(card):
    """The adapter pool is allocated after the cache: 0.8 of what stays free after it, and the
    activations' reserve after both (the Qwen3-30B-A3B run on an H200 with 8 slots ran out of memory in a
    prefill of 40,960 tokens when the cache took 0.8 of the free memory the pool was about to use)."""
    card.update(free=80 * GIB, total=140 * GIB)
    assert budget.plan_kv_blocks(EngineArgs(), GIB, 4096, CUDA, activations=0, pending=20 * GIB) == 48
    blocks = budget.plan_kv_blocks(EngineArgs(), GIB, 4096, CUDA, activations=12 * GIB, pending=50 * GIB)
    assert blocks == 80 - 50 - 16
    args = EngineArgs(gpu_memory_utilization=0.9)  # 60 in use, 126 the share: 126 - 60 - 20 - 12.6
    assert budget.plan_kv_blocks(args, GIB // 10, 4096, CUDA, activations=0, pending=20 * GIB) == 334


def test_model_len_fitted_where_the_models_own_does_not(card):
    """Qwen3-30B-A3B's 40,960 tokens do not fit beside their step's activations in 6 GiB; a step of
    fewer tokens keeps a smaller reserve, so the cache for the longest length that fits holds it, one more
    token does not, and it is longer than the cache planned for the full length."""
    cfg, _ = read_model_config(PRESETS / "qwen3-30b-a3b")
    per_block = 48 * 16 * 4 * 128 * 2 * 2  # layers x tokens x KV heads x dim x (K, V) x bf16
    card.update(free=6 * GIB, total=80 * GIB)

    def blocks_for(model_len: int) -> int:
        activations = activation_bytes(cfg, max(8192, model_len), 16, torch.bfloat16)
        return budget.plan_kv_blocks(EngineArgs(), per_block, model_len, CUDA, activations)

    full = blocks_for(40960) * 16
    length, blocks = budget.fit_model_len(blocks_for, 16, 40960)
    assert full < length < 40960
    assert blocks == blocks_for(length) and blocks * 16 >= length
    assert blocks_for(length + 1) * 16 < length + 1
    card.update(free=200 * GIB, total=200 * GIB)  # the full length fits: kept
    assert budget.fit_model_len(blocks_for, 16, 40960) == (40960, blocks_for(40960))
    card.update(free=GIB // 2, total=80 * GIB)  # not even one token
    assert budget.fit_model_len(blocks_for, 16, 40960)[0] == 0


def test_engine_lowers_the_models_length_to_what_fits(monkeypatch, caplog):
    """Without max_model_len or chunked prefill the engine plans the cache for the longest length that
    fits beside its own step (here a toy budget: the demo's 2,048 tokens leave no block; 1,280 fit),
    says so, and serves. With chunked prefill (the default) the step stays at its budget of tokens
    whatever the length, and the model's whole length fits."""
    from moelora import LLM, SamplingParams
    from moelora.engine import engine as engine_mod

    monkeypatch.setattr(engine_mod, "_MIN_STEP_TOKENS", 256)
    monkeypatch.setattr(engine_mod, "activation_bytes", lambda cfg, tokens, rows, dtype: tokens)
    monkeypatch.setattr(
        engine_mod,
        "plan_kv_blocks",
        lambda args, per_block, model_len, device, act, pending: max(0, 400 - act // 4),
    )
    whole = dict(device="cpu", progress=False, enable_chunked_prefill=False)
    with caplog.at_level("WARNING", logger="moelora"), LLM("demo", **whole) as llm:
        assert llm.engine.max_model_len == 1280 and llm.engine.allocator.num_blocks == 80
        assert "max_model_len lowered to 1280 (the model allows 2048)" in caplog.text
        out = llm.generate("Hello", SamplingParams(max_tokens=4, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="too few for max_model_len 2048"):  # a length the user asks for
        LLM("demo", max_model_len=2048, **whole)
    caplog.clear()
    with caplog.at_level("WARNING", logger="moelora"), LLM("demo", device="cpu", progress=False) as llm:
        assert llm.engine.max_model_len == 2048 and llm.engine.allocator.num_blocks == 400 - 256 // 4
        assert "lowered" not in caplog.text
