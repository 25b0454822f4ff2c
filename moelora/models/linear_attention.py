"""Qwen3-Next's (and Qwen3.5-MoE's) Gated DeltaNet layer: linear attention whose per-sequence memory is a
fixed-size state (the convolution's last inputs and the delta rule's matrix per value head), kept in the
sequence's slot of the state cache instead of a KV cache.

A step's sequences start from nothing (a prompt's first part, or a preempted sequence computed again from
position 0), resume from their slot's state with the next part of a prompt (chunked prefill, or the part
after a cached prefix: the engine copies the prefix's kept states into the slot first), or continue by one
token (decode).
"""

from __future__ import annotations

import torch
from torch import nn

from moelora import ops
from moelora.batch import ForwardBatch
from moelora.layers.linear import ColumnLinear, LoraTarget, OutPart, RowLinear
from moelora.layers.spec import Form, Piece, WeightSpec, sharded, whole
from moelora.models.config import ModelConfig
from moelora.parallel import comm
from moelora.parallel.state import ParallelState


class GatedDeltaNet(nn.Module):
    """in_proj_qkvz and in_proj_ba -> causal conv over q, k, v -> gated delta rule -> gated RMSNorm with z
    -> out_proj (transformers' Qwen3NextGatedDeltaNet). Tensor parallel by heads: each rank holds its share
    of the key heads with the value heads they serve (their q, k, v, z, b, a rows, conv channels, decays),
    keeps their state, and out_proj's partial sums meet in the all-reduce."""

    checkpoint_name = "linear_attn"

    def __init__(self, cfg: ModelConfig, layer: int, ps: ParallelState, dtype: torch.dtype) -> None:
        super().__init__()
        la = cfg.linear
        assert la is not None
        if la.num_v_heads % la.num_k_heads:
            raise ValueError(f"{la.num_k_heads} key heads do not divide the {la.num_v_heads} value heads")
        if la.num_k_heads % ps.tp_size:
            raise ValueError(
                f"tp_size {ps.tp_size} does not divide the {la.num_k_heads} linear-attention key heads"
            )
        self.ps, self.layer, self.la, self.eps = ps, layer, la, cfg.rms_norm_eps
        hidden, dk, dv, group = (
            cfg.hidden_size,
            la.head_k_dim,
            la.head_v_dim,
            la.num_v_heads // la.num_k_heads,
        )
        # this rank's key heads [k0, k0 + hk) and the value heads they serve [v0, v0 + hv)
        self.hk, self.hv = la.num_k_heads // ps.tp_size, la.num_v_heads // ps.tp_size
        k0, v0 = ps.tp_rank * self.hk, ps.tp_rank * self.hv
        q_rows, v_rows = slice(k0 * dk, (k0 + self.hk) * dk), slice(v0 * dv, (v0 + self.hv) * dv)
        kd = la.key_dim
        # the checkpoint rows of this rank's conv channels: its q, its k, its v
        self.channels = (
            q_rows,
            slice(kd + q_rows.start, kd + q_rows.stop),
            slice(2 * kd + v_rows.start, 2 * kd + v_rows.stop),
        )
        # Two layers either way: q, k, v and z (Qwen3-Next: one tensor, a block per key head; Qwen3.5:
        # in_proj_qkv and in_proj_z), then b and a (in_proj_ba, a block per key head; in_proj_b, in_proj_a).
        if la.fused_projections:
            # Qwen3-Next stores a block per key head ([q, k, v of its value heads, z of them]; [b, a]);
            # read regrouped as Qwen3.5's [all q, all k, all v, all z] and [all b, all a], so the forward
            # splits views instead of copying per head (adapters' B rows regrouped alike)
            block, ba_block = 2 * dk + 2 * group * dv, 2 * group
            widths = (dk, dk, group * dv, group * dv)
            starts = [sum(widths[:i]) for i in range(4)]
            qkvz_rows = tuple(
                slice(h * block + s, h * block + s + w)
                for s, w in zip(starts, widths, strict=True)
                for h in range(k0, k0 + self.hk)
            )
            ba_rows = tuple(
                slice(h * ba_block + s, h * ba_block + s + group)
                for s in (0, group)
                for h in range(k0, k0 + self.hk)
            )
            qkvz = [OutPart("in_proj_qkvz", la.num_k_heads * block, qkvz_rows)]
            ba = [OutPart("in_proj_ba", la.num_k_heads * ba_block, ba_rows)]
        else:
            qkvz = [OutPart("in_proj_qkv", la.conv_dim, rows) for rows in self.channels]
            qkvz.append(OutPart("in_proj_z", la.value_dim, v_rows))
            heads = slice(v0, v0 + self.hv)
            ba = [OutPart("in_proj_b", la.num_v_heads, heads), OutPart("in_proj_a", la.num_v_heads, heads)]
        self.in_proj_qkvz = ColumnLinear(hidden, qkvz, False, dtype, fp8=cfg.fp8)
        # b and a (the decay and the write strength) stay in --dtype, as published FP8 checkpoints keep them
        self.in_proj_ba = ColumnLinear(hidden, ba, False, dtype)
        conv_dim = 2 * self.hk * dk + self.hv * dv
        self.conv_weight = nn.Parameter(
            torch.empty(conv_dim, la.conv_kernel, dtype=dtype), requires_grad=False
        )
        self.heads = slice(v0, v0 + self.hv)
        self.dt_bias = nn.Parameter(torch.empty(self.hv, dtype=dtype), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.hv, dtype=dtype), requires_grad=False)
        self.norm_weight = nn.Parameter(torch.empty(dv, dtype=dtype), requires_grad=False)
        self.out_proj = RowLinear("out_proj", la.value_dim, hidden, False, ps, dtype, cfg.fp8)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        la, t, slot = self.la, x.shape[0], batch.token_slot
        dk, dv = la.head_k_dim, la.head_v_dim
        key_dim, value_dim = self.hk * dk, self.hv * dv  # this rank's
        # [q of the heads, k, v] and z; b and a (Qwen3-Next's per-head blocks regrouped at load)
        mixed, z = self.in_proj_qkvz(x, slot).split([2 * key_dim + value_dim, value_dim], dim=-1)
        b, a = self.in_proj_ba(x, slot).split([self.hv, self.hv], dim=-1)
        mixed = self._conv(mixed, batch)
        q, k, v = mixed.split([key_dim, key_dim, value_dim], dim=-1)
        q, k, v = q.view(t, -1, dk), k.view(t, -1, dk), v.view(t, -1, dv)
        o = self._delta(q, k, v, a.reshape(t, -1), b.reshape(t, -1), batch)  # [T, Hv, Dv]
        o = self._gated_norm(o, z.view(t, -1, dv)).view(t, -1)  # z a view: no copy per head
        return comm.all_reduce(self.out_proj(o, slot), self.ps)

    def _conv(self, mixed: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        rows, states = batch.state_rows, batch.states
        if rows is None or states is None:  # whole sequences, nothing kept
            return ops.causal_conv(mixed, self.conv_weight, batch.seq_lens)[0]
        conv = states.conv[self.layer]
        if rows.decode_only(mixed.shape[0]):
            return ops.causal_conv_step(mixed, self.conv_weight, conv, rows.decode_slots)
        out = torch.empty_like(mixed)
        for runs, resume in ((rows.start, False), (rows.resume, True)):
            if runs.lens:
                r, s = runs.rows, runs.slots
                initial = conv[s] if resume else None  # a copy: the slots are written below
                out[r], conv[s] = ops.causal_conv(mixed[r], self.conv_weight, runs.lens, initial)
        if rows.decode_rows.numel():
            r = rows.decode_rows
            out[r] = ops.causal_conv_step(mixed[r], self.conv_weight, conv, rows.decode_slots)
        return out

    def _delta(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """The gated delta rule, its gates from the projections a and b [T, Hv] (at decode inside the
        step's launch)."""
        rows, states = batch.state_rows, batch.states
        if rows is not None and states is not None and rows.decode_only(v.shape[0]):
            rec, slots = states.rec[self.layer], rows.decode_slots
            return ops.delta_step_with_gates(q, k, v, a, b, self.A_log, self.dt_bias, rec, slots)
        g, beta = ops.delta_gates(a, b, self.A_log, self.dt_bias)
        if rows is None or states is None:
            return ops.gated_delta_rule(q, k, v, g, beta, batch.seq_lens)[0]
        rec = states.rec[self.layer]
        out = torch.empty_like(v)
        for runs, resume in ((rows.start, False), (rows.resume, True)):
            if runs.lens:
                r, s = runs.rows, runs.slots
                initial = rec[s] if resume else None  # a copy: the slots are written below
                out[r], rec[s] = ops.gated_delta_rule(q[r], k[r], v[r], g[r], beta[r], runs.lens, initial)
        if rows.decode_rows.numel():
            r = rows.decode_rows
            out[r] = ops.gated_delta_step(q[r], k[r], v[r], g[r], beta[r], rec, rows.decode_slots)
        return out

    def _gated_norm(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """transformers' Qwen3NextRMSNormGated: the RMSNorm of the other families (cast back to o's dtype,
        then the weight), times silu(z) computed in fp32 (the product in the wider of the two), one cast."""
        return ops.gated_rms_norm(o, z, self.norm_weight, self.eps)

    def lora_targets(self) -> list[LoraTarget]:
        return [
            LoraTarget(self.layer, self.in_proj_qkvz, tuple(p.name for p in self.in_proj_qkvz.parts)),
            LoraTarget(self.layer, self.in_proj_ba, tuple(p.name for p in self.in_proj_ba.parts)),
            LoraTarget(self.layer, self.out_proj, ("out_proj",)),
        ]

    def weight_specs(self, prefix: str) -> list[WeightSpec]:
        la = self.la
        conv_key, shape = f"{prefix}.conv1d.weight", (la.conv_dim, 1, la.conv_kernel)  # depthwise [C, 1, K]
        pieces, offset = [], 0
        for rows in self.channels:
            n = rows.stop - rows.start
            pieces.append(Piece(conv_key, shape, (rows,), (slice(offset, offset + n),), ("squeeze1",)))
            offset += n
        heads = (la.num_v_heads,)
        return [
            *self.in_proj_qkvz.weight_specs(prefix),
            *self.in_proj_ba.weight_specs(prefix),
            WeightSpec(self.conv_weight, (Form("", tuple(pieces)),)),
            sharded(self.dt_bias, f"{prefix}.dt_bias", heads, (self.heads,)),
            sharded(self.A_log, f"{prefix}.A_log", heads, (self.heads,)),
            whole(self.norm_weight, f"{prefix}.norm.weight"),
            *self.out_proj.weight_specs(prefix),
        ]
