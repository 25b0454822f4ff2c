"""Tiny random models of each supported family, built with Hugging Face transformers (the reference).

Weights are random, with the LM head and routers scaled so that logits and expert choices have clear
margins: rounding differences then cannot flip a greedy token or an expert choice.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

VOCAB = 160

COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
}


def family_configs() -> dict[str, Any]:
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        Glm4MoeConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    return {
        # Dense layer 1 via mlp_only_layers; linear RoPE scaling from rope_parameters; untied head.
        "qwen3_moe": Qwen3MoeConfig(
            **COMMON,
            head_dim=16,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            norm_topk_prob=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            tie_word_embeddings=False,
        ),
        # Only layer 1 is sparse (decoder_sparse_step=2); shared expert; no top-k renormalisation.
        "qwen2_moe": Qwen2MoeConfig(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=2,
            decoder_sparse_step=2,
            norm_topk_prob=False,
            tie_word_embeddings=False,
        ),
        # Tied embeddings, fp32 routing weights, experts w1/w3/w2.
        "mixtral": MixtralConfig(
            **COMMON,
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=True,
        ),
        # q/k norm over the whole projection, clip_qkv.
        "olmoe": OlmoeConfig(
            **COMMON,
            intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=3,
            clip_qkv=1.5,
            norm_topk_prob=False,
            tie_word_embeddings=False,
        ),
        # Layer 0 dense; sigmoid routing with a correction bias in 2 groups of 4 (1 chosen), scaled
        # weights; an ungated shared expert; half the head rotated; q/k/v bias and per-head q/k norm.
        "glm4_moe": Glm4MoeConfig(
            **COMMON,
            head_dim=16,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.8,
            norm_topk_prob=True,
            attention_bias=True,
            use_qk_norm=True,
            partial_rotary_factor=0.5,
            tie_word_embeddings=False,
        ),
        # Latent attention (q through a rank-24 pair, a rank-16 latent, rotary on 8 interleaved dims,
        # v heads of 12), YaRN with mscale; layer 0 dense; grouped sigmoid routing; a shared expert.
        "deepseek_v3": DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4},
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=12,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
            tie_word_embeddings=False,
        ),
        # V2-Lite's shape: a plain q_proj; softmax routing within the best of 2 groups, scaled.
        "deepseek_v2": DeepseekV2Config(
            **{**COMMON, "num_key_value_heads": 4},
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=12,
            tie_word_embeddings=False,
        ),
    }


FAMILIES = tuple(family_configs())


def gpt_oss_config() -> Any:
    """A tiny GPT-OSS: 4 layers alternating sliding (window 4) and full attention, YaRN rotary, a small
    SwiGLU limit so that the clamps act on random weights. (Not in FAMILIES: its experts exist only in
    the fused in-major form, which the per-expert tests of the other families do not cover.)"""
    from transformers import GptOssConfig

    common = {k: v for k, v in COMMON.items() if k != "num_hidden_layers"}
    return GptOssConfig(
        **common,
        num_hidden_layers=4,
        head_dim=16,
        intermediate_size=32,  # 2I = 64 != H: a transposed gate_up cannot pass; MXFP4 blocks of 32 fit
        num_local_experts=6,  # over ep=4: 2, 2, 1, 1
        num_experts_per_tok=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        swiglu_limit=0.6,
        rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0,
        },
        tie_word_embeddings=False,
    )  # fmt: skip


def _hybrid(linear_first: bool) -> dict[str, Any]:
    """The tiny hybrid layout of Qwen3-Next and Qwen3.5-MoE: four layers, one gated full-attention layer
    (partial rotary, q/k norms) among linear-attention ones whose 2 key heads serve 4 value heads, 4
    experts top-2 and a gated shared expert."""
    full = 2 if linear_first else 1
    return {
        **{k: v for k, v in COMMON.items() if k != "num_hidden_layers"},
        "num_hidden_layers": 4,
        "layer_types": ["full_attention" if i == full else "linear_attention" for i in range(4)],
        "head_dim": 16,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "linear_conv_kernel_dim": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "tie_word_embeddings": False,
    }


def qwen3_next_config() -> Any:
    """A tiny Qwen3-Next (`_hybrid`, the full-attention layer third), layer 1 dense. (Not in FAMILIES: its
    linear layers need their own tests.)"""
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(**_hybrid(True), intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=True)


def qwen3_5_moe_config() -> Any:
    """A tiny Qwen3.5-MoE text model (`_hybrid`, the full-attention layer second): every layer MoE, the
    linear layers' projections stored apart."""
    from transformers import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(**_hybrid(False))


