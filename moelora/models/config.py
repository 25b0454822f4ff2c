"""The architecture facts a model needs, read once from a Hugging Face config into a frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from moelora.ops.fp8 import Fp8Weights

QKNorm = Literal["none", "head", "full"]
# How a MoE layer chooses its experts: softmax over the router's logits, top-k (Qwen, Mixtral, OLMoE); or
# sigmoid scores plus a correction bias for the choice only, top-k within the best groups (DeepSeek-V3,
# GLM-4.5).
# softmax_grouped: DeepSeek-V2's softmax scores, top-k within the groups with the best single score.
Routing = Literal["softmax", "sigmoid_grouped", "softmax_grouped"]

# RoPE variants whose frequencies depend on the sequence length at run time.
_DYNAMIC_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class Mla:
    """Multi-head latent attention (DeepSeek-V2/V3): q through a low-rank pair (or one projection), keys
    and values expanded per head from one normalised latent per token, which is what the cache holds
    with the token's rotated key part shared by every head."""

    q_lora_rank: int | None  # None: a plain q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool  # rotary pairs (x0, x1), (x2, x3), ... instead of the two halves
    softmax_scale: float  # qk_head_dim^-0.5, times YaRN's mscale^2 where the config asks

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class LinearAttention:
    """Gated DeltaNet layers (Qwen3-Next, Qwen3.5-MoE): which layers they are, and their heads. Such a
    layer keeps no KV cache: each sequence's convolution inputs and recurrent state sit in its slot of a
    state cache."""

    layers: tuple[bool, ...]  # per layer: True = linear attention, False = full (gated) attention
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int
    # Qwen3-Next: in_proj_qkvz / in_proj_ba, interleaved per key head; Qwen3.5-MoE: in_proj_qkv, in_proj_z,
    # in_proj_b, in_proj_a, each in plain order.
    fused_projections: bool = True

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: q, k and v of every head."""
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model code reads; layers get plain values from it, never the HF config."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_inv_freq: tuple[float, ...]
    rope_attention_scaling: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: QKNorm
    clip_qkv: float | None
    sliding_windows: tuple[int | None, ...]  # per layer; None = full causal attention
    moe_layers: tuple[bool, ...]  # per layer; False = dense MLP
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    dense_intermediate_size: int
    shared_expert_intermediate_size: int  # 0 = no shared expert
    norm_topk_prob: bool
    router_fp32_weights: bool
    dtype: torch.dtype  # the checkpoint's own dtype
    eos_token_ids: tuple[int, ...]
    routing: Routing = "softmax"
    expert_groups: int = 1  # the grouped routings: the experts fall into this many equal groups
    topk_groups: int = 1  # the grouped routings: the experts are chosen within this many best groups
    routed_scaling_factor: float = 1.0  # the routed experts' weights are multiplied by it
    shared_expert_gated: bool = True  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) scales the shared expert
    unserved_layers: int = 0  # layers after the last one in the checkpoint, not served (GLM's MTP layers)
    mla: Mla | None = None  # latent attention instead of GQA (head_dim is then the q/k head dim)
    # GPT-OSS: a learned logit per query head joins each softmax (its weight dropped); the router's linear
    # layer has a bias (top-k on its logits, softmax over the k chosen); the experts have biases and the
    # clamped SwiGLU: g = min(g, limit), u = clamp(u, -limit, limit), h = (u + 1) * g * sigmoid(alpha g).
    attention_sinks: bool = False
    norm_weight_first: bool = False  # GPT-OSS: the norms' weight multiplies the fp32 row before the cast
    # Qwen3-Next: every RMSNorm (q/k norms included) scales by 1 + weight, in fp32 before the cast; q_proj
    # also gives each head an output gate, o = attention * sigmoid(gate); linear-attention layers.
    norm_zero_centered: bool = False
    attn_output_gate: bool = False
    linear: LinearAttention | None = None
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_limit: float | None = None  # None: silu(gate) * up
    swiglu_alpha: float = 1.0
    # the weights served in FP8 (`--quantization`; not from config.json)
    fp8: Fp8Weights | None = None

    def __post_init__(self) -> None:
        if len(self.moe_layers) != self.num_layers or len(self.sliding_windows) != self.num_layers:
            raise ValueError("moe_layers and sliding_windows need one entry per layer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of {self.num_kv_heads}")
        if any(self.moe_layers) and not 0 < self.top_k <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok {self.top_k} must be in [1, num_experts={self.num_experts}]"
            )
        if self.routing != "softmax":
            groups, per_group = self.expert_groups, self.num_experts // max(1, self.expert_groups)
            if groups < 1 or self.num_experts % groups or not 1 <= self.topk_groups <= groups:
                raise ValueError(
                    f"n_group {groups} must divide the {self.num_experts} experts and topk_group "
                    f"{self.topk_groups} be in [1, n_group]"
                )
            if groups > 1 and (per_group < 2 or self.top_k > self.topk_groups * per_group):
                raise ValueError(
                    f"num_experts_per_tok {self.top_k} needs more than the {self.topk_groups} best of "
                    f"{groups} groups of {per_group} experts hold"
                )


def rope_from_hf(hf: Any) -> tuple[tuple[float, ...], float]:
    """(inv_freq, attention scaling) from `rope_parameters` or the older `rope_theta` / `rope_scaling`."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if rope_type == "default":
        # GLM-4.5 rotates only the first partial_rotary_factor of each head (transformers' other RoPE
        # types read the factor themselves).
        factor = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0)
        dim = int(head_dim * float(factor))
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        inv_freq = 1.0 / (float(params["rope_theta"]) ** exponent)
        return tuple(inv_freq.tolist()), 1.0
    if rope_type in _DYNAMIC_ROPE:
        raise ValueError(f"rope_type '{rope_type}' changes with sequence length and is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"unknown rope_type '{rope_type}' (known: default, {', '.join(ROPE_INIT_FUNCTIONS)})"
        )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    return tuple(inv_freq.float().tolist()), float(scaling)


