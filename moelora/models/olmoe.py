"""OLMoE: q and k RMSNorm over the whole projection (all heads at once), optional clip_qkv."""

from __future__ import annotations

from typing import Any

from moelora.models.config import ModelConfig
from moelora.models.family import Family, common_fields


def read_config(hf: Any, raw: dict[str, Any]) -> ModelConfig:
    attention_bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        **common_fields(hf, raw),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm="full",
        clip_qkv=getattr(hf, "clip_qkv", None),
        moe_layers=(True,) * hf.num_hidden_layers,
        moe_intermediate_size=hf.intermediate_size,
        dense_intermediate_size=0,
        shared_expert_intermediate_size=0,
        norm_topk_prob=bool(hf.norm_topk_prob),
        router_fp32_weights=False,
    )


FAMILY = Family("olmoe", ("OlmoeForCausalLM",), read_config)
