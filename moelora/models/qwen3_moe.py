"""Qwen3-MoE: per-head q/k RMSNorm; dense layers from `mlp_only_layers` / `decoder_sparse_step`."""

from __future__ import annotations

from typing import Any

from moelora.models.config import ModelConfig, sparse_layers
from moelora.models.family import Family, common_fields


def read_config(hf: Any, raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        **common_fields(hf, raw),
        qkv_bias=bool(hf.attention_bias),
        o_bias=bool(hf.attention_bias),
        qk_norm="head",
        clip_qkv=None,
        moe_layers=sparse_layers(hf),
        moe_intermediate_size=hf.moe_intermediate_size,
        dense_intermediate_size=hf.intermediate_size,
        shared_expert_intermediate_size=0,
        norm_topk_prob=bool(hf.norm_topk_prob),
        router_fp32_weights=False,
    )


FAMILY = Family("qwen3_moe", ("Qwen3MoeForCausalLM",), read_config)
