"""Qwen3.5-MoE against transformers (fp64 eager, the delta rule with the recurrence as in
tests/test_qwen3_next.py): its linear layers' four projections, every layer MoE; a PEFT adapter on every
projection in a mixed batch; the published multimodal checkpoint layout (text model under
`model.language_model`, a vision tower that is not read) serving the same model."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelora import LLM, SamplingParams
from tests.hf_models import assert_logprobs, build_hf_model, hf_logprobs, logprob_tol
from tests.test_engine_hf import agree_until_near_tie, hf_greedy
from tests.test_qwen3_next import (
    MLP_MODULES,
    assert_layout_matches_one_process,
    merged,
    peft_adapter,
    prompts,
    recurrent,
)

modeling = pytest.importorskip("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
LINEAR = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "in_proj_qkv",
    "in_proj_z",
    "in_proj_b",
    "in_proj_a",
    "out_proj",
]


@pytest.fixture(scope="module")
def hf_model() -> Any:
    return build_hf_model("qwen3_5_moe")


@pytest.fixture(scope="module")
def checkpoint(hf_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qwen3.5-moe")
    hf_model.save_pretrained(folder)
    return folder


def test_base_and_adapter_match_transformers(
    hf_model: Any, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Base and adapter rows in one float64 batch against transformers (the hand-merged model for the
    adapter), greedy base tokens against its cached generation up to a near tie."""
    lora = peft_adapter(hf_model, tmp_path / "a", 5, LINEAR + MLP_MODULES)
    assert any("linear_attn.in_proj_qkv" in k for k in lora) and any("experts.base_layer" in k for k in lora)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=5)
    batch, names = prompts() * 2, [None] * 4 + ["a"] * 4
    modules = {"a": str(tmp_path / "a")}
    with LLM(str(checkpoint), device="cpu", dtype="float64", progress=False, lora_modules=modules) as llm:
        outs = llm.generate(batch, params, lora=names)
    greedy = [hf_greedy(hf_model, p, 6) for p in prompts()]
    references = {
        None: recurrent(copy.deepcopy(hf_model), monkeypatch, modeling),
        "a": recurrent(merged(hf_model, lora), monkeypatch, modeling),
    }
    for prompt, name, out in zip(batch, names, outs, strict=True):
        (ref,) = hf_logprobs(references[name], [prompt])
        # The adapter's rows: its LoRA unmerged here, merged there, exact in fp64 but rounded differently
        # where transformers (and moelora with it) drops to fp32 (delta rule, norms): fp32's tolerance.
        assert_logprobs(out, ref, logprob_tol("float64" if name is None else "float32"), f"float64 {name}")
    for out, (tokens, margins) in zip(outs[:4], greedy, strict=True):
        agree_until_near_tie(out.outputs[0].token_ids, tokens, margins)


def test_multimodal_checkpoint_serves_its_text_model(hf_model: Any, checkpoint: Path, tmp_path: Path):
    """The published layout: Qwen3_5MoeForConditionalGeneration with the text config nested, the text
    weights under model.language_model, a vision tower and MTP weights beside them (not read): the same
    tokens and log-probs as the text-only checkpoint."""
    folder = tmp_path / "vl"
    folder.mkdir()
    text = load_file(str(next(checkpoint.glob("*.safetensors"))))
    tensors = {
        (k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
        for k, v in text.items()
    }
    tensors["model.visual.patch_embed.proj.weight"] = torch.randn(8, 3, 2, 4, 4)
    tensors["mtp.fc.weight"] = torch.randn(32, 64)
    save_file(tensors, str(folder / "model.safetensors"))
    text_config = json.loads((checkpoint / "config.json").read_text())
    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": {k: v for k, v in text_config.items() if k != "architectures"},
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=3)
    outs = {}
    for name, path in (("text", checkpoint), ("vl", folder)):
        with LLM(str(path), device="cpu", dtype="float32", progress=False) as llm:
            outs[name] = llm.generate(prompts(), params)
    for a, b in zip(outs["text"], outs["vl"], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.prompt_logprobs == b.prompt_logprobs


def test_tp_ep_layout_matches_one_process(checkpoint: Path, hf_model: Any, tmp_path: Path, one_thread):
    """tp=2, ep=2: in_proj_qkv read as three row blocks a rank (its q, k and v heads), in_proj_z, b, a by
    value heads, with an adapter on every projection."""
    peft_adapter(hf_model, tmp_path / "a", 6, LINEAR + MLP_MODULES)
    assert_layout_matches_one_process(checkpoint, tmp_path / "a", 2, 2)
