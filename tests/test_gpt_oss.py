"""GPT-OSS against transformers (fp32/fp64 eager) and PEFT: attention sinks, alternating sliding and full
attention (prompts longer than the window), YaRN rotary, the biased router, the biased experts with the
clamped SwiGLU stored fused and in-major with gate and up interleaved; adapters in PEFT's form for it
(attention target_modules plus target_parameters on both expert tensors) in a mixed batch; TP x EP."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from moelora import LLM, SamplingParams
from tests.hf_models import VOCAB, assert_logprobs, build_hf_model, hf_logprobs, logprob_tol
from tests.test_engine_hf import agree_until_near_tie, hf_greedy

NEW_TOKENS = 6


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(23)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 3, 12)]  # window: 4


@pytest.fixture(scope="module")
def hf_model() -> Any:
    return build_hf_model("gpt_oss")


@pytest.fixture(scope="module")
def checkpoint(hf_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpt-oss")
    hf_model.save_pretrained(folder)
    return folder


def peft_adapter(hf_model: Any, folder: Path, seed: int) -> Any:
    """A PEFT adapter on q/k/v/o and both fused expert tensors (random A and B), saved to `folder`;
    returns the PEFT model (its forward is one reference)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    model = get_peft_model(copy.deepcopy(hf_model), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(folder)
    return model.eval()


def merged(hf_model: Any, peft_model: Any) -> Any:
    """The other reference: transformers' model with every LoRA folded into its weights by hand, in the
    checkpoint's own layout: W += s * B @ A for q/k/v/o, and for the in-major experts
    W[e] += s * (B_e @ A_e).T with A_e = lora_A[e*r:(e+1)*r], B_e = lora_B[:, e::E]."""
    model = copy.deepcopy(hf_model).to(torch.float64)
    state = {k: v.double() for k, v in peft_model.state_dict().items() if "lora_" in k}
    s = 8 / 4
    for i, layer in enumerate(model.model.layers):
        pre = f"base_model.model.model.layers.{i}."
        with torch.no_grad():
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                a = state[f"{pre}self_attn.{proj}.lora_A.default.weight"]
                b = state[f"{pre}self_attn.{proj}.lora_B.default.weight"]
                getattr(layer.self_attn, proj).weight += s * b @ a
            experts = layer.mlp.experts
            n = experts.gate_up_proj.shape[0]
            for param, key in ((experts.gate_up_proj, "base_layer."), (experts.down_proj, "")):
                a = state[f"{pre}mlp.experts.{key}lora_A.default.weight"]
                b = state[f"{pre}mlp.experts.{key}lora_B.default.weight"]
                r = a.shape[0] // n
                for e in range(n):
                    param[e] += s * (b[:, e::n] @ a[e * r : (e + 1) * r]).T
    return model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_base_matches_transformers(hf_model: Any, checkpoint: Path, dtype: str):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=5)
    with LLM(str(checkpoint), device="cpu", dtype=dtype, progress=False, num_kv_blocks=64) as llm:
        assert llm.engine.executor.runner.graphs is None  # PyTorch sinks and experts: no graphs
        outs = llm.generate(prompts(), params)
    for prompt, out in zip(prompts(), outs, strict=True):
        (ref,) = hf_logprobs(hf_model, [prompt])
        assert_logprobs(out, ref, logprob_tol(dtype), "base")
        tokens, margins = hf_greedy(hf_model, prompt, NEW_TOKENS)
        agree_until_near_tie(out.outputs[0].token_ids, tokens, margins)


def test_the_clamp_and_the_sinks_matter(hf_model: Any):
    """The test model exercises what GPT-OSS adds: without the SwiGLU clamp, or without the sinks,
    transformers' own log-probs move (so the parity above checks them)."""
    prompt = prompts()[2]
    (ref,) = hf_logprobs(hf_model, [prompt])
    loose = copy.deepcopy(hf_model)
    for layer in loose.model.layers:
        layer.mlp.experts.limit = 1e9
    (unclamped,) = hf_logprobs(loose, [prompt])
    sinkless = copy.deepcopy(hf_model)
    for layer in sinkless.model.layers:
        layer.self_attn.sinks.data.fill_(-1e9)
    (no_sinks,) = hf_logprobs(sinkless, [prompt])
    assert (unclamped - ref).abs().max() > 1e-2 and (no_sinks - ref).abs().max() > 1e-2


