"""The blocks every supported family is made of: attention, dense MLP, sparse MoE."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from moelora import ops
from moelora.batch import ForwardBatch
from moelora.layers.linear import ColumnLinear, LoraTarget, OutPart, RowLinear, split_part, whole_part
from moelora.layers.moe import ExpertsTarget, FusedMoE
from moelora.layers.norm import RMSNorm, ShardedRMSNorm
from moelora.layers.spec import WeightSpec, sharded, whole
from moelora.models.config import ModelConfig
from moelora.models.family import Family
from moelora.ops.cache_write import CacheWrite
from moelora.ops.dense_lora import DenseLora
from moelora.ops.fp8 import Fp8Weights
from moelora.ops.norm_router import NormRouter
from moelora.parallel import comm
from moelora.parallel.state import ParallelState


def kv_part(name: str, cfg: ModelConfig, ps: ParallelState) -> OutPart:
    """K or V rows of this rank: split by heads, or one head replicated when tp_size > kv heads."""
    d, kv = cfg.head_dim, cfg.num_kv_heads
    if kv >= ps.tp_size:
        if kv % ps.tp_size:
            raise ValueError(f"tp_size {ps.tp_size} does not divide the {kv} key/value heads")
        return split_part(name, kv * d, ps)
    if ps.tp_size % kv:
        raise ValueError(f"{kv} key/value heads cannot be replicated evenly over tp_size {ps.tp_size}")
    head = ps.tp_rank * kv // ps.tp_size
    return OutPart(name, kv * d, slice(head * d, (head + 1) * d))


class SelfAttention(nn.Module):
    """GQA self-attention over this rank's heads; returns the all-reduced output projection."""

    checkpoint_name = "self_attn"

    def __init__(self, cfg: ModelConfig, layer: int, ps: ParallelState, dtype: torch.dtype) -> None:
        super().__init__()
        if cfg.num_heads % ps.tp_size:
            raise ValueError(f"tp_size {ps.tp_size} does not divide the {cfg.num_heads} attention heads")
        if cfg.qk_norm == "full" and cfg.num_kv_heads < ps.tp_size:
            raise ValueError("a q/k norm over the whole projection needs tp_size <= the key/value heads")
        self.ps, self.layer, self.head_dim, self.clip = ps, layer, cfg.head_dim, cfg.clip_qkv
        self.window, self.scale = cfg.sliding_windows[layer], cfg.head_dim**-0.5
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # Qwen3-Next: q_proj gives each head its queries, then its output gate ([q_h, gate_h] per head)
        self.output_gate = cfg.attn_output_gate
        q_rows = 2 * q_size if self.output_gate else q_size
        parts = [split_part("q_proj", q_rows, ps), kv_part("k_proj", cfg, ps), kv_part("v_proj", cfg, ps)]
        self.qkv = ColumnLinear(cfg.hidden_size, parts, cfg.qkv_bias, dtype, fp8=cfg.fp8)
        self.kv_heads = parts[1].size // cfg.head_dim  # this rank's KV heads (the KV cache's width)
        self.cache_dims = (cfg.head_dim, cfg.head_dim)  # K and V per head
        self.o_proj = RowLinear("o_proj", q_size, cfg.hidden_size, cfg.o_bias, ps, dtype, cfg.fp8)
        self.qk_norm = cfg.qk_norm
        # GLM-4.5 rotates only the first rot_dim features of each head (transformers' partial rotary).
        self.rot_dim = 2 * len(cfg.rope_inv_freq)
        if not 0 < self.rot_dim <= cfg.head_dim:
            raise ValueError(f"rotary dimension {self.rot_dim} must be in [2, head_dim={cfg.head_dim}]")
        # GPT-OSS: one learned sink logit per query head, split with the heads.
        self.sinks: nn.Parameter | None = None
        self.num_heads = cfg.num_heads
        if cfg.attention_sinks:
            heads = cfg.num_heads // ps.tp_size
            self.heads = slice(ps.tp_rank * heads, (ps.tp_rank + 1) * heads)
            self.sinks = nn.Parameter(torch.empty(heads, dtype=dtype), requires_grad=False)
        self.q_norm: RMSNorm | ShardedRMSNorm | None = None
        self.k_norm: RMSNorm | ShardedRMSNorm | None = None
        if cfg.qk_norm == "head":
            centered = cfg.norm_zero_centered
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, zero_centered=centered)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, zero_centered=centered)
        elif cfg.qk_norm == "full":
            self.q_norm = ShardedRMSNorm(q_size, cfg.rms_norm_eps, ps, dtype)
            self.k_norm = ShardedRMSNorm(kv_size, cfg.rms_norm_eps, ps, dtype)
        # The fused norm + rotary launch rotates whole heads and casts before the norm weight: partial
        # rotary (GLM, Qwen3-Next) and zero-centred norms (Qwen3-Next) take separate launches.
        zero_centered = cfg.qk_norm == "head" and cfg.norm_zero_centered
        self.separate_rotary = self.rot_dim < cfg.head_dim or zero_centered

    def input_shrink(self, x: torch.Tensor, token_slot: torch.Tensor | None) -> tuple[DenseLora, int] | None:
        """(q/k/v's adapter slots, chunk) where the norm before should compute q/k/v's LoRA shrink for the
        input x (`ColumnLinear.shrink_chunk`), else None."""
        chunk = self.qkv.shrink_chunk(x, token_slot)
        return None if not chunk or self.qkv.lora is None else (self.qkv.lora, chunk)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        cos: torch.Tensor,
        sin: torch.Tensor,
        xa: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """xa: q/k/v's LoRA shrink of x, where `input_shrink` asked the norm for it."""
        o, o_xa = self.attend(x, batch, cos, sin, xa)
        return self.project(o, batch.token_slot, o_xa)

    def project(
        self, o: torch.Tensor, token_slot: torch.Tensor | None, o_xa: torch.Tensor | None
    ) -> torch.Tensor:
        """The output projection of `attend`'s (o, o_xa), summed over the TP ranks."""
        return comm.all_reduce(self.o_proj(o, token_slot, o_xa), self.ps)

    def attend(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        cos: torch.Tensor,
        sin: torch.Tensor,
        xa: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Everything before the output projection -> (its input [T, Hq_loc * D], its LoRA shrink where the
        decode attention computed it, else None)."""
        return self.attend_qkv(self.qkv(x, batch.token_slot, xa), batch, cos, sin)

    def attend_qkv(
        self, qkv: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attend` after the q/k/v projection (its output qkv: the caller ran it, as
        `ColumnLinear.norm_forward` with the norm before it)."""
        # [T, Hq_loc * D], [T, Hkv_loc * D] x2
        q, k, v = qkv.split(self.qkv.out_sizes, dim=-1)
        t, d = qkv.shape[0], self.head_dim
        gate = None
        if self.output_gate:
            q, gate = q.view(t, -1, 2 * d).chunk(2, dim=-1)
            q, gate = q.reshape(t, -1), gate.reshape(t, -1)
        if self.qk_norm == "full":
            assert self.q_norm is not None and self.k_norm is not None
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (p.clamp(-self.clip, self.clip) for p in (q, k, v))
        q, k, v = q.view(t, -1, d), k.view(t, -1, d), v.view(t, -1, d)
        # With a KV cache, the rotary launch also stores this step's keys and values in it.
        kv = batch.kv
        cache = (
            None
            if kv is None
            else CacheWrite(v, kv.cache.k[self.layer], kv.cache.v[self.layer], kv.slot_mapping)
        )
        norm = None
        if self.qk_norm == "head":
            assert isinstance(self.q_norm, RMSNorm) and isinstance(self.k_norm, RMSNorm)
            norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.q_norm.weight_first)
        o_shrink = None
        if kv is not None and cache is not None and ops.fuses_rotary_decode(q, k, cache, batch.seq_lens):
            # a decode step: norm, rotary, cache write and attention in one launch, with o's LoRA shrink
            # where o takes it (not under an output gate, which multiplies o after the attention)
            if gate is None:
                o_proj = self.o_proj
                o_shrink = ops.decode_o_shrink(
                    q, self.kv_heads, o_proj.weight, o_proj.lora, batch.token_slot, o_proj.scales
                )
            o = ops.rotary_decode_attention(
                q, k, cos, sin, norm, cache, kv.block_tables, batch.seq_lens, kv.kv_lens, self.scale,
                self.window, kv.kv_lens_dev, self.sinks, o_shrink,
            )  # fmt: skip
        else:
            if self.separate_rotary:
                q, k = self._partial_rotary(q, k, cos, sin, cache)
            elif norm is not None:
                q, k = ops.qk_norm_rotary(q, k, *norm[:3], cos, sin, cache)
            else:
                q, k = ops.rotary(q, k, cos, sin, cache)
            if kv is None:
                o = ops.prefill_attention(q, k, v, batch.seq_lens, self.scale, self.window, self.sinks)
            else:
                o = ops.paged_attention(
                    q, kv.cache.k[self.layer], kv.cache.v[self.layer], kv.block_tables, batch.seq_lens,
                    kv.kv_lens, self.scale, self.window, kv.kv_lens_dev, self.sinks,
                )  # fmt: skip
        o = o.reshape(t, -1)
        if gate is not None:
            o = o * torch.sigmoid(gate)
        return o, None if o_shrink is None else o_shrink.xa

    def _partial_rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: CacheWrite | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-head q/k norm (if any) over the whole head, rotary on the first rot_dim features, the
        rest passed through, then the cache write: separate launches (the fused ones rotate whole heads)."""
        t, d, rot = q.shape[0], self.head_dim, self.rot_dim
        if self.qk_norm == "head":
            assert isinstance(self.q_norm, RMSNorm) and isinstance(self.k_norm, RMSNorm)
            q = self.q_norm(q.reshape(-1, d)).view(t, -1, d)
            k = self.k_norm(k.reshape(-1, d)).view(t, -1, d)
        q_rot, k_rot = ops.rotary(q[..., :rot], k[..., :rot], cos, sin)
        q, k = torch.cat((q_rot, q[..., rot:]), dim=-1), torch.cat((k_rot, k[..., rot:]), dim=-1)
        if cache is not None:
            ops.write_kv(k, cache.v, cache.k_cache, cache.v_cache, cache.slot_mapping)
        return q, k

    def lora_targets(self) -> list[LoraTarget]:
        return [
            LoraTarget(self.layer, self.qkv, ("q_proj", "k_proj", "v_proj")),
            LoraTarget(self.layer, self.o_proj, ("o_proj",)),
        ]

    def weight_specs(self, prefix: str) -> list[WeightSpec]:
        specs = self.qkv.weight_specs(prefix) + self.o_proj.weight_specs(prefix)
        if self.sinks is not None:
            specs.append(sharded(self.sinks, f"{prefix}.sinks", (self.num_heads,), (self.heads,)))
        if self.q_norm is not None and self.k_norm is not None:
            specs += self.q_norm.weight_specs(f"{prefix}.q_norm.weight")
            specs += self.k_norm.weight_specs(f"{prefix}.k_norm.weight")
        return specs


class DenseMLP(nn.Module):
    """silu(gate(x)) * up(x) -> down, split over TP by the intermediate size; returns the partial sum."""

    def __init__(
        self, hidden: int, inter: int, ps: ParallelState, dtype: torch.dtype, fp8: Fp8Weights | None = None
    ) -> None:
        super().__init__()
        parts = [split_part("gate_proj", inter, ps), split_part("up_proj", inter, ps)]
        self.gate_up = ColumnLinear(hidden, parts, False, dtype, fp8=fp8)
        self.down = RowLinear("down_proj", inter, hidden, False, ps, dtype, fp8)

    def forward(self, x: torch.Tensor, token_slot: torch.Tensor | None) -> torch.Tensor:
        return self.down(ops.silu_mul(self.gate_up(x, token_slot)), token_slot)

    def lora_targets(self, layer: int, prefix: str = "") -> list[LoraTarget]:
        """`prefix`: `shared_expert.` for a MoE block's shared expert."""
        return [
            LoraTarget(layer, self.gate_up, (f"{prefix}gate_proj", f"{prefix}up_proj")),
            LoraTarget(layer, self.down, (f"{prefix}down_proj",)),
        ]

    def weight_specs(self, prefix: str) -> list[WeightSpec]:
        return self.gate_up.weight_specs(prefix) + self.down.weight_specs(prefix)


