"""Every bad checkpoint fails with a message naming the tensor or file and the shapes involved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelora import LLM
from moelora.loader.checkpoint import CheckpointError
from moelora.loader.model_loader import load_model, resolve_dtype
from moelora.loader.resolve import ModelNotFoundError, resolve_model
from moelora.models.registry import UnsupportedModelError
from tests.hf_models import save_per_expert

EXPERT_KEY = "model.layers.0.mlp.experts.3.up_proj.weight"


@pytest.fixture
def ckpt(checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the Qwen3-MoE checkpoint to break."""
    return Path(shutil.copytree(checkpoints["qwen3_moe"], tmp_path / "model"))


def rewrite(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def load(folder: Path):
    return load_model(folder, device="cpu", progress=False)


def test_missing_tensor_is_named(ckpt: Path):
    rewrite(ckpt, lambda t: t.pop(EXPERT_KEY))
    with pytest.raises(CheckpointError, match=r"missing tensors .*experts\.3\.up_proj\.weight"):
        load(ckpt)


def test_unexpected_tensor_is_named(ckpt: Path):
    rewrite(ckpt, lambda t: t.update({"model.layers.0.mlp.surprise.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*mlp\.surprise\.weight"):
        load(ckpt)


def test_misshaped_tensor_names_both_shapes(ckpt: Path):
    rewrite(ckpt, lambda t: t.update({EXPERT_KEY: torch.ones(17, 32)}))
    with pytest.raises(CheckpointError) as e:
        load(ckpt)
    msg = str(e.value)
    assert EXPERT_KEY in msg and "[17, 32]" in msg and "[16, 32]" in msg and "model.safetensors" in msg


def test_unsupported_architecture_lists_supported(ckpt: Path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        load(ckpt)
    msg = str(e.value)
    assert "LlamaForCausalLM" in msg
    for arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM"):
        assert arch in msg


def test_truncated_file_is_named(ckpt: Path):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors' is truncated"):
        load(ckpt)


def test_truncated_header_is_named(ckpt: Path):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"model\.safetensors' is truncated or not a safetensors file"):
        load(ckpt)


def test_truncated_shard_of_sharded_checkpoint_is_named(hf_models, tmp_path: Path):
    folder = save_per_expert(hf_models["qwen3_moe"], tmp_path / "sharded", max_shard_size="40KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{shard.name}' is truncated"):
        load(folder)


def test_index_naming_a_missing_file(hf_models, tmp_path: Path):
    folder = save_per_expert(hf_models["qwen3_moe"], tmp_path / "sharded", max_shard_size="40KB")
    gone = sorted(folder.glob("model-*.safetensors"))[0]
    gone.unlink()
    with pytest.raises(CheckpointError, match=rf"lists '{gone.name}', which is not in"):
        load(folder)


def test_malformed_config_json(ckpt: Path):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load(ckpt)


def test_missing_config_json(ckpt: Path):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json in"):
        load(ckpt)


def test_no_weights(ckpt: Path):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load(ckpt)


def test_unknown_model_is_not_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        resolve_model("nobody/no-such-model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "absent"))


def test_model_from_hugging_face_cache(checkpoints: dict[str, Path], tmp_path: Path):
    """A model id already in the local cache resolves to its snapshot folder, offline."""
    repo = tmp_path / "models--someone--tiny-moe"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(checkpoints["qwen3_moe"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert resolve_model("someone/tiny-moe", hf_cache_dir=str(tmp_path)) == snap


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="not one of auto, float32, bfloat16, float16"):
        resolve_dtype("float8", torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            LLM("demo", device="cuda", progress=False)


def test_bad_prompts():
    with LLM("demo", progress=False) as llm:
        with pytest.raises(ValueError, match="at least one token"):
            llm.logits([[]])
        with pytest.raises(ValueError, match=r"token id 9999 is outside the vocabulary \[0, 512\)"):
            llm.logits([[1, 9999]])
