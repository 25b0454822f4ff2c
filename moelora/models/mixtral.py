"""Mixtral: `block_sparse_moe` with experts w1 (gate), w3 (up), w2 (down); top-k always renormalised,
routing weights kept in fp32."""

from __future__ import annotations

from typing import Any

from moelora.layers.moe import ExpertNames
from moelora.models.config import ModelConfig
from moelora.models.family import Family, common_fields


def read_config(hf: Any, raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        **common_fields(hf, raw),
        qkv_bias=False,
        o_bias=False,
        qk_norm="none",
        clip_qkv=None,
        moe_layers=(True,) * hf.num_hidden_layers,
        moe_intermediate_size=hf.intermediate_size,
        dense_intermediate_size=0,
        shared_expert_intermediate_size=0,
        norm_topk_prob=True,
        router_fp32_weights=True,
    )


# transformers 5 calls the block `mlp` in memory, so fused-key checkpoints saved from it use that name.
FAMILY = Family(
    "mixtral",
    ("MixtralForCausalLM",),
    read_config,
    moe_prefixes=("block_sparse_moe", "mlp"),
    expert_names=ExpertNames("w1", "w3", "w2"),
)
