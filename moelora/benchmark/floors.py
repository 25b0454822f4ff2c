"""What the hardware allows, measured in the same run, and the least a step can cost on it.

A decode step reads at least: every weight a token touches (attention, router, norms, dense MLPs and the
shared expert whole; the routed experts the batch chose; the LM head), the KV cache of every sequence (and
the linear-attention states, read and written), and the LoRA weights of the adapters in the batch. Expert
choice is taken as uniform: a batch of B tokens touches E * (1 - (1 - k/E)^B) of E experts in expectation.
Divided by the measured bandwidth (the faster of a device copy, counting bytes read and written, and a
read-only reduction: weights are only read, and a read streams faster than a copy), that is the step's byte
floor; a measured step below it is a bug in the benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moelora.layers.embedding import VocabEmbedding
from moelora.layers.linear import ColumnLinear, RowLinear
from moelora.layers.moe import FusedMoE
from moelora.lora.adapter import LoraAdapter
from moelora.models.decoder import MoeForCausalLM

_COPY_BYTES = 1 << 30
_GEMM_N = 8192


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float  # device-to-device copy: bytes read + written per second
    gemm_flops: float | None  # dense square matmul in the model's dtype (CUDA only)
    read_bytes_per_s: float = 0.0  # a reduction over the same bytes: bytes read per second

    @property
    def bytes_per_s(self) -> float:
        """The rate the floors divide by: the faster of the copy and the read."""
        return max(self.copy_bytes_per_s, self.read_bytes_per_s)


def _timed(fn: object, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    assert callable(fn)
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """Copy and read bandwidth (1 GiB on CUDA, 64 MiB on CPU) and, on CUDA, the 8192^3 matmul rate."""
    size = _COPY_BYTES if device.type == "cuda" else _COPY_BYTES // 16
    pair = torch.empty(2, size // 2, dtype=torch.float16, device=device).fill_(1)
    seconds = _timed(lambda: pair[1].copy_(pair[0]), device, 10)
    read = _timed(lambda: pair.sum(dtype=torch.float32), device, 10)
    gemm = None
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        ab = torch.randn(2, _GEMM_N, _GEMM_N, device=device, dtype=dtype)
        gemm = 2 * _GEMM_N**3 / _timed(lambda: ab[0] @ ab[1], device, 10)
    return Ceilings(2 * size / seconds, gemm, 2 * size / read)


@dataclass(frozen=True)
class ModelBytes:
    """This rank's weight bytes, sorted by how a decode step reads them."""

    always: int  # read whole every step: everything but the routed experts and the embedding table
    expert: int  # one routed expert of one layer (gate, up and down)
    moe_layers: int
    local_experts: int
    num_experts: int
    top_k: int
    embed_row: int  # one embedding row (a step reads one per token)
    kv_per_token: int  # K and V of one token over the layers that keep them (this rank's heads)
    active_params: int  # matmul weights one token uses (attention, router, k experts, dense, LM head)
    # one sequence's linear-attention states (Qwen3-Next's conv inputs and fp32 matrices, this rank's
    # heads): a decode step reads and rewrites them, and the copy rate counts both
    state_per_seq: int = 0


def _scale_tables(m: FusedMoE) -> tuple[torch.Tensor, ...]:
    return (m.scales.gate_up, m.scales.down) if m.scales is not None else ()


def _expert_bytes(m: FusedMoE) -> int:
    """A layer's routed-expert weights, with their FP8 scales (`--quantization fp8`)."""
    return sum(_nbytes(t) for t in (m.w_gate_up, m.w_down, *_scale_tables(m)))


