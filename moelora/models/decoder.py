"""The decoder-only MoE language model every supported family is: embeddings, layers, final norm, LM head."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from moelora.batch import ForwardBatch
from moelora.cache.state_cache import StateCache
from moelora.layers.embedding import LMHead, VocabEmbedding
from moelora.layers.linear import LoraTarget
from moelora.layers.moe import ExpertsTarget
from moelora.layers.norm import RMSNorm
from moelora.layers.rotary import RotaryEmbedding
from moelora.layers.spec import WeightSpec
from moelora.models.blocks import DenseBlock, SelfAttention, SparseMoeBlock
from moelora.models.config import ModelConfig
from moelora.models.family import Family
from moelora.models.linear_attention import GatedDeltaNet
from moelora.models.mla import LatentAttention
from moelora.parallel.state import ParallelState


def model_norm(cfg: ModelConfig, size: int, dtype: torch.dtype) -> RMSNorm:
    """The family's RMSNorm: weight after the cast (most), before it (GPT-OSS), or 1 + weight (Qwen3-Next)."""
    return RMSNorm(size, cfg.rms_norm_eps, dtype, cfg.norm_weight_first, cfg.norm_zero_centered)


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(.)) where mlp is a dense MLP or a sparse MoE block.

    The residual stream is carried as (x, residual) with hidden state x + residual, so that every
    residual add runs inside the norm that follows it (the next layer's, or the model's final norm).
    """

    def __init__(self, cfg: ModelConfig, layer: int, ps: ParallelState, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = model_norm(cfg, cfg.hidden_size, dtype)
        # the token mixer; `self_attn` whatever its kind (its checkpoint name may differ)
        self.self_attn: SelfAttention | LatentAttention | GatedDeltaNet
        if cfg.linear is not None and cfg.linear.layers[layer]:
            self.self_attn = GatedDeltaNet(cfg, layer, ps, dtype)
        elif cfg.mla is not None:
            self.self_attn = LatentAttention(cfg, layer, ps, dtype)
        else:
            self.self_attn = SelfAttention(cfg, layer, ps, dtype)
        self.post_attention_layernorm = model_norm(cfg, cfg.hidden_size, dtype)
        self.mlp: DenseBlock | SparseMoeBlock
        if cfg.moe_layers[layer]:
            self.mlp = SparseMoeBlock(cfg, ps, dtype)
        else:
            self.mlp = DenseBlock(cfg.hidden_size, cfg.dense_intermediate_size, ps, dtype, cfg.fp8)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (MLP output, residual before the MLP); residual None for the first layer."""
        xa = None  # q/k/v's LoRA shrink, where the norm's launch computes it (`ops.add_norm_shrink`)
        qkv = None  # q/k/v's output, where its launch ran the norm too (`ops.norm_linear`)
        self_attn = self.self_attn if isinstance(self.self_attn, SelfAttention) else None
        h = x
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            shrink, slot = None, batch.token_slot
            if self_attn is not None and slot is not None:
                shrink = self_attn.input_shrink(x, slot)
            norm = self.input_layernorm.before(residual)
            if self_attn is not None and self_attn.qkv.takes_norm(x, norm):
                if shrink is not None:
                    assert slot is not None
                    xa = self.input_layernorm.shrink(x, residual, shrink[0], slot, shrink[1])
                qkv, residual = self_attn.qkv.norm_forward(x, norm, slot, xa)
            elif shrink is None:
                h, residual = self.input_layernorm.add_norm(x, residual)
            else:
                assert slot is not None
                lora, chunk = shrink
                h, residual, xa = self.input_layernorm.add_norm_shrink(x, residual, lora, slot, chunk)
        mlp = self.mlp
        if self_attn is None:
            attn = self.self_attn(h, batch, cos, sin)
        else:
            if qkv is None:
                qkv = self_attn.qkv(h, batch.token_slot, xa)
            o, o_xa = self_attn.attend_qkv(qkv, batch, cos, sin)
            if isinstance(mlp, SparseMoeBlock) and mlp.routes_after_o():
                # o, the norm and the router: one launch for a few tokens (`ops.linear_norm_router`)
                norm_after = self.post_attention_layernorm
                return mlp.o_norm_forward(self_attn.o_proj, o, o_xa, residual, norm_after, batch.token_slot)
            attn = self_attn.project(o, batch.token_slot, o_xa)
        if isinstance(mlp, SparseMoeBlock):
            return mlp.add_norm_forward(attn, residual, self.post_attention_layernorm, batch.token_slot)
        h, residual = self.post_attention_layernorm.add_norm(attn, residual)
        return mlp(h, batch.token_slot), residual

    def weight_specs(self, prefix: str, family: Family) -> list[WeightSpec]:
        names = family.moe_prefixes if isinstance(self.mlp, SparseMoeBlock) else ("mlp",)
        mlp_prefixes = tuple(f"{prefix}.{n}" for n in names)
        return [
            *self.input_layernorm.weight_specs(f"{prefix}.input_layernorm.weight"),
            *self.self_attn.weight_specs(f"{prefix}.{self.self_attn.checkpoint_name}"),
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
        self.norm = model_norm(cfg, cfg.hidden_size, dtype)
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
        text = self.family.text_prefix
        specs = self.embed_tokens.weight_specs(f"{text}.embed_tokens.weight")
        for i, layer in enumerate(self.decoder_layers()):
            specs += layer.weight_specs(f"{text}.layers.{i}", self.family)
        specs += self.norm.weight_specs(f"{text}.norm.weight")
        specs += self.lm_head.weight_specs("lm_head.weight")
        return specs

    def ignored_keys(self) -> set[str]:
        """Checkpoint keys that may be present but are not read (a tied checkpoint's saved LM head)."""
        return {"lm_head.weight"} if self.cfg.tie_word_embeddings else set()

    def kv_layout(self) -> tuple[int, int, int]:
        """(this rank's KV heads, K width, V width) of a cache token: its GQA heads of head_dim each, or
        one latent and one rotated key part with latent attention."""
        for layer in self.decoder_layers():
            attn = layer.self_attn
            if not isinstance(attn, GatedDeltaNet):
                return attn.kv_heads, *attn.cache_dims
        raise ValueError("the model has no attention layer to keep keys and values for")

    def state_cache(self, num_slots: int, device: torch.device) -> StateCache | None:
        """The linear-attention layers' state cache with `num_slots` slots (None without such layers)."""
        shapes = self._state_shapes()
        if shapes is None:
            return None
        layers, conv, rec = shapes
        return StateCache(layers, num_slots, conv, rec, self.dtype, device)

    def state_bytes_per_slot(self) -> int:
        shapes = self._state_shapes()
        return (
            0
            if shapes is None
            else StateCache.bytes_per_slot(len(shapes[0]), shapes[1], shapes[2], self.dtype)
        )

    def _state_shapes(self) -> tuple[list[int], tuple[int, int], tuple[int, int, int]] | None:
        """(linear layers, conv state [C, K - 1], recurrent state [Hv, Dk, Dv]) of this rank's heads."""
        mixers = [(i, layer.self_attn) for i, layer in enumerate(self.decoder_layers())]
        linear = [(i, m) for i, m in mixers if isinstance(m, GatedDeltaNet)]
        if not linear:
            return None
        m, la = linear[0][1], linear[0][1].la
        conv = (m.conv_weight.shape[0], la.conv_kernel - 1)
        return [i for i, _ in linear], conv, (m.hv, la.head_k_dim, la.head_v_dim)

    def kv_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it keeps keys and values in the KV cache (a linear-attention layer keeps a
        state in the state cache instead)."""
        return tuple(not isinstance(layer.self_attn, GatedDeltaNet) for layer in self.decoder_layers())

    def ignored_prefixes(self) -> tuple[str, ...]:
        """Checkpoint key prefixes that are not read: layers after the last one (GLM's MTP layers), and the
        family's own (a vision tower, separate MTP weights)."""
        n, text = self.cfg.num_layers, self.family.text_prefix
        extra = tuple(f"{text}.layers.{i}." for i in range(n, n + self.cfg.unserved_layers))
        return extra + self.family.ignored_prefixes
