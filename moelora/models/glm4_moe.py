"""GLM-4.5 / GLM-4.6 (`Glm4MoeForCausalLM`): partial rotary, q/k/v bias, an optional per-head q/k norm,
the first `first_k_dense_replace` layers dense, routed experts chosen by sigmoid scores plus a
correction bias in groups (DeepSeek-V3's rule), and ungated shared experts (`mlp.shared_experts`).
The checkpoints' multi-token-prediction layers (`model.layers.{num_hidden_layers}...`) are not served."""

from __future__ import annotations

from typing import Any

from moelora.models.config import ModelConfig
from moelora.models.family import Family, common_fields, deepseek_moe_fields


def read_config(hf: Any, raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        **common_fields(hf, raw),
        **deepseek_moe_fields(hf),
        qkv_bias=bool(getattr(hf, "attention_bias", False)),
        o_bias=False,
        qk_norm="head" if getattr(hf, "use_qk_norm", False) else "none",
        clip_qkv=None,
    )


FAMILY = Family("glm4_moe", ("Glm4MoeForCausalLM",), read_config, shared_expert_name="shared_experts")