def test_mixed_adapter_batch_matches_peft_and_the_merge(hf_model: Any, checkpoint: Path, tmp_path: Path):
    adapters = {n: peft_adapter(hf_model, tmp_path / n, seed) for n, seed in (("a", 1), ("b", 2))}
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=5)
    batch = [p for _ in range(3) for p in prompts()]
    names = [n for n in (None, "a", "b") for _ in prompts()]
    modules = {n: str(tmp_path / n) for n in adapters}
    with LLM(str(checkpoint), device="cpu", dtype="float32", progress=False, lora_modules=modules) as llm:
        outs = llm.generate(batch, params, lora=names)
    tol = logprob_tol("float32")
    for prompt, name, out in zip(batch, names, outs, strict=True):
        if name is None:
            (ref,) = hf_logprobs(hf_model, [prompt])
            assert_logprobs(out, ref, tol, "base")
            continue
        with torch.no_grad():  # in float64, as `hf_logprobs` runs the merge: no fp32 rounding in either
            peft64 = copy.deepcopy(adapters[name]).double()
            by_peft = peft64(torch.tensor([prompt])).logits[0].log_softmax(-1)
        reference = merged(hf_model, adapters[name])
        (by_merge,) = hf_logprobs(reference, [prompt])
        assert (by_merge - by_peft).abs().max() < 1e-6  # the two references agree
        assert (by_merge - hf_logprobs(hf_model, [prompt])[0]).abs().max() > 1  # and the adapter acts
        assert_logprobs(out, by_merge, tol, name)
        tokens, margins = hf_greedy(reference, prompt, NEW_TOKENS)
        agree_until_near_tie(out.outputs[0].token_ids, tokens, margins)


