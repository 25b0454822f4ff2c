"""GLM-4.5 / GLM-4.6 (`Glm4MoeForCausalLM`): partial rotary, q/k/v bias, an optional per-head q/k norm,
the first `first_k_dense_replace` layers dense, routed experts chosen by sigmoid scores plus a
correction bias in groups (DeepSeek-V3's rule), and ungated shared experts (`mlp.shared_experts`).
The checkpoints' multi-token-prediction layers (`model.layers.{num_hidden_layers}...`) are not served."""

from __future__ import annotations

from typing import Any

from moelora.models.config import ModelConfig
from moelora.models.family import Family, common_fields, mtp_layers


def read_config(hf: Any, raw: dict[str, Any]) -> ModelConfig:
    first_dense = int(getattr(hf, "first_k_dense_replace", 0) or 0)
    experts = int(hf.n_routed_experts)
    groups = int(getattr(hf, "n_group", 1) or 1)
    if experts % groups:
        raise ValueError(f"n_group {groups} does not divide the {experts} routed experts")
    shared = hf.moe_intermediate_size * int(getattr(hf, "n_shared_experts", 0) or 0)
    return ModelConfig(
        **common_fields(hf, raw),
        qkv_bias=bool(getattr(hf, "attention_bias", False)),
        o_bias=False,
        qk_norm="head" if getattr(hf, "use_qk_norm", False) else "none",
        clip_qkv=None,
        moe_layers=tuple(i >= first_dense for i in range(hf.num_hidden_layers)),
        moe_intermediate_size=hf.moe_intermediate_size,
        dense_intermediate_size=hf.intermediate_size,
        shared_expert_intermediate_size=shared,
        norm_topk_prob=bool(hf.norm_topk_prob),
        router_fp32_weights=True,
        routing="sigmoid_grouped",
        expert_groups=groups,
        topk_groups=int(getattr(hf, "topk_group", 1) or 1),
        routed_scaling_factor=float(getattr(hf, "routed_scaling_factor", 1.0)),
        shared_expert_gated=False,
        unserved_layers=mtp_layers(hf),
    )


FAMILY = Family("glm4_moe", ("Glm4MoeForCausalLM",), read_config, shared_expert_name="shared_experts")