def checkpoint_dtype(raw: dict[str, Any]) -> torch.dtype:
    """The dtype config.json declares (`dtype`, or `torch_dtype` in older files); float32 if none."""
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"config.json declares dtype '{name}', which is not a floating-point torch dtype")
    return dtype


def eos_ids(hf: Any) -> tuple[int, ...]:
    eos = getattr(hf, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def sparse_layers(hf: Any) -> tuple[bool, ...]:
    """Qwen's rule: layer i is MoE unless listed in mlp_only_layers or (i + 1) % decoder_sparse_step != 0."""
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    dense = set(getattr(hf, "mlp_only_layers", None) or [])
    n_exp = num_experts_of(hf)
    return tuple(i not in dense and n_exp > 0 and (i + 1) % step == 0 for i in range(hf.num_hidden_layers))


def num_experts_of(hf: Any) -> int:
    """Official Qwen configs say `num_experts`, transformers 5 writes `num_local_experts`: read both."""
    for name in ("num_experts", "num_local_experts"):
        value = getattr(hf, name, None)
        if value is not None:
            return int(value)
    raise ValueError("config.json has neither 'num_experts' nor 'num_local_experts'")


def activation_bytes(cfg: ModelConfig, tokens: int, rows: int, dtype: torch.dtype) -> int:
    """An upper estimate of what one forward step of `tokens` tokens (`rows` of them sampled) holds at its
    peak besides weights, adapters and caches: a layer's buffers live one layer at a time. The MoE block
    keeps per (token, choice) pair the gate/up output, the activation and the down output; attention its
    q/k/v and output; the residual stream a few rows of the hidden size; the sampler fp32 logits. The
    full (unsharded) sizes: under TP or EP a rank holds less. With FP8 linear layers, a step of more tokens
    than the one launch takes may multiply a 16-bit copy of one layer's weight (made for cuBLAS)."""
    e = dtype.itemsize
    h = cfg.hidden_size
    pairs = tokens * cfg.top_k if any(cfg.moe_layers) else 0
    moe = pairs * ((3 * cfg.moe_intermediate_size + h) * e + 32)  # + ids, weights, sort order
    dense = cfg.dense_intermediate_size if not all(cfg.moe_layers) else 0
    mlp = tokens * 3 * max(dense, cfg.shared_expert_intermediate_size) * e
    attn = tokens * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * e
    stream = tokens * 4 * h * e
    logits = rows * cfg.vocab_size * 4 * 2  # the logits and one working copy
    widest = max(
        (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
        2 * max(dense, cfg.shared_expert_intermediate_size),
    )
    fp8_copy = h * widest * e if cfg.fp8 is not None and cfg.fp8.linear_layers else 0
    return moe + mlp + attn + stream + logits + fp8_copy
