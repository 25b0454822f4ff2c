"""Block-FP8 checkpoints in the published layout (quantization_config fp8, weight_block_size, float8_e4m3fn
weights with weight_scale_inv per block, partial last blocks, bf16 and fp32 scales, sharded with an
index) load as the same model with its weights dequantised: against transformers on that dequantised
model, and slice by slice (a rank's rows cutting through a block); malformed ones are refused by name.
Their routed experts are served in FP8 by default, with the checkpoint's own values and scales."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelora import LLM
from moelora.loader.checkpoint import Checkpoint, CheckpointError
from moelora.loader.fp8 import Fp8Checkpoint
from tests.hf_models import build_hf_model, hf_logprobs, logprob_tol, save_per_expert

BLOCK = (16, 16)  # the tiny models' sizes (16, 24, 32, 48, 64) give whole and partial blocks
NOT_CONVERTED = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "shared_expert_gate")


def quantize(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale_inv per block, the dequantised weight in fp32) of a 2-D weight."""
    bo, bi = BLOCK
    rows, cols = w.shape
    grid = (math.ceil(rows / bo), math.ceil(cols / bi))
    scale = torch.zeros(grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            block = w[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi]
            scale[i, j] = block.abs().max().clamp(min=1e-8) / 448.0
    scale = scale.to(scale_dtype)
    full = scale.float().repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:rows, :cols]
    w8 = (w / full).to(torch.float8_e4m3fn)
    return w8, scale, w8.float() * full


