"""What distinguishes one model family: how its config is read and how its checkpoint names things."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moelora.layers.moe import ExpertNames
from moelora.models.config import ModelConfig, checkpoint_dtype, eos_ids, num_experts_of, rope_from_hf


@dataclass(frozen=True)
class Family:
    """A registry entry: HF architecture names, the config reader, and checkpoint naming."""

    name: str
    architectures: tuple[str, ...]
    read_config: Callable[[Any, dict[str, Any]], ModelConfig]
    moe_prefixes: tuple[str, ...] = ("mlp",)  # checkpoint name of the MoE block, first one preferred
    expert_names: ExpertNames = field(default_factory=ExpertNames)
    shared_expert_name: str = "shared_expert"  # the MoE block's shared expert (GLM: shared_experts)
    router_name: str = "gate"  # the MoE block's router (GPT-OSS: router)
    # GPT-OSS's fused experts: gate_up_proj [E, H, 2I] with gate and up interleaved, down_proj [E, I, H]
    # (in-major), and their biases; otherwise [E, 2I, H] (gate rows, then up rows) and [E, H, I].
    experts_in_major: bool = False
    text_prefix: str = "model"  # the checkpoint's text model (a multimodal one's: model.language_model)
    ignored_prefixes: tuple[str, ...] = ()  # checkpoint parts not served (a vision tower, MTP layers)


def common_fields(hf: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """The config fields every supported family reads the same way."""
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act '{hf.hidden_act}' is not supported (only silu)")
    inv_freq, scaling = rope_from_hf(hf)
    return {
        "architecture": raw["architectures"][0],
        "vocab_size": hf.vocab_size,
        "hidden_size": hf.hidden_size,
        "num_layers": hf.num_hidden_layers,
        "num_heads": hf.num_attention_heads,
        "num_kv_heads": getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        "rms_norm_eps": hf.rms_norm_eps,
        "rope_inv_freq": inv_freq,
        "rope_attention_scaling": scaling,
        "max_position_embeddings": hf.max_position_embeddings,
        "tie_word_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
        "sliding_windows": sliding_windows(hf),
        "num_experts": num_experts_of(hf),
        "top_k": hf.num_experts_per_tok,
        "dtype": checkpoint_dtype(raw),
        "eos_token_ids": eos_ids(hf),
    }


def sliding_windows(hf: Any) -> tuple[int | None, ...]:
    """Per-layer window: from `layer_types` where the config has them, else one window (or none) for all."""
    window = getattr(hf, "sliding_window", None) or None
    types = getattr(hf, "layer_types", None)
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * hf.num_hidden_layers


def mtp_layers(hf: Any) -> int:
    """Multi-token-prediction layers the checkpoint holds after the last layer (not served): transformers
    5 says num_mtp_layers, the published configs num_nextn_predict_layers."""
    for name in ("num_mtp_layers", "num_nextn_predict_layers"):
        value = getattr(hf, name, None)
        if value is not None:
            return int(value)
    return 0


def deepseek_moe_fields(hf: Any) -> dict[str, Any]:
    """The MoE fields DeepSeek-V3 and GLM-4.5 read the same way: dense layers below first_k_dense_replace,
    grouped sigmoid routing with its scaling, n_shared_experts ungated shared experts, MTP layers."""
    first_dense = int(getattr(hf, "first_k_dense_replace", 0) or 0)
    return {
        "moe_layers": tuple(i >= first_dense for i in range(hf.num_hidden_layers)),
        "moe_intermediate_size": hf.moe_intermediate_size,
        "dense_intermediate_size": hf.intermediate_size,
        "shared_expert_intermediate_size": hf.moe_intermediate_size
        * int(getattr(hf, "n_shared_experts", 0) or 0),
        "norm_topk_prob": bool(hf.norm_topk_prob),
        "router_fp32_weights": True,
        "routing": "sigmoid_grouped",
        "expert_groups": int(getattr(hf, "n_group", 1) or 1),
        "topk_groups": int(getattr(hf, "topk_group", 1) or 1),
        "routed_scaling_factor": float(getattr(hf, "routed_scaling_factor", 1.0)),
        "shared_expert_gated": False,
        "unserved_layers": mtp_layers(hf),
    }
