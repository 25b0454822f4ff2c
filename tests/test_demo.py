"""Tests for the built-in demo checkpoint: reproducible, cache-safe, and loadable by transformers as-is."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelora import demo
from moelora.demo import demo_model_path

_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
_PROMPTS = (
    "The weather today is",
    "My computer",
    "To make a simple soup,",
    "Travelling light means",
    "Hello",
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build once per module, since every test below only reads the folder."""
    return demo_model_path(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def model_and_info(demo_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Load the model once with loading info, as loading dominates the test time."""
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        demo_dir,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
        output_loading_info=True,
    )
    return loaded


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of each checkpoint file, to compare builds byte for byte."""
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in _FILES}


def test_builds_all_files_in_versioned_folder(demo_dir: Path) -> None:
    assert demo_dir.name == "demo-v1"
    assert all((demo_dir / name).is_file() for name in _FILES)
    assert not [p for p in demo_dir.parent.iterdir() if p.name != "demo-v1"], "staging folder left behind"


def test_build_is_deterministic(tmp_path: Path, demo_dir: Path) -> None:
    first = demo_model_path(tmp_path / "a")
    second = demo_model_path(tmp_path / "b")
    assert _digests(first) == _digests(second) == _digests(demo_dir)


def test_cached_folder_is_reused(tmp_path: Path) -> None:
    folder = demo_model_path(tmp_path)
    stamps = {name: (folder / name).stat().st_mtime_ns for name in _FILES}
    assert demo_model_path(tmp_path) == folder
    assert {name: (folder / name).stat().st_mtime_ns for name in _FILES} == stamps


def test_incomplete_folder_is_rebuilt(tmp_path: Path) -> None:
    broken = tmp_path / "demo-v1"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    folder = demo_model_path(tmp_path)
    assert folder == broken
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert all((folder / name).is_file() for name in _FILES)


def test_race_loser_keeps_the_winners_folder(tmp_path: Path) -> None:
    """A second builder finishing late must neither fail nor disturb the folder already published."""
    winner = demo_model_path(tmp_path)
    before = _digests(winner)
    late = tmp_path / ".demo-v1.tmp-late"
    late.mkdir()
    (late / "config.json").write_text("{}")
    demo._publish(late, winner)
    assert _digests(winner) == before


def test_cache_dir_comes_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOELORA_CACHE", str(tmp_path / "env-cache"))
    assert demo_model_path() == tmp_path / "env-cache" / "demo-v1"


def test_checkpoint_uses_per_expert_keys(demo_dir: Path) -> None:
    with safe_open(demo_dir / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.get_slice("model.layers.2.mlp.experts.7.down_proj.weight").get_shape() == [64, 32]
        assert handle.get_slice("model.layers.0.mlp.gate.weight").get_shape() == [8, 64]
    assert "model.layers.1.mlp.gate_proj.weight" in keys
    assert not any(key.startswith("model.layers.1.mlp.experts.") for key in keys)
    assert {key for key in keys if key.startswith("model.layers.0.mlp.experts.")} == {
        f"model.layers.0.mlp.experts.{e}.{proj}.weight"
        for e in range(8)
        for proj in ("gate_proj", "up_proj", "down_proj")
    }


def test_transformers_loads_without_missing_keys(model_and_info: tuple[Any, dict[str, Any]]) -> None:
    model, info = model_and_info
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    layers = model.model.layers
    assert hasattr(layers[0].mlp, "experts") and hasattr(layers[2].mlp, "experts")
    assert hasattr(layers[1].mlp, "gate_proj")


def test_special_ids_agree_between_tokenizer_and_config(demo_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    config = json.loads((demo_dir / "config.json").read_text())
    assert len(tokenizer) == config["vocab_size"] == 512
    assert config["eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (
        config["pad_token_id"] == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    )
    assert tokenizer.bos_token is None


@pytest.mark.parametrize("text", ["Hello world!", "  spaces,\ttabs\nand lines", "ünïcödé 漢字 🙂 <b>"])
def test_tokenizer_round_trip(demo_dir: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_chat_template(demo_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(text)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def test_logits_have_clear_margins(demo_dir: Path, model_and_info: tuple[Any, dict[str, Any]]) -> None:
    """Greedy decoding must not hinge on near-ties, or implementations disagree on rounding noise."""
    model, _ = model_and_info
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    stds, gaps = [], []
    with torch.no_grad():
        for prompt in _PROMPTS:
            logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0]
            assert torch.isfinite(logits).all()
            top2 = logits.topk(2, dim=-1).values
            stds.append(logits.std(dim=-1))
            gaps.append(top2[:, 0] - top2[:, 1])
    std, gap = torch.cat(stds), torch.cat(gaps)
    assert std.min() > 2.0 and std.max() < 10.0
    assert gap.median() > 0.5
    assert (gap < 0.01).float().mean() < 0.1
