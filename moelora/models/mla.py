"""Multi-head latent attention (DeepSeek-V2/V3), as transformers' DeepseekV3Attention computes it.

q = q_b(norm(q_a(x))) (or q_proj(x)), split per head into a part without position and a rotated part;
kv_a(x) gives each token one latent (normalised) and one rotated key part shared by every head: those two
are what the paged cache holds (K cache: the latent, V cache: the rotated part). Heads are split over TP
ranks (q_b, kv_b by rows, o by columns); q_a, kv_a and the latent are replicated.

A step with prompt tokens expands each sequence's cached latents through kv_b into per-head keys (the
shared rotated part appended) and values: kv_b runs with the sequence's adapter, so a LoRA on kv_b acts on
every cached token exactly as a merged kv_b would. A decode step (one new token per sequence) never
expands the cache (the absorbed form): kv_b's rows for head h are a key half K_h [dn, R] and a value half
V_h [dv, R], and with W_h = K_h + B^K_h A (a LoRA B A on kv_b, its head-h rows of B)

    q_nope . (W_h c) = (K_h^T q_nope + A^T (B^K_h^T q_nope)) . c

so the query is projected into the latent space once (the adapter's term too), attends over the cached
latents c themselves, and the result o_lat is projected out by V_h o_lat + B^V_h (A o_lat): exactly the
merged model's output, at the cost of a few rank-r products per token instead of kv_b over every cached
token each step.
"""

from __future__ import annotations

import torch
from torch import nn

from moelora import ops
from moelora.batch import ForwardBatch
from moelora.layers.linear import ColumnLinear, LoraTarget, RowLinear, split_part, whole_part
from moelora.layers.norm import RMSNorm
from moelora.layers.spec import WeightSpec
from moelora.models.config import ModelConfig
from moelora.parallel import comm
from moelora.parallel.state import ParallelState


