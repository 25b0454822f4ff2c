"""DeepSeek-V3 (`DeepseekV3ForCausalLM`; also Kimi-K2 and Moonlight, which use the class): multi-head latent
attention (`models/mla.py`), the first `first_k_dense_replace` layers dense, routed experts chosen by
sigmoid scores plus a correction bias within the best groups, ungated shared experts
(`mlp.shared_experts`). The checkpoints' multi-token-prediction layers are not served."""

from __future__ import annotations

import math
from typing import Any

from moelora.models.config import Mla, ModelConfig
from moelora.models.family import Family, common_fields, deepseek_moe_fields


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0


def read_config(hf: Any, raw: dict[str, Any]) -> ModelConfig:
    scoring, method = getattr(hf, "scoring_func", "sigmoid"), getattr(hf, "topk_method", "noaux_tc")
    if scoring != "sigmoid" or method not in ("noaux_tc", None):
        raise ValueError(
            f"DeepseekV3ForCausalLM with scoring_func '{scoring}' and topk_method '{method}': moelora serves "
            f"DeepSeek-V3's routing (sigmoid, noaux_tc), as transformers does for this class"
        )
    return ModelConfig(**mla_fields(hf, raw, interleave=bool(getattr(hf, "rope_interleave", True))))


def mla_fields(hf: Any, raw: dict[str, Any], interleave: bool) -> dict[str, Any]:
    """The ModelConfig fields of a DeepSeek model (V2 or V3): latent attention and the MoE layers (V3's
    grouped sigmoid routing; V2 replaces it)."""
    qk_head_dim = hf.qk_nope_head_dim + hf.qk_rope_head_dim
    scale = qk_head_dim**-0.5
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default" and rope.get("mscale_all_dim"):
        scale *= _yarn_mscale(float(rope["factor"]), float(rope["mscale_all_dim"])) ** 2
    mla = Mla(
        q_lora_rank=getattr(hf, "q_lora_rank", None),
        kv_lora_rank=hf.kv_lora_rank,
        qk_nope_head_dim=hf.qk_nope_head_dim,
        qk_rope_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim,
        rope_interleave=interleave,
        softmax_scale=scale,
    )
    return {
        **common_fields(hf, raw),
        "head_dim": qk_head_dim,
        "num_kv_heads": hf.num_attention_heads,
        **deepseek_moe_fields(hf),
        "qkv_bias": bool(getattr(hf, "attention_bias", False)),
        "o_bias": bool(getattr(hf, "attention_bias", False)),
        "qk_norm": "none",
        "clip_qkv": None,
        "mla": mla,
    }


FAMILY = Family("deepseek_v3", ("DeepseekV3ForCausalLM",), read_config, shared_expert_name="shared_experts")
