"""Qwen3-Next: Gated DeltaNet linear-attention layers between gated full-attention layers (q_proj also
gives each head an output gate; partial rotary; q/k norms), every RMSNorm scaling by 1 + weight, routed
experts plus a sigmoid-gated shared expert."""

from __future__ import annotations

from typing import Any

from moelora.models.config import LinearAttention, ModelConfig, sparse_layers
from moelora.models.family import Family, common_fields


def read_config(hf: Any, raw: dict[str, Any]) -> ModelConfig:
    return hybrid_config(hf, raw, fused_projections=True)


def hybrid_config(hf: Any, raw: dict[str, Any], fused_projections: bool) -> ModelConfig:
    """Qwen3-Next's and Qwen3.5-MoE's config (their text model's, `hf`)."""
    kinds = tuple(getattr(hf, "layer_types", None) or ())
    if len(kinds) != hf.num_hidden_layers or not set(kinds) <= {"linear_attention", "full_attention"}:
        raise ValueError(
            f"layer_types {list(kinds)}: need one of linear_attention / full_attention per layer "
            f"({hf.num_hidden_layers} layers)"
        )
    linear = LinearAttention(
        layers=tuple(kind == "linear_attention" for kind in kinds),
        num_k_heads=hf.linear_num_key_heads,
        num_v_heads=hf.linear_num_value_heads,
        head_k_dim=hf.linear_key_head_dim,
        head_v_dim=hf.linear_value_head_dim,
        conv_kernel=hf.linear_conv_kernel_dim,
        fused_projections=fused_projections,
    )
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        **common_fields(hf, raw),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",
        clip_qkv=None,
        moe_layers=sparse_layers(hf),
        moe_intermediate_size=hf.moe_intermediate_size,
        dense_intermediate_size=getattr(hf, "intermediate_size", None) or 0,  # (Qwen3.5-MoE: none)
        shared_expert_intermediate_size=hf.shared_expert_intermediate_size,
        norm_topk_prob=bool(getattr(hf, "norm_topk_prob", True)),
        router_fp32_weights=False,
        norm_zero_centered=True,
        attn_output_gate=True,
        linear=linear,
    )


FAMILY = Family("qwen3_next", ("Qwen3NextForCausalLM",), read_config, ignored_prefixes=("mtp.",))
