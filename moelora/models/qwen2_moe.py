"""Qwen2-MoE: q/k/v bias, and a shared expert gated by sigmoid(shared_expert_gate(x))."""

from __future__ import annotations

from typing import Any

from moelora.models.config import ModelConfig, sparse_layers
from moelora.models.family import Family, common_fields


def read_config(hf: Any, raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        **common_fields(hf, raw),
        qkv_bias=bool(getattr(hf, "qkv_bias", True)),
        o_bias=False,
        qk_norm="none",
        clip_qkv=None,
        moe_layers=sparse_layers(hf),
        moe_intermediate_size=hf.moe_intermediate_size,
        dense_intermediate_size=hf.intermediate_size,
        shared_expert_intermediate_size=hf.shared_expert_intermediate_size,
        norm_topk_prob=bool(hf.norm_topk_prob),
        router_fp32_weights=False,
    )


FAMILY = Family("qwen2_moe", ("Qwen2MoeForCausalLM",), read_config)
