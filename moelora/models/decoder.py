"""The decoder-only MoE language model every supported family is: embeddings, layers, final norm, LM head."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from moelora.batch import ForwardBatch
from moelora.layers.embedding import LMHead, VocabEmbedding
from moelora.layers.linear import LoraTarget
from moelora.layers.moe import ExpertsTarget
from moelora.layers.norm import RMSNorm
from moelora.layers.rotary import RotaryEmbedding
from moelora.layers.spec import WeightSpec
from moelora.models.blocks import DenseBlock, SelfAttention, SparseMoeBlock
from moelora.models.config import ModelConfig
from moelora.models.family import Family
from moelora.models.mla import LatentAttention
from moelora.parallel.state import ParallelState


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(.)) where mlp is a dense MLP or a sparse MoE block.

    The residual stream is carried as (x, residual) with hidden state x + residual, so that every
    residual add runs inside the norm that follows it (the next layer's, or the model's final norm).
    """

    def __init__(self, cfg: ModelConfig, layer: int, ps: ParallelState, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, cfg.norm_weight_first)
        self.self_attn: SelfAttention | LatentAttention
        if cfg.mla is not None:
            self.self_attn = LatentAttention(cfg, layer, ps, dtype)
        else:
            self.self_attn = SelfAttention(cfg, layer, ps, dtype)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, dtype, cfg.norm_weight_first
        )
        self.mlp: DenseBlock | SparseMoeBlock
        if cfg.moe_layers[layer]:
            self.mlp = SparseMoeBlock(cfg, ps, dtype)
        else:
            self.mlp = DenseBlock(cfg.hidden_size, cfg.dense_intermediate_size, ps, dtype)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (MLP output, residual before the MLP); residual None for the first layer."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_norm(x, residual)
        h, residual = self.post_attention_layernorm.add_norm(self.self_attn(h, batch, cos, sin), residual)
        return self.mlp(h, batch.token_slot), residual

    def weight_specs(self, prefix: str, family: Family) -> list[WeightSpec]:
        names = family.moe_prefixes if isinstance(self.mlp, SparseMoeBlock) else ("mlp",)
        mlp_prefixes = tuple(f"{prefix}.{n}" for n in names)
        return [
            *self.input_layernorm.weight_specs(f"{prefix}.input_layernorm.weight"),
            *self.self_attn.weight_specs(f"{prefix}.self_attn"),
            *self.post_attention_layernorm.weight_specs(f"{prefix}.post_attention_layernorm.weight"),
            *self.mlp.weight_specs(mlp_prefixes, family),
        ]


class MoeForCausalLM(nn.Module):
    """One rank's share of the model. forward: token ids [T] -> final hidden states [T, H]."""

    def __init__(self, cfg: ModelConfig, family: Family, ps: ParallelState, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg, self.family, self.ps, self.dtype = cfg, family, ps, dtype
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, ps, dtype)
        self.rotary = RotaryEmbedding(cfg.rope_inv_freq, cfg.rope_attention_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, ps, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, cfg.norm_weight_first)
        self.lm_head = LMHead(self.embed_tokens, cfg.tie_word_embeddings, dtype)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(batch.positions, x.dtype)
        residual: torch.Tensor | None = None
        for layer in self.decoder_layers():
            x, residual = layer(x, residual, batch, cos, sin)
        return self.norm(x) if residual is None else self.norm.add_norm(x, residual)[0]

    def lora_targets(self) -> list[LoraTarget | ExpertsTarget]:
        """Every layer adapters may modify, as each block declares them (attention first, then the MLP's)."""
        targets: list[LoraTarget | ExpertsTarget] = []
        for i, layer in enumerate(self.decoder_layers()):
            targets += layer.self_attn.lora_targets()
            targets += layer.mlp.lora_targets(i)
        return targets

    def decoder_layers(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.layers]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> fp32 logits [N, vocab] over the full vocabulary (gathered across TP)."""
        return self.lm_head(hidden)

    def weight_specs(self) -> list[WeightSpec]:
        specs = self.embed_tokens.weight_specs("model.embed_tokens.weight")
        for i, layer in enumerate(self.decoder_layers()):
            specs += layer.weight_specs(f"model.layers.{i}", self.family)
        specs += self.norm.weight_specs("model.norm.weight")
        specs += self.lm_head.weight_specs("lm_head.weight")
        return specs

    def ignored_keys(self) -> set[str]:
        """Checkpoint keys that may be present but are not read (a tied checkpoint's saved LM head)."""
        return {"lm_head.weight"} if self.cfg.tie_word_embeddings else set()

    def kv_layout(self) -> tuple[int, int, int]:
        """(this rank's KV heads, K width, V width) of a cache token: its GQA heads of head_dim each, or
        one latent and one rotated key part with latent attention."""
        attn = self.decoder_layers()[0].self_attn
        return attn.kv_heads, *attn.cache_dims

    def ignored_prefixes(self) -> tuple[str, ...]:
        """Checkpoint key prefixes that are not read: layers after the last one (GLM's MTP layers)."""
        n = self.cfg.num_layers
        return tuple(f"model.layers.{i}." for i in range(n, n + self.cfg.unserved_layers))
