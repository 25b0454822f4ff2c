"""GPT-OSS (`GptOssForCausalLM`): attention sinks, sliding and full attention layers alternating, q/k/v/o
with biases, YaRN rotary, a biased router (top-k of its logits, softmax over the k chosen), experts with
biases and the clamped SwiGLU, stored fused and in-major (`gate_up_proj [E, H, 2I]`, gate and up
interleaved; `down_proj [E, I, H]`). The sinks run in the attention kernels; the experts' biases and
activation run PyTorch ops on every device for now (no CUDA graphs)."""

from __future__ import annotations

from typing import Any

from moelora.models.config import ModelConfig
from moelora.models.family import Family, common_fields


def read_config(hf: Any, raw: dict[str, Any]) -> ModelConfig:
    inter = hf.intermediate_size
    return ModelConfig(
        **common_fields(hf, raw),
        qkv_bias=bool(hf.attention_bias),
        o_bias=bool(hf.attention_bias),
        qk_norm="none",
        clip_qkv=None,
        moe_layers=(True,) * hf.num_hidden_layers,
        moe_intermediate_size=inter,
        dense_intermediate_size=inter,
        shared_expert_intermediate_size=0,
        norm_topk_prob=True,  # softmax over the k chosen logits = the full softmax's top k renormalised
        router_fp32_weights=False,
        attention_sinks=True,
        norm_weight_first=True,
        router_bias=True,
        expert_bias=True,
        swiglu_limit=float(hf.swiglu_limit),
        swiglu_alpha=float(getattr(hf, "swiglu_alpha", 1.702)),
    )


FAMILY = Family("gpt_oss", ("GptOssForCausalLM",), read_config, router_name="router", experts_in_major=True)
