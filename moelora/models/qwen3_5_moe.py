"""Qwen3.5-MoE: Qwen3-Next's hybrid layers (Gated DeltaNet linear attention, gated full attention,
zero-centred norms, experts with a gated shared expert) with the linear layers' projections stored apart
(in_proj_qkv, in_proj_z, in_proj_b, in_proj_a). Served from a text-only checkpoint, or from the published
multimodal one, whose text model sits under `model.language_model` and whose vision tower is not read (the
prompts are text, so the multimodal rotary's three position streams coincide: plain partial rotary)."""

from __future__ import annotations

from typing import Any

from moelora.models.config import ModelConfig
from moelora.models.family import Family
from moelora.models.qwen3_next import hybrid_config


def read_config(hf: Any, raw: dict[str, Any]) -> ModelConfig:
    text = getattr(hf, "text_config", None) or hf
    # the dtype may be declared in the text config only
    merged = {**(raw.get("text_config") or {}), **{k: v for k, v in raw.items() if k != "text_config"}}
    return hybrid_config(text, merged, fused_projections=False)


FAMILY = Family("qwen3_5_moe", ("Qwen3_5MoeForCausalLM",), read_config, ignored_prefixes=("mtp.",))
MULTIMODAL = Family(
    "qwen3_5_moe_vl",
    ("Qwen3_5MoeForConditionalGeneration",),
    read_config,
    text_prefix="model.language_model",
    ignored_prefixes=("model.visual.", "mtp."),
)