class DenseBlock(nn.Module):
    """A dense MLP layer: the MLP and its all-reduce."""

    def __init__(
        self, hidden: int, inter: int, ps: ParallelState, dtype: torch.dtype, fp8: Fp8Weights | None = None
    ) -> None:
        super().__init__()
        self.ps, self.mlp = ps, DenseMLP(hidden, inter, ps, dtype, fp8)

    def forward(self, x: torch.Tensor, token_slot: torch.Tensor | None) -> torch.Tensor:
        return comm.all_reduce(self.mlp(x, token_slot), self.ps)

    def lora_targets(self, layer: int) -> list[LoraTarget | ExpertsTarget]:
        return list(self.mlp.lora_targets(layer))

    def weight_specs(self, prefixes: tuple[str, ...], family: Family) -> list[WeightSpec]:
        return self.mlp.weight_specs(prefixes[0])


class SparseMoeBlock(nn.Module):
    """Router, this rank's experts, the optional (gated) shared expert, and one all-reduce of their sum."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg, self.ps, self.top_k = cfg, ps, cfg.top_k
        self.renormalize, self.fp32_weights = cfg.norm_topk_prob, cfg.router_fp32_weights
        grouped = cfg.routing != "softmax"
        # transformers keeps DeepSeek's and GLM's routers (and the correction bias) in fp32 whatever the
        # model's dtype.
        self.router = ColumnLinear(
            cfg.hidden_size,
            [whole_part("gate", cfg.num_experts)],
            cfg.router_bias,
            torch.float32 if grouped else dtype,
            lora_target=False,
        )
        self.score_bias: nn.Parameter | None = None
        if cfg.routing == "sigmoid_grouped":
            bias = torch.empty(cfg.num_experts, dtype=torch.float32)
            self.score_bias = nn.Parameter(bias, requires_grad=False)
        swiglu = None if cfg.swiglu_limit is None else (cfg.swiglu_limit, cfg.swiglu_alpha)
        self.experts = FusedMoE(
            cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, ps, dtype, cfg.expert_bias, swiglu,
            cfg.fp8,
        )  # fmt: skip
        self.shared: DenseMLP | None = None
        self.shared_gate: ColumnLinear | None = None
        if cfg.shared_expert_intermediate_size:
            self.shared = DenseMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, ps, dtype, cfg.fp8)
            if cfg.shared_expert_gated:
                self.shared_gate = ColumnLinear(
                    cfg.hidden_size, [whole_part("shared_expert_gate", 1)], False, dtype, lora_target=False
                )

    def forward(self, x: torch.Tensor, token_slot: torch.Tensor | None) -> torch.Tensor:
        return self._experts(x, *self._route(x), token_slot)

    def add_norm_forward(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm, token_slot: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(x + residual)), x + residual). With the plain softmax router the norm runs in the
        router's launch (`ops.add_norm_router`), one launch a layer fewer at decode."""
        if not self._plain_router():
            h, residual = norm.add_norm(x, residual)
            return self(h, token_slot), residual
        weights, global_ids, h, residual = ops.add_norm_router(
            x, residual, norm.weight, norm.eps, norm.weight_first, self.router.weight, self.top_k,
            self.renormalize, self.fp32_weights,
        )  # fmt: skip
        return self._experts(h, weights, global_ids, token_slot), residual

    def routes_after_o(self) -> bool:
        """Whether `o_norm_forward` can take the attention's output projection (TP = 1: no all-reduce
        between them), with the plain softmax router and no router bias."""
        return self.ps.tp_size == 1 and self._plain_router()

    def _plain_router(self) -> bool:
        """The plain softmax router without a bias: the one the one-launch norm + router kernels take."""
        return self.cfg.routing == "softmax" and self.router.bias is None

    def o_norm_forward(
        self,
        o_proj: RowLinear,
        o: torch.Tensor,
        o_xa: torch.Tensor | None,
        residual: torch.Tensor,
        norm: RMSNorm,
        token_slot: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`add_norm_forward` of the attention's output projection o_proj(o) (its LoRA shrink o_xa where the
        attention computed it; where `routes_after_o`): for a few tokens the projection, the norm and the
        router in one launch (`ops.linear_norm_router`)."""
        route = NormRouter(
            residual, norm.weight, norm.eps, norm.weight_first, self.router.weight, self.top_k,
            self.renormalize, self.fp32_weights,
        )  # fmt: skip
        bias = o_proj.bias if o_proj.adds_bias else None
        weights, global_ids, h, residual = ops.linear_norm_router(
            o, o_proj.weight, bias, o_proj.lora, token_slot, route, o_proj.scales, xa=o_xa
        )
        return self._experts(h, weights, global_ids, token_slot), residual

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k], global expert ids [T, k]) of the family's router."""
        cfg = self.cfg
        if cfg.routing == "sigmoid_grouped":
            assert self.score_bias is not None
            weights, global_ids = ops.grouped_router(
                x,
                self.router.weight,
                self.score_bias,
                self.top_k,
                cfg.expert_groups,
                cfg.topk_groups,
                self.renormalize,
                cfg.routed_scaling_factor,
            )
        elif cfg.routing == "softmax_grouped":
            weights, global_ids = ops.softmax_grouped_router(
                x,
                self.router.weight,
                self.top_k,
                cfg.expert_groups,
                cfg.topk_groups,
                cfg.routed_scaling_factor,
            )
        elif self.router.bias is not None:  # GPT-OSS: top-k of the biased logits, softmax over those k
            logits = F.linear(x, self.router.weight, self.router.bias)
            weights, global_ids = ops.route(logits, self.top_k, True, self.fp32_weights)
        else:
            weights, global_ids = ops.router(
                x, self.router.weight, self.top_k, self.renormalize, self.fp32_weights
            )
        return weights, global_ids

    def _experts(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        global_ids: torch.Tensor,
        token_slot: torch.Tensor | None,
    ) -> torch.Tensor:
        """The routed experts' weighted sum, plus the shared expert, all-reduced."""
        out = self.experts(x, weights, global_ids, token_slot)
        if self.shared is not None:
            shared = self.shared(x, token_slot)
            if self.shared_gate is not None:
                # sigmoid(gate) scales each token's partial sum, so one all-reduce still sums everything.
                out = ops.add_gated(out, shared, self.shared_gate(x))
            else:
                out = out + shared
        return comm.all_reduce(out, self.ps)

    def lora_targets(self, layer: int) -> list[LoraTarget | ExpertsTarget]:
        shared = self.shared.lora_targets(layer, "shared_expert.") if self.shared is not None else []
        return [*shared, ExpertsTarget(layer, self.experts)]

    def weight_specs(self, prefixes: tuple[str, ...], family: Family) -> list[WeightSpec]:
        """Specs whose forms cover every accepted block name (Mixtral: block_sparse_moe or mlp)."""
        per_prefix = [self._specs(p, family) for p in prefixes]
        groups = zip(*per_prefix, strict=True)
        return [replace(g[0], forms=tuple(f for s in g for f in s.forms)) for g in groups]

    def _specs(self, prefix: str, family: Family) -> list[WeightSpec]:
        if family.router_name == "gate":
            specs = self.router.weight_specs(prefix)
        else:  # the same tensors under the family's own name (GPT-OSS: router)
            specs = [whole(self.router.weight, f"{prefix}.{family.router_name}.weight")]
            if self.router.bias is not None:
                specs.append(whole(self.router.bias, f"{prefix}.{family.router_name}.bias"))
        if self.score_bias is not None:
            specs.append(whole(self.score_bias, f"{prefix}.gate.e_score_correction_bias"))
        specs += self.experts.weight_specs(f"{prefix}.experts", family.expert_names, family.experts_in_major)
        if self.shared is not None:
            specs += self.shared.weight_specs(f"{prefix}.{family.shared_expert_name}")
        if self.shared_gate is not None:
            specs += self.shared_gate.weight_specs(prefix)
        return specs
