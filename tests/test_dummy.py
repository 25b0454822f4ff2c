"""Dummy weights and dummy adapters: the same layers, shards and code path as a loaded checkpoint, nothing
read from disk; the published presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moelora import LLM, SamplingParams
from moelora.loader.model_loader import load_model, read_model_config
from moelora.loader.presets import preset_names, preset_path
from moelora.lora.dummy import DummyLora, make_dummy_adapter
from moelora.models.decoder import MoeForCausalLM
from moelora.parallel.state import ParallelState
from tests.hf_models import FAMILIES

LAYOUTS = [(1, 1, 0), *[(2, 2, r) for r in range(2)], *[(4, 2, r) for r in range(4)]]


def load(folder: Path, layout: tuple[int, int, int], fmt: str) -> MoeForCausalLM:
    tp, ep, rank = layout
    ps = ParallelState(rank, tp, ep)
    return load_model(folder, dtype="float32", device="cpu", ps=ps, progress=False, load_format=fmt)


@pytest.mark.parametrize("family", FAMILIES)
def test_dummy_model_has_the_loaded_model_s_parameters_on_every_rank(family, checkpoints):
    """Names, shapes and dtypes of every rank's share under tp=2/ep=2 and tp=4/ep=2 equal a real load's;
    the values are not the checkpoint's (nothing was read)."""
    for layout in LAYOUTS:
        if family == "olmoe" and layout[0] == 4:
            continue  # the test OLMoE has 2 attention heads
        real = dict(load(checkpoints[family], layout, "safetensors").named_parameters())
        dummy = dict(load(checkpoints[family], layout, "dummy").named_parameters())
        assert {n: (p.shape, p.dtype) for n, p in dummy.items()} == {
            n: (p.shape, p.dtype) for n, p in real.items()
        }
        matrices = [n for n, p in real.items() if p.dim() >= 2]
        assert not any(torch.equal(real[n], dummy[n]) for n in matrices)
        assert all(torch.isfinite(p).all() and p.abs().max() > 0 for p in dummy.values())


def test_dummy_shards_are_slices_of_the_one_process_model(checkpoints):
    """Every rank draws the same full tensors and keeps its part, as it would read a checkpoint."""
    folder = checkpoints["qwen3_moe"]
    whole = load(folder, (1, 1, 0), "dummy")
    for rank in range(2):
        part = load(folder, (2, 2, rank), "dummy")  # moe_tp 1: whole experts, 4 of 8 each
        for layer in (0, 2):  # the MoE layers
            mine, full = part.layers[layer].mlp.experts, whole.layers[layer].mlp.experts
            first = mine.placement.first
            assert torch.equal(mine.w_down, full.w_down[first : first + mine.placement.count])
        rows = part.embed_tokens.rows
        assert torch.equal(part.embed_tokens.weight, whole.embed_tokens.weight[rows])
        o_cols = part.layers[0].self_attn.o_proj.cols
        assert torch.equal(
            part.layers[0].self_attn.o_proj.weight, whole.layers[0].self_attn.o_proj.weight[:, o_cols]
        )


def test_presets_build_at_their_published_size():
    """Every preset reads as its family and builds (on the meta device) with its published size."""
    billions = {
        "qwen3-30b-a3b": 30.5,
        "qwen3-235b-a22b": 235.1,
        "qwen1.5-moe-a2.7b": 14.3,
        "mixtral-8x7b": 46.7,
        "olmoe-1b-7b": 6.9,
        "glm-4.5-air": 106.9,  # "106B total", its multi-token-prediction layer not counted (not served)
        "deepseek-v3": 671.0,  # 671B, the multi-token-prediction layer (14B more on disk) not served
        "deepseek-v2-lite": 15.7,
        "gpt-oss-20b": 20.9,  # "21B", "117B": their MXFP4 experts counted as parameters
        "gpt-oss-120b": 116.8,
        "qwen3-next-80b-a3b": 79.7,  # 79,674,391,296 in the published files
        "qwen3.5-35b-a3b": 34.7,  # its text model (the multimodal checkpoint's vision tower is not served)
    }
    assert set(billions) <= set(preset_names())
    for name, size in billions.items():
        cfg, family = read_model_config(preset_path(name))
        with torch.device("meta"):
            model = MoeForCausalLM(cfg, family, ParallelState(), torch.bfloat16)
        params = sum(p.numel() for p in model.parameters()) / 1e9
        assert abs(params - size) / size < 0.01, (name, params)
    cfg, _ = read_model_config(preset_path("qwen3-30b-a3b"), {"num_hidden_layers": 2})
    assert cfg.num_layers == 2 and len(cfg.moe_layers) == 2


