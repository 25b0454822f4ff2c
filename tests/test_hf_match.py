"""moelora's forward pass against Hugging Face transformers (fp32, eager attention and experts)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from moelora import LLM
from moelora.loader.model_loader import load_model
from tests.hf_models import FAMILIES, VOCAB, hf_logprobs, logprob_tol, save_fused, save_per_expert

TOL = logprob_tol(torch.float32)  # moelora in fp32 against the float64 reference


def batch_of_prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 1, 12, 5)]


def moelora_logprobs(folder: Path, seqs: list[list[int]], dtype: str = "auto") -> list[torch.Tensor]:
    with LLM(str(folder), dtype=dtype, device="cpu", progress=False) as llm:
        return [x.log_softmax(-1) for x in llm.logits(seqs)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_match_transformers(family: str, hf_models: dict[str, Any], checkpoints: dict[str, Path]):
    seqs = batch_of_prompts()
    ref = hf_logprobs(hf_models[family], seqs)
    ours = moelora_logprobs(checkpoints[family], seqs)
    assert max_diff(ours, ref) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_expert_keys_give_identical_outputs(
    family: str, hf_models: dict[str, Any], checkpoints: dict[str, Path], tmp_path: Path
):
    fused = save_fused(hf_models[family], tmp_path / "fused")
    seqs = batch_of_prompts(seed=2)
    a, b = moelora_logprobs(checkpoints[family], seqs), moelora_logprobs(fused, seqs)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_sharded_checkpoint_loads(hf_models: dict[str, Any], tmp_path: Path):
    folder = save_per_expert(hf_models["qwen3_moe"], tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    seqs = batch_of_prompts(seed=3)
    assert max_diff(moelora_logprobs(folder, seqs), hf_logprobs(hf_models["qwen3_moe"], seqs)) < TOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_load_and_stay_close(dtype: str, hf_models: dict[str, Any], checkpoints: dict[str, Path]):
    model = load_model(checkpoints["qwen3_moe"], dtype=dtype, device="cpu", progress=False)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    seqs = batch_of_prompts(seed=4)
    ours = moelora_logprobs(checkpoints["qwen3_moe"], seqs, dtype=dtype)
    ref = hf_logprobs(hf_models["qwen3_moe"], seqs)
    # Half precision is not exact; the distributions must still agree where they carry mass.
    for x, y in zip(ours, ref, strict=True):
        assert torch.equal(x.argmax(-1), y.argmax(-1))


def test_auto_dtype_is_the_checkpoints(hf_models: dict[str, Any], tmp_path: Path):
    model = copy.deepcopy(hf_models["mixtral"])  # the session's model must keep its fp32 weights
    folder = save_per_expert(model.to(torch.bfloat16), tmp_path / "bf16")
    loaded = load_model(folder, device="cpu", progress=False)
    assert loaded.lm_head.head_weight().dtype == torch.bfloat16


def test_glm_multi_token_prediction_layers_are_skipped(hf_models: dict[str, Any], tmp_path: Path):
    """GLM-4.5 checkpoints carry num_nextn_predict_layers MTP layers after the last layer (transformers
    ignores them on load): they are skipped, and are unexpected tensors when the config declares none."""
    from safetensors.torch import save_file

    model = hf_models["glm4_moe"]
    folder = save_fused(model, tmp_path / "mtp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    last = model.config.num_hidden_layers
    state[f"model.layers.{last}.eh_proj.weight"] = torch.randn(32, 64)
    state[f"model.layers.{last}.mlp.experts.0.gate_proj.weight"] = torch.randn(16, 32)
    save_file(state, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    config["architectures"] = ["Glm4MoeForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    seqs = batch_of_prompts(seed=4)
    assert max_diff(moelora_logprobs(folder, seqs), hf_logprobs(model, seqs)) < TOL
    config["num_nextn_predict_layers"] = 0
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=rf"unexpected tensors.*model\.layers\.{last}\."):
        load_model(folder, device="cpu", progress=False)
