"""DeepSeek-V2 and V2-Lite (`DeepseekV2ForCausalLM`): DeepSeek-V3's latent attention (`models/mla.py`; its
rotary on interleaved pairs; V2-Lite has a plain q_proj), the first `first_k_dense_replace` layers dense,
ungated shared experts, and its own routing as transformers computes it: softmax scores, top-k
("greedy") or top-k within the best groups by their largest score ("group_limited_greedy"), the chosen
scores times routed_scaling_factor (never renormalised: transformers' DeepseekV2 ignores norm_topk_prob)."""

from __future__ import annotations

from typing import Any

from moelora.models.config import ModelConfig
from moelora.models.deepseek_v3 import mla_fields
from moelora.models.family import Family

_METHODS = ("greedy", "group_limited_greedy")


def read_config(hf: Any, raw: dict[str, Any]) -> ModelConfig:
    method = getattr(hf, "topk_method", "greedy") or "greedy"
    if method not in _METHODS:
        raise ValueError(
            f"DeepseekV2ForCausalLM topk_method '{method}': moelora serves {', '.join(_METHODS)}"
        )
    fields = mla_fields(hf, raw, interleave=True)
    grouped = method == "group_limited_greedy"
    fields |= {
        "routing": "softmax_grouped",
        "expert_groups": int(getattr(hf, "n_group", 1) or 1) if grouped else 1,
        "topk_groups": int(getattr(hf, "topk_group", 1) or 1) if grouped else 1,
        "norm_topk_prob": False,
    }
    return ModelConfig(**fields)


FAMILY = Family("deepseek_v2", ("DeepseekV2ForCausalLM",), read_config, shared_expert_name="shared_experts")