class LatentAttention(nn.Module):
    checkpoint_name = "self_attn"

    def __init__(self, cfg: ModelConfig, layer: int, ps: ParallelState, dtype: torch.dtype) -> None:
        super().__init__()
        assert cfg.mla is not None
        m = self.mla = cfg.mla
        if cfg.num_heads % ps.tp_size:
            raise ValueError(f"tp_size {ps.tp_size} does not divide the {cfg.num_heads} attention heads")
        self.ps, self.layer = ps, layer
        self.heads = cfg.num_heads // ps.tp_size
        hidden, eps, bias, fp8 = cfg.hidden_size, cfg.rms_norm_eps, cfg.qkv_bias, cfg.fp8
        q_size = cfg.num_heads * m.qk_head_dim
        self.q_proj: ColumnLinear | None = None
        self.q_a_proj: ColumnLinear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: ColumnLinear | None = None
        if m.q_lora_rank is None:
            self.q_proj = ColumnLinear(hidden, [split_part("q_proj", q_size, ps)], False, dtype, fp8=fp8)
        else:
            self.q_a_proj = ColumnLinear(
                hidden, [whole_part("q_a_proj", m.q_lora_rank)], bias, dtype, fp8=fp8
            )
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, eps, dtype)
            q_b = [split_part("q_b_proj", q_size, ps)]
            self.q_b_proj = ColumnLinear(m.q_lora_rank, q_b, False, dtype, fp8=fp8)
        kv_a_size = m.kv_lora_rank + m.qk_rope_head_dim
        kv_a = [whole_part("kv_a_proj_with_mqa", kv_a_size)]
        self.kv_a_proj = ColumnLinear(hidden, kv_a, bias, dtype, fp8=fp8)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, eps, dtype)
        kv_b_size = cfg.num_heads * (m.qk_nope_head_dim + m.v_head_dim)
        # kv_b stays in --dtype (an FP8 checkpoint's dequantised): decode absorbs its weight into q and o
        self.kv_b_proj = ColumnLinear(m.kv_lora_rank, [split_part("kv_b_proj", kv_b_size, ps)], False, dtype)
        self.o_proj = RowLinear("o_proj", cfg.num_heads * m.v_head_dim, hidden, cfg.o_bias, ps, dtype, fp8)
        self.kv_heads = 1  # the cache's width: one latent per token, whatever the heads
        self.cache_dims = (m.kv_lora_rank, m.qk_rope_head_dim)  # K cache, V cache

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        m, t, slot = self.mla, x.shape[0], batch.token_slot
        if self.q_proj is not None:
            q = self.q_proj(x, slot)
        else:
            assert self.q_a_proj is not None and self.q_a_layernorm is not None and self.q_b_proj is not None
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x, slot)), slot)
        q_nope, q_rot = q.view(t, self.heads, m.qk_head_dim).split(
            [m.qk_nope_head_dim, m.qk_rope_head_dim], -1
        )
        latent, k_rot = self.kv_a_proj(x, slot).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        if m.rope_interleave:  # pairs (x0, x1), (x2, x3), ...: as the two halves rotary rotates
            q_rot, k_rot = _halves(q_rot), _halves(k_rot)
        q_rot, k_rot3 = ops.rotary(q_rot.contiguous(), k_rot.reshape(t, 1, -1).contiguous(), cos, sin)
        k_rot = k_rot3[:, 0]
        kv = batch.kv
        if kv is not None and max(batch.seq_lens) == 1:  # decode: the absorbed form
            latent_cache, rot_cache = kv.cache.k[self.layer], kv.cache.v[self.layer]
            ops.write_latent(latent, k_rot, latent_cache, rot_cache, kv.slot_mapping)
            o = self._absorbed(q_nope, q_rot, latent_cache, rot_cache, batch)
            return comm.all_reduce(self.o_proj(o.reshape(t, -1), slot), self.ps)
        if kv is None:  # whole sequences without a cache
            latents, rots, kv_lens, kv_slot = latent, k_rot, batch.seq_lens, slot
        else:
            latent_cache, rot_cache = kv.cache.k[self.layer], kv.cache.v[self.layer]
            ops.write_latent(latent, k_rot, latent_cache, rot_cache, kv.slot_mapping)
            latents, rots = ops.gather_latents(latent_cache, rot_cache, kv.block_tables, kv.kv_lens)
            kv_lens, kv_slot = kv.kv_lens, _per_cached_token(slot, batch.seq_lens, kv.kv_lens)
        expanded = self.kv_b_proj(latents, kv_slot).view(-1, self.heads, m.qk_nope_head_dim + m.v_head_dim)
        k_nope, v = expanded.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k = torch.cat((k_nope, rots[:, None, :].expand(-1, self.heads, -1)), dim=-1)
        o = ops.mla_attention(
            torch.cat((q_nope, q_rot), dim=-1), k, v, batch.seq_lens, kv_lens, m.softmax_scale
        )
        out = self.o_proj(o.reshape(t, -1), slot)
        return comm.all_reduce(out, self.ps)

    def _absorbed(
        self,
        q_nope: torch.Tensor,
        q_rot: torch.Tensor,
        latent_cache: torch.Tensor,
        rot_cache: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """Decode attention of one token per sequence in the latent space (see the module's docstring):
        q_nope [T, H, dn], q_rot [T, H, dr] -> per-head outputs [T, H, dv]."""
        m, kv = self.mla, batch.kv
        assert kv is not None
        dn = m.qk_nope_head_dim
        w = self.kv_b_proj.weight.view(self.heads, dn + m.v_head_dim, m.kv_lora_rank)
        q_lat = torch.einsum("thd,hdr->thr", q_nope, w[:, :dn])  # [T, H, R]
        lora = self.kv_b_proj.lora
        slot = batch.token_slot
        if lora is not None and slot is not None:
            a, b, on = _token_lora(lora.a[:, 0], lora.b, slot)  # [T, r, R], [T, out, r], [T, 1, 1]
            b = b.view(b.shape[0], self.heads, dn + m.v_head_dim, -1)  # [T, H, dn + dv, r]
            q_lat = q_lat + torch.einsum("thd,thdk,tkr->thr", q_nope, b[:, :, :dn], a) * on
        o_lat = ops.latent_decode(
            q_lat, q_rot.contiguous(), latent_cache, rot_cache, kv.block_tables, kv.kv_lens, m.softmax_scale,
            kv.kv_lens_dev,
        )  # fmt: skip
        o = torch.einsum("thr,hdr->thd", o_lat, w[:, dn:])  # [T, H, dv]
        if lora is not None and slot is not None:
            o = o + torch.einsum("thr,tkr,thdk->thd", o_lat, a, b[:, :, dn:]) * on
        return o

    def lora_targets(self) -> list[LoraTarget]:
        layers = [self.q_proj, self.q_a_proj, self.q_b_proj, self.kv_a_proj, self.kv_b_proj]
        targets = [LoraTarget(self.layer, lin, (lin.parts[0].name,)) for lin in layers if lin is not None]
        return [*targets, LoraTarget(self.layer, self.o_proj, ("o_proj",))]

    def weight_specs(self, prefix: str) -> list[WeightSpec]:
        specs: list[WeightSpec] = []
        for lin in (self.q_proj, self.q_a_proj, self.q_b_proj, self.kv_a_proj, self.kv_b_proj):
            if lin is not None:
                specs += lin.weight_specs(prefix)
        if self.q_a_layernorm is not None:
            specs += self.q_a_layernorm.weight_specs(f"{prefix}.q_a_layernorm.weight")
        specs += self.kv_a_layernorm.weight_specs(f"{prefix}.kv_a_layernorm.weight")
        return specs + self.o_proj.weight_specs(prefix)


def _halves(x: torch.Tensor) -> torch.Tensor:
    """[..., (x0, x1, x2, x3, ...)] -> [..., (x0, x2, ..., x1, x3, ...)]: DeepSeek's interleaved rotary
    pairs laid out as the two halves of rotate-half rotary (transformers' cached keys have this layout)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def _token_lora(
    a: torch.Tensor, b: torch.Tensor, slot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's adapter A [T, r, in] and B [T, out, r] (scales folded in), and a mask [T, 1, 1]: 1
    where the token has an adapter (slot >= 0), else 0 (its A and B are slot 0's, multiplied away)."""
    on = (slot >= 0)[:, None, None]
    index = slot.clamp(min=0).long()
    return a[index], b[index], on.to(a.dtype)


def _per_cached_token(
    slot: torch.Tensor | None, seq_lens: tuple[int, ...], kv_lens: tuple[int, ...]
) -> torch.Tensor | None:
    """Each cached token's adapter slot: its sequence's (the slot of the sequence's first new token)."""
    if slot is None:
        return None
    starts = torch.tensor([0, *seq_lens[:-1]], device=slot.device).cumsum(0)
    return slot[starts].repeat_interleave(torch.tensor(kv_lens, device=slot.device))