def model_bytes(model: MoeForCausalLM, kv_per_token: int) -> ModelBytes:
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    embeddings = [m for m in model.modules() if isinstance(m, VocabEmbedding)]
    expert_total = sum(_expert_bytes(m) for m in experts)
    tied = model.cfg.tie_word_embeddings
    embed_total = 0 if tied else sum(_nbytes(m.weight) for m in embeddings)
    total = sum(_nbytes(p) for p in model.parameters())
    e_loc = experts[0].w_down.shape[0] if experts else 0
    per_expert = _expert_bytes(experts[0]) // e_loc if experts else 0
    item = next(model.parameters()).element_size()
    cfg = model.cfg
    always = total - expert_total - embed_total
    # parameters, not bytes (FP8 weights take one byte, their scales are not parameters of the product)
    linears = [m for m in model.modules() if isinstance(m, (ColumnLinear, RowLinear))]
    scales = {id(m.scales.table) for m in linears if m.scales is not None}
    expert_weights = sum(m.w_gate_up.numel() + m.w_down.numel() for m in experts)
    expert_ids = {id(t) for m in experts for t in (m.w_gate_up, m.w_down, *_scale_tables(m))}
    embed_ids = set() if tied else {id(m.weight) for m in embeddings}
    skip = scales | expert_ids | embed_ids
    always_params = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    expert_params = expert_weights // (e_loc * len(experts)) if experts else 0
    active = always_params + len(experts) * cfg.top_k * expert_params
    return ModelBytes(
        always,
        per_expert,
        len(experts),
        e_loc,
        cfg.num_experts,
        cfg.top_k,
        cfg.hidden_size * item,
        kv_per_token,
        active,
        model.state_bytes_per_slot(),
    )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected share of experts a batch of `tokens` tokens chooses (uniform routing)."""
    return 1 - (1 - top_k / num_experts) ** tokens if tokens else 0.0


@dataclass(frozen=True)
class LoraBytes:
    """One adapter's bytes per layer at its rank: dense targets (read whole) and one routed expert."""

    dense: int
    expert: int


def decode_bytes(
    mb: ModelBytes, batch: int, context: float, lora: Mapping[str, tuple[int, LoraBytes]] | None = None
) -> float:
    """Bytes one decode step of `batch` sequences reads, `context` tokens of KV each (on average);
    `lora`: adapter -> (its tokens in the batch, its bytes)."""
    share = touched(mb.num_experts, mb.top_k, batch)
    total = mb.always + mb.moe_layers * mb.local_experts * share * mb.expert
    total += batch * (mb.embed_row + context * mb.kv_per_token + 2 * mb.state_per_seq)
    for tokens, lb in (lora or {}).values():
        total += (
            lb.dense
            + mb.moe_layers * mb.local_experts * touched(mb.num_experts, mb.top_k, tokens) * lb.expert
        )
    return total


def prefill_flops(mb: ModelBytes, cfg_heads: int, head_dim: int, layers: int, lens: list[int]) -> float:
    """Matmul FLOPs of prefilling prompts of these lengths: weights, and causal attention (QK and PV)."""
    weights = 2 * mb.active_params * sum(lens)
    attention = sum(2 * 2 * n * n / 2 * cfg_heads * head_dim * layers for n in lens)
    return float(weights + attention)


def adapter_bytes(adapter: LoraAdapter, itemsize: int, tp_size: int, moe_tp_size: int) -> LoraBytes:
    """An adapter's slot bytes on one rank: dense targets over all layers (split over `tp_size` ranks,
    as their larger factor is), and its average routed expert in one layer (split over `moe_tp_size`)."""
    dense = sum(w.A.numel() + w.B.numel() for w in adapter.dense.values()) * itemsize // tp_size
    per_layer: dict[int, int] = {}
    experts: dict[int, set[int]] = {}
    for (layer, _), by_expert in adapter.experts.items():
        per_layer[layer] = per_layer.get(layer, 0) + sum(
            w.A.numel() + w.B.numel() for w in by_expert.values()
        )
        experts.setdefault(layer, set()).update(by_expert)
    count = sum(len(e) for e in experts.values())
    expert = sum(per_layer.values()) * itemsize // (count * moe_tp_size) if count else 0
    return LoraBytes(dense, expert)