def test_presets_by_name_are_dummy_and_refuse_real_weights():
    with LLM("preset:tiny-qwen3-moe", device="cpu", progress=False, num_kv_blocks=16) as llm:
        assert llm.load_format == "dummy" and llm.tokenizer is None
        (out,) = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))
        assert len(out.token_ids) == 4
    with pytest.raises(ValueError, match="has no weights"):
        LLM("preset:tiny-qwen3-moe", device="cpu", progress=False, load_format="safetensors")
    with pytest.raises(FileNotFoundError, match=r"presets: .*qwen3-30b-a3b"):
        LLM("preset:qwen4", device="cpu", progress=False)


def test_dummy_adapter_covers_its_targets_and_owned_experts():
    cfg, _ = read_model_config(preset_path("tiny-qwen3-moe"))
    spec = DummyLora(rank=8, seed=3, targets=("attn", "experts"))
    full = make_dummy_adapter("d", spec, cfg)
    assert full.rank == 8 and str(full.source) == "dummy:rank=8,seed=3,targets=attn+experts"
    assert set(full.dense) == {
        (i, t) for i in range(cfg.num_layers) for t in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    assert all(len(by_expert) == cfg.num_experts for by_expert in full.experts.values())
    mine = make_dummy_adapter("d", spec, cfg, owns_expert=lambda e: e >= 4)
    for key, by_expert in mine.experts.items():
        assert set(by_expert) == {4, 5, 6, 7}
        for e, w in by_expert.items():  # the same draw on every rank
            assert torch.equal(w.A, full.experts[key][e].A) and torch.equal(w.B, full.experts[key][e].B)
    assert all(w.B.abs().min() > 0 for w in full.dense.values())
    with pytest.raises(ValueError, match="choose from attn, experts, shared, mlp"):
        DummyLora(4, targets=("router",))


def run_dummy(tp: int, ep: int) -> list[list[float]]:
    """Greedy log-probs of base and two dummy-adapter requests on the tiny preset."""
    adapters = {f"d{i}": DummyLora(rank=4 * (i + 1), seed=i) for i in range(2)}
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    with LLM(
        "preset:tiny-qwen3-moe",
        device="cpu",
        progress=False,
        tp_size=tp,
        ep_size=ep,
        num_kv_blocks=32,
        lora_modules=adapters,
        max_loras_per_batch=2,
    ) as llm:
        outs = llm.generate(prompts, params, lora=[None, "d0", "d1"])
        assert [i.name for i in llm.list_loras()] == ["d0", "d1"]
    return [[lp[t] for t, lp in zip(o.token_ids, o.logprobs, strict=True)] for o in outs]


def test_dummy_model_and_adapters_agree_across_layouts(one_thread):
    """tp=2/ep=2 workers draw the same dummy weights and adapters (by spec, not from files) as one
    process; the adapters change the outputs."""
    single = run_dummy(1, 1)
    split = run_dummy(2, 2)
    for a, b in zip(single, split, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    with LLM("preset:tiny-qwen3-moe", device="cpu", progress=False, num_kv_blocks=32) as base:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
        outs = base.generate([[9, 10], [11, 12, 13]], params)
    plain = [[lp[t] for t, lp in zip(o.token_ids, o.logprobs, strict=True)] for o in outs]
    assert plain[0] != pytest.approx(single[1], abs=1e-4)