def test_per_expert_keys_are_refused_for_its_experts(hf_model: Any, checkpoint: Path, tmp_path: Path):
    """Its experts are read in PEFT's target_parameters form only: a per-expert-key adapter (the layout
    PEFT silently drops for GPT-OSS) is refused, naming the tensor and the fix."""
    import json

    from safetensors.torch import save_file

    from moelora.lora.adapter import AdapterError

    folder = tmp_path / "per-expert"
    folder.mkdir()
    pre = "base_model.model.model.layers.0.mlp.experts.0.gate_up_proj"
    save_file(
        {f"{pre}.lora_A.weight": torch.randn(4, 32), f"{pre}.lora_B.weight": torch.randn(64, 4)},
        str(folder / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["gate_up_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with (
        LLM(str(checkpoint), device="cpu", progress=False, enable_lora=True) as llm,
        pytest.raises(AdapterError, match=r"experts\.0\.gate_up_proj.*save the adapter with PEFT's target_p"),
    ):
        llm.load_lora("x", str(folder))


@pytest.mark.parametrize(("tp", "ep"), [(2, 1), (2, 2), (4, 4)])
def test_tp_ep_layouts_match_one_process(checkpoint: Path, hf_model: Any, tmp_path: Path, tp, ep, one_thread):
    """Heads (and their sinks) split over TP, 6 experts over EP (4: 2, 2, 1, 1), the experts'
    intermediate split over TP within an EP group at (2, 1) (the down bias added once), with an adapter."""
    peft_adapter(hf_model, tmp_path / "a", 1)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=3)
    batch = prompts() * 2
    names = [None] * 3 + ["a"] * 3
    outs = {}
    for layout in ((1, 1), (tp, ep)):
        with LLM(
            str(checkpoint), device="cpu", dtype="float64", progress=False, tp_size=layout[0],
            ep_size=layout[1], num_kv_blocks=64, lora_modules={"a": str(tmp_path / "a")},
        ) as llm:  # fmt: skip
            outs[layout] = llm.generate(batch, params, lora=names)
    for got, want in zip(outs[(tp, ep)], outs[(1, 1)], strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for g, w in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
            assert g.keys() == w.keys() and all(abs(g[t] - w[t]) < 1e-9 for t in g)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused expert tensor [E, in, out] in the published MXFP4 layout: blocks [E, out, in / 32, 16]
    uint8 (low nibble first), scales [E, out, in / 32] uint8 (biased exponents). Each block's scale is
    the power of two that brings its largest magnitude to at most 6; values round to the nearest FP4."""
    from moelora.loader.mxfp4 import FP4_VALUES

    t = w.transpose(1, 2).float()  # [E, out, in]
    groups = t.reshape(*t.shape[:-1], -1, 32)
    top = groups.abs().amax(-1).clamp(min=2.0**-100)
    exp = torch.ceil(torch.log2(top / 6.0)).clamp(-127, 127)  # [E, out, G]
    scaled = groups / torch.exp2(exp)[..., None]
    grid = torch.tensor(FP4_VALUES[:8])
    code = (scaled.abs()[..., None] - grid).abs().argmin(-1) + 8 * (scaled < 0)  # [E, out, G, 32]
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exp + 127).to(torch.uint8)


def test_mxfp4_checkpoint_loads_as_its_dequantised_twin(hf_model: Any, tmp_path: Path):
    """A tiny MXFP4 checkpoint in the published layout (experts as blocks and scales, the rest bf16 as
    published) gives exactly what the same model with the experts dequantised by transformers' own
    MXFP4 code gives (stored unquantised): the dequantisation is exact. Malformed pairs are refused."""
    import json

    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    packed, twin = dict(state), dict(state)
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = quantize_mxfp4(state[key])
        del packed[key]
        packed[key + "_blocks"], packed[key + "_scales"] = blocks, scales
        twin[key] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        assert twin[key].shape == state[key].shape
    config = hf_model.config.to_dict()
    folders = {}
    for name, tensors, extra in (
        ("mxfp4", packed, {"quantization_config": {"quant_method": "mxfp4"}}),
        ("twin", twin, {}),
    ):
        folder = folders[name] = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config | extra))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=5)
    outs = {}
    for name, folder in folders.items():
        with LLM(str(folder), device="cpu", dtype="float32", progress=False, num_kv_blocks=64) as llm:
            outs[name] = llm.generate(prompts(), params)
    for a, b in zip(outs["mxfp4"], outs["twin"], strict=True):
        assert a.prompt_logprobs == b.prompt_logprobs and a.outputs[0].token_ids == b.outputs[0].token_ids
    # a scales tensor without its blocks: refused by name
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(
        json.dumps(config | {"quantization_config": {"quant_method": "mxfp4"}})
    )
    lone = {k: v for k, v in packed.items() if k != "model.layers.1.mlp.experts.down_proj_blocks"}
    save_file({k: v.contiguous() for k, v in lone.items()}, str(broken / "model.safetensors"))
    with pytest.raises(Exception, match=r"layers\.1\.mlp\.experts\.down_proj_scales"):
        LLM(str(broken), device="cpu", progress=False)


def test_adapter_inspect_and_convert(hf_model: Any, checkpoint: Path, tmp_path: Path):
    """`adapter inspect` reads a GPT-OSS adapter in its own form and finds it fits; `convert` refuses:
    the model has no per-expert modules to convert to."""
    from moelora.loader.model_loader import read_model_config
    from moelora.lora.adapter import AdapterError
    from moelora.lora.inspect import convert_adapter, inspect_adapter

    peft_adapter(hf_model, tmp_path / "a", 3)
    cfg, family = read_model_config(checkpoint)
    report = inspect_adapter(tmp_path / "a", ("gpt-oss", cfg, family))
    assert report.fits and report.formats == {"peft-linear": 16, "peft-fused": 8}, report
    with pytest.raises(AdapterError, match="no per-expert modules"):
        convert_adapter(tmp_path / "a", tmp_path / "out", ("gpt-oss", cfg, family))


def test_unsloth_expert_keys_serve_the_same_adapter(hf_model: Any, checkpoint: Path, tmp_path: Path):
    """Unsloth trains GPT-OSS's experts as one linear layer each (`experts.gate_up_projs.{e}`: weight
    [2I, H] with gate and up rows interleaved; `experts.down_projs.{e}`). The same adapter written in that
    form serves what its PEFT target_parameters form serves (and the hand merge)."""
    import json

    from safetensors.torch import load_file, save_file

    peft_model = peft_adapter(hf_model, tmp_path / "peft", 4)
    fused = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    n, out = 6, {}
    for key, value in fused.items():
        if ".mlp.experts." not in key:
            out[key] = value
            continue
        if not key.endswith("lora_A.weight"):
            continue
        pre = key.removesuffix("lora_A.weight")
        a, b = value, fused[pre + "lora_B.weight"]
        r = a.shape[0] // n
        layer = pre.removesuffix("base_layer.").removesuffix("experts.")
        name = "gate_up_projs" if pre.endswith("base_layer.") else "down_projs"
        for e in range(n):
            out[f"{layer}experts.{name}.{e}.lora_A.weight"] = a[e * r : (e + 1) * r].contiguous()
            out[f"{layer}experts.{name}.{e}.lora_B.weight"] = b[:, e::n].contiguous()
    folder = tmp_path / "unsloth"
    folder.mkdir()
    save_file(out, str(folder / "adapter_model.safetensors"))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_projs", "down_projs"]
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=5)
    modules = {"u": str(folder), "p": str(tmp_path / "peft")}
    with LLM(str(checkpoint), device="cpu", dtype="float32", progress=False, lora_modules=modules) as llm:
        by_unsloth = llm.generate(prompts(), params, lora="u")
        by_peft = llm.generate(prompts(), params, lora="p")
    reference = merged(hf_model, peft_model)
    for prompt, u, p in zip(prompts(), by_unsloth, by_peft, strict=True):
        (ref,) = hf_logprobs(reference, [prompt])
        assert_logprobs(u, ref, logprob_tol("float32"), "unsloth")
        assert u.outputs[0].token_ids == p.outputs[0].token_ids


@pytest.mark.gpu
def test_mixed_adapter_batch_on_cuda(hf_model: Any, checkpoint: Path, tmp_path: Path):
    """The same mixed batch on the GPU in fp32 with the Triton kernels forced (the sinks in the attention
    kernels, the experts' biases and clamped SwiGLU in the MoE kernels), against the hand merge."""
    adapter = peft_adapter(hf_model, tmp_path / "a", 1)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=5)
    batch, names = prompts() * 2, [None] * 3 + ["a"] * 3
    with LLM(
        str(checkpoint), device="cuda", dtype="float32", progress=False, kernel_backend="triton",
        lora_modules={"a": str(tmp_path / "a")},
    ) as llm:  # fmt: skip
        outs = llm.generate(batch, params, lora=names)
    references = {None: hf_model, "a": merged(hf_model, adapter)}
    for prompt, name, out in zip(batch, names, outs, strict=True):
        (ref,) = hf_logprobs(references[name], [prompt])
        assert_logprobs(out, ref, logprob_tol("float32"), f"cuda {name}")
        tokens, margins = hf_greedy(references[name], prompt, NEW_TOKENS)
        agree_until_near_tie(out.outputs[0].token_ids, tokens, margins)


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager(hf_model: Any, checkpoint: Path, tmp_path: Path):
    """bf16 on the GPU: decode steps replayed from CUDA graphs (the sinks, the window, the biased experts
    and their LoRA in the Triton kernels) give the eager steps' tokens, base and adapter rows mixed."""
    peft_adapter(hf_model, tmp_path / "a", 2)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    batch, names = prompts() * 2, [None] * 3 + ["a"] * 3
    outs = {}
    for graphs in (False, True):
        with LLM(
            str(checkpoint), device="cuda", dtype="bfloat16", progress=False, cuda_graphs=graphs,
            lora_modules={"a": str(tmp_path / "a")},
        ) as llm:  # fmt: skip
            outs[graphs] = llm.generate(batch, params, lora=names)
            runner_graphs = llm.engine.executor.runner.graphs
            assert (runner_graphs is not None and runner_graphs.replays > 5) == graphs
    for eager, graphed in zip(outs[False], outs[True], strict=True):
        assert eager.outputs[0].token_ids == graphed.outputs[0].token_ids
        for x, y in zip(eager.outputs[0].logprobs, graphed.outputs[0].logprobs, strict=True):
            for tok in set(x) & set(y):
                assert abs(x[tok] - y[tok]) < 0.05


def test_norms_round_as_transformers():
    """GPT-OSS's RMSNorm applies its weight to the fp32 row before the one cast, Qwen3-MoE's (like most)
    after it: the twin gives each of transformers' norms bit for bit in bf16, and the two orders differ."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    from moelora.ops.torch.norm import rms_norm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(32, 64, generator=g) * 3).to(torch.bfloat16)
    w = (torch.randn(64, generator=g) * 0.3 + 1).to(torch.bfloat16)
    for cls, first in ((GptOssRMSNorm, True), (Qwen3MoeRMSNorm, False)):
        norm = cls(64, eps=1e-5).to(torch.bfloat16)
        norm.weight.data.copy_(w)
        with torch.no_grad():
            assert torch.equal(rms_norm(x, w, 1e-5, weight_first=first), norm(x)), cls.__name__
    assert not torch.equal(rms_norm(x, w, 1e-5, weight_first=True), rms_norm(x, w, 1e-5))