def build_hf_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A random fp32 transformers model of `family`, with eager attention and experts; `overrides`: config
    fields to change (e.g. num_attention_heads)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    special = {"gpt_oss": gpt_oss_config, "qwen3_next": qwen3_next_config, "qwen3_5_moe": qwen3_5_moe_config}
    cfg = special[family]() if family in special else family_configs()[family]
    for key, value in overrides.items():
        setattr(cfg, key, value)
    model = AutoModelForCausalLM.from_config(
        cfg, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)  # not all ones, so a wrong norm shows
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.2)
            if name.endswith(("mlp.gate.weight", "router.weight")) or ".gate.weight" in name:
                # Router margins; sigmoid scores saturate (and tie) past logits of about 15, so less there.
                p.mul_(2.0 if family in ("glm4_moe", "deepseek_v3") else 6.0)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zeros in a new model: random, so it counts
                buf.normal_(0, 0.1)
        model.lm_head.weight.mul_(2.0 if cfg.tie_word_embeddings else 8.0)
    if family == "gpt_oss":
        # transformers before 5.18 hard-codes GPT-OSS's published alpha 1.702 and limit 7.0 in the
        # experts and ignores the config's; later versions read the config. Give every version the
        # config's values, which is what the checkpoint says.
        for layer in model.model.layers:
            layer.mlp.experts.alpha = getattr(cfg, "swiglu_alpha", 1.702)  # (5.17: no such field)
            layer.mlp.experts.limit = cfg.swiglu_limit
    return model.eval()


def save_per_expert(model: Any, folder: Path, **kwargs: Any) -> Path:
    """The checkpoint as transformers saves it: per-expert keys (kwargs: e.g. max_shard_size)."""
    model.save_pretrained(folder, **kwargs)
    return folder


def save_fused(model: Any, folder: Path) -> Path:
    """The same weights with fused 3-D expert keys (`experts.gate_up_proj`, `experts.down_proj`)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    assert any(k.endswith("experts.gate_up_proj") for k in state), "transformers no longer fuses experts"
    save_file(state, str(folder / "model.safetensors"))
    return folder


# How far moelora's log-probs may be from the float64 reference, by the dtype moelora computes in.
# fp32: rounding (eps 1.2e-7) of logits of magnitude ~40 (the test models are scaled for clear top-1
# margins), accumulated over sums of length ~64 across a few layers: 1.2e-7 x 40 x 64 = 3e-4. Seen:
# 1.1-1.24e-4 between torch/transformers releases on CPU, up to ~3e-4 with the GPU's summation order.
# float64: transformers keeps its norms, rotary angles and router softmax in fp32 even then, so 1e-4.
LOGPROB_TOL = {torch.float32: 3e-4, torch.float64: 1e-4}


def logprob_tol(dtype: torch.dtype | str) -> float:
    return LOGPROB_TOL[getattr(torch, dtype) if isinstance(dtype, str) else dtype]


_FP64: dict[int, tuple[Any, Any]] = {}


def float64(model: Any) -> Any:
    """A float64 copy of a reference model (cached while the model lives), so the reference itself
    carries no fp32 rounding whatever the torch and transformers versions."""
    if next(model.parameters()).dtype == torch.float64:
        return model
    cached = _FP64.get(id(model))
    if cached is None or cached[0] is not model:
        cached = (model, copy.deepcopy(model).to(torch.float64))
        _FP64[id(model)] = cached
    return cached[1]


@torch.no_grad()
def assert_logprobs(out: Any, ref: torch.Tensor, tol: float, where: str) -> None:
    """Every prompt log-prob moelora returned (`out`, a RequestOutput) within `tol` of the reference's
    log-softmax rows `ref` (row i - 1 for position i)."""
    assert out.prompt_logprobs is not None
    for i, entry in enumerate(out.prompt_logprobs[1:], 1):
        for tok, lp in entry.items():
            assert abs(lp - ref[i - 1, tok].item()) < tol, (where, i, tok, lp, ref[i - 1, tok].item())


def hf_logprobs(model: Any, seqs: list[list[int]]) -> list[torch.Tensor]:
    """log-softmax of the reference model's logits in float64, one sequence at a time (no padding)."""
    ref = float64(model)
    return [ref(torch.tensor([s])).logits[0].log_softmax(-1) for s in seqs]


def assert_mixed_batch(
    folder: Path, adapter: Path, references: dict[str | None, Any], prompts: list[list[int]], where: str,
    **llm_args: Any,
) -> None:  # fmt: skip
    """Each prompt on the base model and on `adapter` (named "r8" in `references`) in one batch on CPU in
    fp32 (`llm_args`: more LLM arguments): every prompt log-prob within fp32's tolerance of the
    reference's (`references[None]` for the base, `references["r8"]` the merged model)."""
    from moelora import LLM, SamplingParams

    names: list[str | None] = [name for _ in prompts for name in (None, "r8")]
    batch = [prompt for prompt in prompts for _ in (None, "r8")]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=3)
    opts: dict[str, Any] = dict(device="cpu", dtype="float32", progress=False, num_kv_blocks=32)
    with LLM(str(folder), lora_modules={"r8": str(adapter)}, **opts, **llm_args) as llm:
        outs = llm.generate(batch, params, lora=names)
    for name, prompt, out in zip(names, batch, outs, strict=True):
        (ref,) = hf_logprobs(references[name], [prompt])
        assert_logprobs(out, ref, logprob_tol(torch.float32), f"{where}/{name or 'base'}")