def write_fp8(src: Path, fp8: Path, ref: Path) -> None:
    """From a saved fp32 checkpoint: the FP8 one (two shards and an index; bf16 scales in the first
    shard, fp32 in the second) and the reference holding exactly its dequantised weights."""
    state = load_file(str(src / "model.safetensors"))
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for n, (key, w) in enumerate(sorted(state.items())):
        if w.dim() != 2 or any(s in key for s in NOT_CONVERTED):
            quantized[key] = dequantized[key] = w
            continue
        w8, scale, deq = quantize(w, torch.bfloat16 if n % 2 else torch.float32)
        quantized[key], quantized[key.removesuffix(".weight") + ".weight_scale_inv"] = w8, scale
        dequantized[key] = deq
    config = json.loads((src / "config.json").read_text())
    for folder in (fp8, ref):
        folder.mkdir()
        for extra in src.iterdir():
            if extra.name not in ("model.safetensors", "config.json"):
                (folder / extra.name).write_bytes(extra.read_bytes())
    save_file(dequantized, str(ref / "model.safetensors"))
    (ref / "config.json").write_text(json.dumps(config))
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
        "modules_to_not_convert": ["lm_head"],
    }
    (fp8 / "config.json").write_text(json.dumps(config))
    keys = sorted(quantized)
    half = len(keys) // 2
    index: dict[str, Any] = {"metadata": {}, "weight_map": {}}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: quantized[k].contiguous() for k in part}, str(fp8 / name), metadata={"format": "pt"})
        index["weight_map"] |= dict.fromkeys(part, name)
    (fp8 / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe"])
def checkpoints(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(f"fp8-{request.param}")
    src = save_per_expert(build_hf_model(request.param), root / "src")
    write_fp8(src, root / "fp8", root / "ref")
    return request.param, root / "fp8", root / "ref"


def test_fp8_checkpoint_is_its_dequantised_model(checkpoints):
    """moelora on the FP8 checkpoint against transformers on the dequantised weights (fp32)."""
    from transformers import AutoModelForCausalLM

    family, fp8, ref = checkpoints
    hf = AutoModelForCausalLM.from_pretrained(
        str(ref), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    prompts = [[3, 17, 42, 8, 99, 5, 61], [11, 12, 13]]
    with LLM(str(fp8), device="cpu", dtype="float32", progress=False, num_kv_blocks=32) as llm:
        got = llm.logits(prompts)
    for prompt, logits in zip(prompts, got, strict=True):
        (want,) = hf_logprobs(hf, [prompt])
        assert (logits.float().log_softmax(-1) - want).abs().max() < logprob_tol(torch.float32), family


def test_a_slice_through_blocks_reads_the_dequantised_slice(checkpoints):
    """Rows and columns cut mid-block (as a TP rank's share of 24 or 48 rows over 2, 3 or 4 ranks): the
    slice of the dequantised tensor, exactly."""
    _, fp8, ref = checkpoints
    want = {}
    for f in ref.glob("*.safetensors"):
        want |= load_file(str(f))
    with Checkpoint(fp8) as ckpt:
        source = Fp8Checkpoint(ckpt, BLOCK)
        names = source.keys()
        assert not any(k.endswith("weight_scale_inv") for k in names)
        quantized = [k for k in names if want[k].dim() == 2]
        assert any(source.read(k).dtype == torch.float32 and ckpt.read(k).dtype == torch.float8_e4m3fn
                   for k in quantized)  # fmt: skip
        for key in quantized:
            rows, cols = ckpt.shape(key)
            for r0, r1, c0, c1 in (
                (0, rows, 0, cols),
                (5, rows - 3, 0, cols),
                (rows // 2, rows, 7, cols - 1),
            ):
                got = source.read(key, (slice(r0, r1), slice(c0, c1)))
                assert torch.equal(got, want[key][r0:r1, c0:c1].float()), (key, r0, r1, c0, c1)


def edited(fp8: Path, tmp_path: Path, edit) -> Path:
    """A copy of the FP8 checkpoint with `edit(tensors)` applied to its shards."""
    out = tmp_path / "edited"
    out.mkdir()
    for f in fp8.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
            edit(tensors)
            save_file(tensors, str(out / f.name))
        else:
            (out / f.name).write_bytes(f.read_bytes())
    return out


def first_scale(tensors: dict[str, torch.Tensor]) -> str | None:
    return next((k for k in sorted(tensors) if k.endswith("weight_scale_inv")), None)


def test_a_missing_scale_is_refused(checkpoints, tmp_path: Path):
    _, fp8, _ = checkpoints
    dropped: list[str] = []

    def drop(t: dict[str, torch.Tensor]) -> None:
        if not dropped and (key := first_scale(t)):
            dropped.append(key)
            del t[key]

    folder = edited(fp8, tmp_path, drop)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped[0]]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    weight = dropped[0].removesuffix("_scale_inv")
    with pytest.raises(CheckpointError, match=rf"'{weight}' .* float8_e4m3fn but has no"):
        LLM(str(folder), device="cpu", dtype="float32", progress=False, num_kv_blocks=8)


def test_a_scale_of_the_wrong_shape_is_refused(checkpoints, tmp_path: Path):
    _, fp8, _ = checkpoints

    def widen(t: dict[str, torch.Tensor]) -> None:
        if key := first_scale(t):
            t[key] = torch.cat([t[key], t[key]], dim=1)

    folder = edited(fp8, tmp_path, widen)
    with pytest.raises(CheckpointError, match=r"weight_scale_inv' has shape .* needs"):
        LLM(str(folder), device="cpu", dtype="float32", progress=False, num_kv_blocks=8)


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not read"),
        ({"quant_method": "fp8"}, "weight_block_size None must be two positive integers"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}, "dynamic"),
    ],
)
def test_other_quantisations_are_refused(checkpoints, tmp_path: Path, quant: dict, message: str):
    _, fp8, _ = checkpoints
    folder = edited(fp8, tmp_path, lambda t: None)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        LLM(str(folder), device="cpu", dtype="float32", progress=False, num_kv_blocks=8)


def test_fp8_under_tp2_ep2(checkpoints):
    """Two gloo ranks: each reads its shards' slices (Qwen2-MoE's shared expert, 24 rows, splits 12/12
    through a 16-row block), against transformers on the dequantised weights."""
    from transformers import AutoModelForCausalLM

    family, fp8, ref = checkpoints
    hf = AutoModelForCausalLM.from_pretrained(
        str(ref), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    prompts = [[3, 17, 42, 8, 99, 5, 61]]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with LLM(
            str(fp8), device="cpu", dtype="float32", progress=False, num_kv_blocks=32, tp_size=2, ep_size=2
        ) as llm:
            (logits,) = llm.logits(prompts)
    finally:
        torch.set_num_threads(before)
    (want,) = hf_logprobs(hf, prompts)
    assert (logits.float().log_softmax(-1) - want).abs().max() < logprob_tol(torch.float32), family


def test_fp8_experts_keep_the_checkpoint_values(checkpoints):
    """By default (quantization "auto") the routed experts of a block-FP8 checkpoint are served in FP8:
    their FP8 values are the checkpoint's bit for bit and their scales its block scales, per row; with
    "none" they are dequantised into --dtype like every other weight."""
    from moelora.layers.moe import FusedMoE

    _, fp8, _ = checkpoints
    tensors: dict[str, torch.Tensor] = {}
    for f in fp8.glob("*.safetensors"):
        tensors |= load_file(str(f))
    opts: dict[str, Any] = dict(device="cpu", dtype="float32", progress=False, num_kv_blocks=8)
    with LLM(str(fp8), **opts) as llm:
        experts = [m for m in llm.model.modules() if isinstance(m, FusedMoE)]
        assert experts and all(m.scales is not None and m.scales.group == BLOCK[1] for m in experts)
        specs = {id(spec.param): spec for spec in llm.model.weight_specs()}
        for m in experts:
            assert m.scales is not None
            for param, table in ((m.w_gate_up, m.scales.gate_up), (m.w_down, m.scales.down)):
                (form,) = [f for f in specs[id(param)].forms if f.name == "per-expert"]
                for piece in form.pieces:  # whole rows and columns on one rank
                    assert torch.equal(
                        param[piece.dst].view(torch.uint8), tensors[piece.key].view(torch.uint8)
                    )
                    blocks = tensors[piece.key.removesuffix(".weight") + ".weight_scale_inv"].float()
                    rows = blocks.repeat_interleave(BLOCK[0], 0)[: tensors[piece.key].shape[0]]
                    assert torch.equal(table[piece.dst], rows), piece.key
    with LLM(str(fp8), quantization="none", **opts) as llm:
        assert all(m.scales is None and m.w_down.dtype == torch.float32
                   for m in llm.model.modules() if isinstance(m, FusedMoE))  # fmt: skip


def test_fp8_experts_split_through_a_scale_group(checkpoints, capfd):
    """tp=2 without EP splits each expert's 16 intermediate columns 8 / 8, inside one 16-column scale
    block: the kernels' FP8 groups would be 8 columns. "auto" serves those experts in --dtype (a warning
    says so), still equal to transformers; "fp8" is refused with the reason."""
    from transformers import AutoModelForCausalLM

    family, fp8, ref = checkpoints
    hf = AutoModelForCausalLM.from_pretrained(
        str(ref), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    prompts = [[3, 17, 42, 8, 99, 5, 61]]
    opts: dict[str, Any] = dict(device="cpu", dtype="float32", progress=False, num_kv_blocks=32, tp_size=2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with LLM(str(fp8), **opts) as llm:
            (logits,) = llm.logits(prompts)
        err = capfd.readouterr().err
        assert "served in float32, not FP8" in err and "groups of 8" in err
        with pytest.raises(Exception, match="groups of 8"):  # from rank 0, or rank 1 (WorkerError)
            LLM(str(fp8), quantization="fp8", **opts)
    finally:
        torch.set_num_threads(before)
    (want,) = hf_logprobs(hf, prompts)
    assert (logits.float().log_softmax(-1) - want).abs().max() < logprob_tol(torch.float32), family


def test_fp8_checkpoint_with_an_adapter_in_a_mixed_batch(checkpoints, tmp_path: Path):
    """A per-expert adapter on the FP8 experts (and attention) next to base requests, one batch: against
    transformers on the dequantised weights with the adapter merged (float64)."""
    from transformers import AutoModelForCausalLM

    from tests.hf_models import assert_mixed_batch
    from tests.lora_files import ATTENTION, merged_hf_model, write_adapter

    family, fp8, ref = checkpoints
    hf = AutoModelForCausalLM.from_pretrained(
        str(ref), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    expected = write_adapter(
        tmp_path / "r8", family, hf.config, rank=8, alpha=4.0, form="per_expert", seed=7,
        dense_targets=ATTENTION,
    )  # fmt: skip
    references = {None: hf, "r8": merged_hf_model(hf, expected)}
    assert_mixed_batch(fp8, tmp_path / "r8", references, [[3, 17, 42, 8, 99, 5, 61], [11, 12, 13]], family)
