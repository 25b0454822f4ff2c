"""Compute ops with one signature each; the backend is chosen here and nowhere else.

Every op has a PyTorch implementation in `ops/torch/` (the CPU path and the test oracle); GPU kernels in
`ops/triton/` share the signature. Model code calls these functions and never imports Triton.

Backend: the `kernel_backend` setting (`--kernel-backend`, `LLM(kernel_backend=...)`), applied once per
process by `use_backend` when an LLM or a worker starts. auto: Triton when the tensors are on CUDA and
Triton imports, the PyTorch twin otherwise; torch: the twins everywhere; triton: the kernels everywhere
(CPU tensors then need `TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import overload

import torch

from moelora.ops.cache_write import CacheWrite
from moelora.ops.dense_lora import DenseLora, GivenShrink
from moelora.ops.expert_extras import ExpertExtras
from moelora.ops.expert_lora import ExpertLora
from moelora.ops.fp8 import RowScales
from moelora.ops.input_norm import InputNorm
from moelora.ops.norm_router import NormRouter
from moelora.ops.plan import TUNED, KernelPlan
from moelora.ops.torch import activation as _torch_activation
from moelora.ops.torch import align as _torch_align
from moelora.ops.torch import attention as _torch_attention
from moelora.ops.torch import delta as _torch_delta
from moelora.ops.torch import lora as _torch_lora
from moelora.ops.torch import mla as _torch_mla
from moelora.ops.torch import moe as _torch_moe
from moelora.ops.torch import norm as _torch_norm
from moelora.ops.torch import rotary as _torch_rotary
from moelora.ops.torch import router as _torch_router
from moelora.ops.torch import sample as _torch_sample

BACKENDS = ("auto", "torch", "triton")
_BACKEND = "auto"  # this process's choice; only `use_backend` sets it


def use_backend(name: str) -> None:
    """Run every op of this process on `name` (one of BACKENDS): the `kernel_backend` setting, applied
    when an LLM or a worker starts. One process serves one choice: a second LLM with another one replaces
    it for both."""
    global _BACKEND  # the one process-wide choice (see the module docstring)
    if name not in BACKENDS:
        raise ValueError(f"kernel_backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name != _BACKEND:
        _triton_module.cache_clear()  # "triton" must raise where Triton does not import
    _BACKEND = name


@functools.cache
def _triton_module(name: str) -> ModuleType | None:
    """`moelora.ops.triton.<name>`, or None where Triton does not import (then the twin runs)."""
    try:
        return importlib.import_module(f"moelora.ops.triton.{name}")
    except ImportError:
        if _BACKEND == "triton":
            raise
        return None


def _kernels(name: str, t: torch.Tensor) -> ModuleType | None:
    """The Triton module to run for tensors like `t`, None for the PyTorch twin."""
    if _BACKEND == "torch" or (_BACKEND == "auto" and not t.is_cuda):
        return None
    return _triton_module(name)


def graph_safe(t: torch.Tensor) -> bool:
    """Whether every op on tensors like `t` runs a kernel that is CUDA-graph safe (the Triton ones: on
    CUDA, in fp16/bf16, with Triton importable and not forced off)."""
    return _kernels("moe", t) is not None and _half_kernels("attention", t) is not None


def _half_kernels(name: str, t: torch.Tensor, *others: torch.Tensor) -> ModuleType | None:
    """Triton `name` for fp16/bf16 CUDA tensors, `others` in t's dtype. fp32 stays on the twin (the
    kernels' fp32 path is checked only in the interpreter) unless the backend is triton."""
    mod = _kernels(name, t)
    # (bf16 or fp16; note `torch` in this module is the moelora.ops.torch package once it is imported)
    half = t.element_size() == 2 and all(o.dtype == t.dtype for o in others)
    if mod is not None and _BACKEND == "auto" and not half:
        return None
    return mod


def moe_align(
    local_ids: torch.Tensor, token_slot: torch.Tensor | None, num_experts: int, num_slots: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs grouped by local expert, slot-sorted, padded; see `moelora.ops.torch.align.moe_align`."""
    mod = _kernels("align", local_ids)
    impl = mod.moe_align if mod is not None else _torch_align.moe_align
    return impl(local_ids, token_slot, num_experts, num_slots, block_m)


def race_argmax(
    x: torch.Tensor, top: torch.Tensor, temperature: torch.Tensor, row_hashes: torch.Tensor, from_logits: bool
) -> torch.Tensor:
    """The sampler's draw, an exponential race per row; see `moelora.ops.torch.sample.race_argmax`."""
    mod = _kernels("sample", x)
    impl = mod.race_argmax if mod is not None else _torch_sample.race_argmax
    return impl(x, top, temperature, row_hashes, from_logits)


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, fp32_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's top-k experts and weights; see `moelora.ops.torch.router.route`."""
    mod = _half_kernels("router", router_logits)
    impl = mod.route if mod is not None else _torch_router.route
    return impl(router_logits, top_k, renormalize, fp32_weights)


def router(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool, fp32_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's linear layer and its top-k; see `moelora.ops.torch.router.router`."""
    mod = _half_kernels("router", x, weight)
    impl = mod.router if mod is not None else _torch_router.router
    return impl(x, weight, top_k, renormalize, fp32_weights)


def add_norm_router(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight_first: bool,
    weight: torch.Tensor,
    top_k: int,
    renormalize: bool,
    fp32_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual add, RMSNorm and the router -> (weights, ids, normed input, next residual); see
    `moelora.ops.torch.router.add_norm_router`."""
    mod = _half_kernels("router", x, residual, weight)
    impl = mod.add_norm_router if mod is not None else _torch_router.add_norm_router
    return impl(x, residual, norm_weight, eps, weight_first, weight, top_k, renormalize, fp32_weights)


def write_latent(
    latent: torch.Tensor,
    k_rot: torch.Tensor,
    latent_cache: torch.Tensor,
    rot_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store latent-attention keys in the paged cache; see `moelora.ops.torch.mla.write_latent` (PyTorch
    on every device)."""
    _torch_mla.write_latent(latent, k_rot, latent_cache, rot_cache, slot_mapping)


def gather_latents(
    latent_cache: torch.Tensor, rot_cache: torch.Tensor, block_tables: torch.Tensor, kv_lens: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence's cached latents; see `moelora.ops.torch.mla.gather_latents` (PyTorch)."""
    return _torch_mla.gather_latents(latent_cache, rot_cache, block_tables, kv_lens)


def latent_decode(
    q_lat: torch.Tensor,
    q_rot: torch.Tensor,
    latent_cache: torch.Tensor,
    rot_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_lens: tuple[int, ...],
    scale: float,
    kv_lens_dev: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention in the latent space (absorbed form); see `moelora.ops.torch.mla.latent_decode`.
    `kv_lens_dev`: kv_lens as int32 on the device, for the Triton kernel (no per-layer copy)."""
    mod = _half_kernels("mla", q_lat, latent_cache)
    if mod is None:
        return _torch_mla.latent_decode(q_lat, q_rot, latent_cache, rot_cache, block_tables, kv_lens, scale)
    lens = kv_lens_dev if kv_lens_dev is not None else mod.device_lens(kv_lens, q_lat.device)
    return mod.latent_decode(q_lat, q_rot, latent_cache, rot_cache, block_tables[: len(kv_lens)], lens, scale)


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, seq_lens: tuple[int, ...], initial: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear-attention layer's causal convolution over whole sequences; see
    `moelora.ops.torch.delta.causal_conv`."""
    mod = _half_kernels("delta_prefill", x, weight)
    impl = mod.causal_conv if mod is not None else _torch_delta.causal_conv
    return impl(x, weight, seq_lens, initial)


def causal_conv_step(
    x: torch.Tensor, weight: torch.Tensor, states: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """One token of each sequence through the causal convolution, its state in place; see
    `moelora.ops.torch.delta.causal_conv_step`."""
    mod = _half_kernels("delta", x, weight)
    impl = mod.causal_conv_step if mod is not None else _torch_delta.causal_conv_step
    return impl(x, weight, states, slots)


def delta_gates(
    a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule's log decay and write strength from a and b, one launch; see
    `moelora.ops.torch.delta.delta_gates`."""
    mod = _half_kernels("delta", b, a)
    impl = mod.delta_gates if mod is not None else _torch_delta.delta_gates
    return impl(a, b, a_log, dt_bias)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    seq_lens: tuple[int, ...],
    initial: torch.Tensor | None = None,
    plan: KernelPlan = TUNED,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over whole sequences; see `moelora.ops.torch.delta.gated_delta_rule` (the
    Triton kernel takes the sequences in chunks, `plan.delta`)."""
    mod = _half_kernels("delta_prefill", v, q, k)
    if mod is None:
        return _torch_delta.gated_delta_rule(q, k, v, g, beta, seq_lens, initial)
    return mod.gated_delta_rule(q, k, v, g, beta, seq_lens, initial, plan)


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """One token of each sequence through the gated delta rule, its state in place; see
    `moelora.ops.torch.delta.gated_delta_step`."""
    mod = _half_kernels("delta", v, q, k)
    impl = mod.gated_delta_step if mod is not None else _torch_delta.gated_delta_step
    return impl(q, k, v, g, beta, states, slots)


def delta_step_with_gates(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    a_log: torch.Tensor,
    dt_bias: torch.Tensor,
    states: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """`delta_gates` from the projections a, b [B, Hv], then `gated_delta_step`: one launch on the GPU
    (each program of the step finds its head's gates)."""
    mod = _half_kernels("delta", v, q, k)
    if mod is not None and _half_kernels("delta", b, a) is not None:
        return mod.delta_step_with_gates(q, k, v, a, b, a_log, dt_bias, states, slots)
    g, beta = delta_gates(a, b, a_log, dt_bias)
    return gated_delta_step(q, k, v, g, beta, states, slots)


def mla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: tuple[int, ...],
    kv_lens: tuple[int, ...],
    scale: float,
) -> torch.Tensor:
    """Causal attention over expanded latents (prefill); see `moelora.ops.torch.mla.mla_attention`."""
    mod = _half_kernels("attention", q, k, v)
    impl = mod.mla_attention if mod is not None else _torch_mla.mla_attention
    return impl(q, k, v, seq_lens, kv_lens, scale)


def grouped_router(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores, a correction bias and group-limited top-k (DeepSeek-V3, GLM-4.5); see
    `moelora.ops.torch.router.grouped_router`."""
    mod = _half_kernels("router", x)
    impl = mod.grouped_router if mod is not None else _torch_router.grouped_router
    return impl(x, weight, bias, top_k, groups, topk_groups, renormalize, scaling)


def softmax_grouped_router(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, groups: int, topk_groups: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax scores and group-limited top-k (DeepSeek-V2); see
    `moelora.ops.torch.router.softmax_grouped_router`."""
    mod = _half_kernels("router", x)
    impl = mod.softmax_grouped_router if mod is not None else _torch_router.softmax_grouped_router
    return impl(x, weight, top_k, groups, topk_groups, scaling)


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    plan: KernelPlan = TUNED,
    extras: ExpertExtras | None = None,
) -> torch.Tensor:
    """Routed-expert MLP; see `moelora.ops.torch.moe.fused_moe` for the exact semantics. `plan`: the
    kernels' tiles and variants (`ops/plan.py`; the twin has none). `extras`: GPT-OSS's biases and
    activation, FP8 weights' scales (`ExpertExtras`)."""
    mod = _kernels("moe", x)
    if mod is None:
        return _torch_moe.fused_moe(x, w_gate_up, w_down, local_ids, weights, extras)
    return mod.fused_moe(x, w_gate_up, w_down, local_ids, weights, plan, extras)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: tuple[int, ...],
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention within each sequence; see `moelora.ops.torch.attention.prefill_attention`
    (`sinks`: GPT-OSS's)."""
    mod = _half_kernels("attention", q, k)
    impl = mod.prefill_attention if mod is not None else _torch_attention.prefill_attention
    return impl(q, k, v, seq_lens, scale, window, sinks)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values in the paged cache; see `moelora.ops.torch.attention.write_kv`."""
    mod = _half_kernels("kv_write", k, k_cache)
    impl = mod.write_kv if mod is not None else _torch_attention.write_kv
    impl(k, v, k_cache, v_cache, slot_mapping)


@overload
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: None = None, weight_first: bool = False
) -> torch.Tensor: ...


@overload
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor, weight_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor]: ...


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    weight_first: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm, after the residual add when given; see `moelora.ops.torch.norm.rms_norm`."""
    mod = _half_kernels("norm", x)
    impl = mod.rms_norm if mod is not None else _torch_norm.rms_norm
    return impl(x, weight, eps, residual, weight_first)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The dense MLP's silu(gate) * up from its stacked gate/up output; see
    `moelora.ops.torch.activation.silu_mul`."""
    mod = _half_kernels("activation", gate_up)
    impl = mod.silu_mul if mod is not None else _torch_activation.silu_mul
    return impl(gate_up)


def add_gated(base: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """base + sigmoid(gate) * x (the gated shared expert's add); see
    `moelora.ops.torch.activation.add_gated`."""
    mod = _half_kernels("activation", base, x, gate)
    impl = mod.add_gated if mod is not None else _torch_activation.add_gated
    return impl(base, x, gate)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm times silu(gate) (linear attention's output norm); see
    `moelora.ops.torch.norm.gated_rms_norm`."""
    mod = _half_kernels("norm", x, gate)
    impl = mod.gated_rms_norm if mod is not None else _torch_norm.gated_rms_norm
    return impl(x, gate, weight, eps)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: CacheWrite | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k, and with `cache` the step's keys and values stored in the paged cache;
    see `moelora.ops.torch.rotary.rotary`."""
    mod = _rotary_kernels(q, k, cos, cache)
    impl = mod.rotary if mod is not None else _torch_rotary.rotary
    return impl(q, k, cos, sin, cache)


def _rotary_kernels(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, cache: CacheWrite | None
) -> ModuleType | None:
    """The rotary kernels where both the rotary and (with a cache) the KV write would run on Triton."""
    mod = _half_kernels("rotary", q, k, cos)
    if cache is not None and _half_kernels("kv_write", k, cache.k_cache) is None:
        return None
    return mod


def qk_norm_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: CacheWrite | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head q/k RMSNorm, then rotary embedding (and the cache write with `cache`); see
    `moelora.ops.torch.rotary.qk_norm_rotary`."""
    mod = _rotary_kernels(q, k, cos, cache)
    impl = mod.qk_norm_rotary if mod is not None else _torch_rotary.qk_norm_rotary
    return impl(q, k, q_weight, k_weight, eps, cos, sin, cache)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: tuple[int, ...],
    kv_lens: tuple[int, ...],
    scale: float,
    window: int | None,
    kv_lens_dev: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the paged cache; see `moelora.ops.torch.attention.paged_attention`.

    `kv_lens_dev`: kv_lens as an int32 tensor on q's device, built once per step, so that the GPU
    decode path needs no per-layer copy of the lengths (the twin does not need it). `sinks`: GPT-OSS's."""
    mod = _half_kernels("attention", q, k_cache)
    if mod is None:
        return _torch_attention.paged_attention(
            q, k_cache, v_cache, block_tables, seq_lens, kv_lens, scale, window, sinks
        )
    return mod.paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens, kv_lens, scale, window, kv_lens_dev, sinks
    )


def fuses_rotary_decode(
    q: torch.Tensor, k: torch.Tensor, cache: CacheWrite, seq_lens: tuple[int, ...], plan: KernelPlan = TUNED
) -> bool:
    """Whether a step's attention runs as `rotary_decode_attention`: a decode step (one new token a
    sequence) on the Triton kernels with `KernelPlan.rotary_in_decode`; elsewhere the caller runs the
    separate ops (q/k norm, rotary, `write_kv`, `paged_attention`)."""
    return (
        plan.rotary_in_decode
        and max(seq_lens) == 1
        and _half_kernels("attention", q, k, cache.k_cache) is not None
    )


def rotary_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor, float, bool] | None,
    cache: CacheWrite,
    block_tables: torch.Tensor,
    seq_lens: tuple[int, ...],
    kv_lens: tuple[int, ...],
    scale: float,
    window: int | None,
    kv_lens_dev: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    o_shrink: GivenShrink | None = None,
) -> torch.Tensor:
    """A decode step's attention with what comes before it in one launch, where `fuses_rotary_decode` says
    so (elsewhere a ValueError). q [B, Hq, D], k [B, Hkv, D] before the per-head q/k RMSNorm (norm = (q
    weight, k weight, eps, weight_first as `rms_norm`'s) or None) and the rotary embedding of their first
    R features (cos, sin [B, R]: partial rotary where R < D); the step's keys and values stored in `cache`
    (as `write_kv`); then `paged_attention`. With `o_shrink` (from `decode_o_shrink`) the launch also
    writes the output projection's LoRA shrink of the result into its xa, for `linear` to take."""
    mod = _half_kernels("attention", q, k, cache.k_cache)
    if mod is None:
        raise ValueError("rotary_decode_attention: the Triton kernels only (see `fuses_rotary_decode`)")
    return mod.rotary_decode(
        q, k, cos, sin, norm, cache, block_tables, seq_lens, kv_lens, scale, window, kv_lens_dev, sinks,
        o_shrink,
    )  # fmt: skip


def decode_o_shrink(
    q: torch.Tensor,
    kv_heads: int,
    weight: torch.Tensor,
    lora: DenseLora | None,
    token_slot: torch.Tensor | None,
    scales: RowScales | None = None,
    plan: KernelPlan = TUNED,
) -> GivenShrink | None:
    """Where `rotary_decode_attention` on q [B, Hq, D] (over kv_heads KV heads) should also compute the LoRA
    shrink of the output projection after it (weight [out, Hq * D], its adapter slots `lora` with one part
    and FP8 `scales`): its `o_shrink` argument, xa allocated, which `linear` then takes; else None (no
    adapters in the batch, more sequences than `KernelPlan.o_shrink_tokens`, an o that would not take it,
    or a rank the attention launch cannot hold: `attn_decode.o_shrink_fits`)."""
    mod = _kernels("linear", q)
    if lora is None or token_slot is None or mod is None or q.shape[0] > plan.o_shrink_tokens:
        return None
    rank = lora.a.shape[2]
    x = q.reshape(q.shape[0], -1)  # o's input (a view on a decode step's q)
    one_launch = _one_launch(x, weight, scales)
    fp8 = scales is not None
    if lora.a.shape[1] != 1 or not mod.takes_shrink(x, rank, (weight.shape[0],), one_launch, plan, fp8):
        return None
    attn = _triton_module("attn_decode")
    return None if attn is None else attn.o_shrink_for(q, kv_heads, lora, token_slot)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: DenseLora | None,
    token_slot: torch.Tensor | None,
    sizes: tuple[int, ...],
    scales: RowScales | None = None,
    plan: KernelPlan = TUNED,
    xa: torch.Tensor | None = None,
) -> torch.Tensor:
    """A layer adapters may modify, plus its tokens' adapter deltas; see `moelora.ops.torch.lora.linear`
    (`scales`: an FP8 weight's). On the GPU a few tokens in fp16/bf16 take one launch for all of it
    (`ops/triton/linear.py`), with or without adapters, FP8 weights scaled in registers; more run cuBLAS
    (an FP8 weight: a Triton GEMM, or for long prefills a 16-bit copy for cuBLAS), and the dense LoRA kernels
    if the batch has adapters. xa: the LoRA shrink computed by the kernel before (`add_norm_shrink` where
    `shrink_chunk` said so, `rotary_decode_attention` where `decode_o_shrink` did): the same delta, its
    shrink computed earlier. The twin never gets one (neither says so there) and computes its own."""
    mod = _kernels("linear", x)
    if mod is None:
        return _torch_lora.linear(x, weight, bias, lora, token_slot, sizes, scales)
    one_launch = _one_launch(x, weight, scales)
    return mod.linear_layer(x, weight, bias, lora, token_slot, sizes, one_launch, plan, scales, xa)


def norm_linear(
    x: torch.Tensor,
    norm: InputNorm,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: DenseLora | None,
    token_slot: torch.Tensor | None,
    sizes: tuple[int, ...],
    scales: RowScales | None = None,
    plan: KernelPlan = TUNED,
    xa: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RMSNorm before a layer adapters may modify, then the layer -> (y, s); see
    `moelora.ops.torch.lora.norm_linear`. On the GPU the layer's one launch runs the norm too where
    `norms_input` says (`KernelPlan.norm_linear_tokens`); otherwise `rms_norm`, then `linear`. xa: as
    `linear`'s, of the norm's output (`norm_shrink`)."""
    mod = _kernels("linear", x)
    if mod is None:
        return _torch_lora.norm_linear(x, norm, weight, bias, lora, token_slot, sizes, scales)
    one_launch = _one_launch(x, weight, scales)
    return mod.norm_linear_layer(x, norm, weight, bias, lora, token_slot, sizes, one_launch, plan, scales, xa)


def norms_input(
    x: torch.Tensor,
    norm: InputNorm,
    weight: torch.Tensor,
    lora: DenseLora | None,
    sizes: tuple[int, ...],
    scales: RowScales | None = None,
    plan: KernelPlan = TUNED,
) -> bool:
    """Whether `norm_linear` runs the norm inside the layer's launch (then the norm's launch before it, if
    any, computes only the adapters' shrink: `norm_shrink`). The same answer with or without adapters in
    the batch."""
    mod = _kernels("linear", x)
    if mod is None:
        return False
    lanes = 0 if lora is None else lora.a.shape[1] * lora.a.shape[2]
    return bool(
        mod.norms_input(x, norm, lanes, sizes, _one_launch(x, weight, scales), plan, scales is not None)
    )


def linear_norm_router(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: DenseLora | None,
    token_slot: torch.Tensor | None,
    route: NormRouter,
    scales: RowScales | None = None,
    plan: KernelPlan = TUNED,
    xa: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear layer with one output part, then the norm and the router after it -> (weights, ids, h, s);
    see `moelora.ops.torch.router.linear_norm_router`. On the GPU a few tokens whose layer takes its one
    launch run all three there (`KernelPlan.o_router_tokens`); otherwise `linear`, then `add_norm_router`.
    xa: as `linear`'s."""
    mod = _kernels("linear", x)
    sizes = (weight.shape[0],)
    lanes = 0 if lora is None else lora.a.shape[1] * lora.a.shape[2]
    if (
        mod is not None
        and _one_launch(x, weight, scales)
        and _half_kernels("router", x, route.residual, route.weight) is not None
        and mod.fits(x, lanes, sizes, plan, scales is not None)
        and mod.routes(x, weight, sizes, route, plan)
    ):
        args = None if lora is None or token_slot is None else (lora.a, lora.b, lora.rank, token_slot)
        given = xa if args is not None else None
        return mod.linear_norm_router(x, weight, bias, args, sizes, route, plan, scales, given)
    y = linear(x, weight, bias, lora, token_slot, sizes, scales, plan, xa)
    return add_norm_router(y, *route)


def _one_launch(x: torch.Tensor, weight: torch.Tensor, scales: RowScales | None) -> bool:
    same = () if scales is not None else (weight,)  # an FP8 weight is not in x's dtype
    return _half_kernels("linear", x, *same) is not None


def shrink_chunk(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora: DenseLora | None,
    token_slot: torch.Tensor | None,
    sizes: tuple[int, ...],
    scales: RowScales | None = None,
    plan: KernelPlan = TUNED,
) -> int:
    """Where `linear` on input x would take its LoRA shrink from the norm before it (`add_norm_shrink`):
    the chunk of input columns to give that norm, else 0 (the twin, no adapters in the batch, more tokens
    than `KernelPlan.norm_shrink_tokens`, or a shrink the one launch folds into its GEMV)."""
    mod = _kernels("linear", x)
    if lora is None or token_slot is None or mod is None:
        return 0
    group = None if scales is None else scales.group
    return mod.shrink_chunk(x, lora, sizes, _one_launch(x, weight, scales), plan, group)


def add_norm_shrink(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor,
    weight_first: bool,
    lora: DenseLora,
    token_slot: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rms_norm` with a residual, and the LoRA shrink of the linear layer after it in the same launch;
    see `moelora.ops.torch.norm.add_norm_shrink`."""
    mod = _half_kernels("norm", x)
    impl = mod.add_norm_shrink if mod is not None else _torch_norm.add_norm_shrink
    return impl(x, weight, eps, residual, weight_first, lora, token_slot, chunk)


def norm_shrink(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor,
    weight_first: bool,
    lora: DenseLora,
    token_slot: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """`add_norm_shrink`'s xa alone (nothing else stored), for a layer that normalises its input itself
    (`norms_input`); see `moelora.ops.torch.norm.norm_shrink`."""
    mod = _half_kernels("norm", x)
    impl = mod.norm_shrink if mod is not None else _torch_norm.norm_shrink
    return impl(x, weight, eps, residual, weight_first, lora, token_slot, chunk)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    token_slot: torch.Tensor,
    slot_rank: torch.Tensor | None = None,
    plan: KernelPlan = TUNED,
) -> None:
    """Dense multi-LoRA added in place; see `moelora.ops.torch.lora.add_lora`."""
    mod = _kernels("lora", x)
    if mod is None:
        _torch_lora.add_lora(y, x, a, b, token_slot, slot_rank)
    else:
        mod.add_lora(y, x, a, b, token_slot, slot_rank, plan)


def add_lora_parts(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    token_slot: torch.Tensor,
    sizes: tuple[int, ...],
    slot_rank: torch.Tensor | None = None,
    plan: KernelPlan = TUNED,
) -> None:
    """Dense multi-LoRA of stacked output parts (q/k/v); see `moelora.ops.torch.lora.add_lora_parts`."""
    mod = _kernels("lora", x)
    if mod is None:
        _torch_lora.add_lora_parts(y, x, a, b, token_slot, sizes, slot_rank)
    else:
        mod.add_lora_parts(y, x, a, b, token_slot, sizes, slot_rank, plan)


def fused_moe_lora(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    token_slot: torch.Tensor,
    lora: ExpertLora,
    plan: KernelPlan = TUNED,
    extras: ExpertExtras | None = None,
) -> torch.Tensor:
    """Routed experts with per-expert LoRA; see `moelora.ops.torch.lora.fused_moe_lora` (`extras`: as
    `fused_moe`'s)."""
    mod = _kernels("moe", x)
    if mod is None:
        return _torch_lora.fused_moe_lora(x, w_gate_up, w_down, local_ids, weights, token_slot, lora, extras)
    return mod.fused_moe_lora(x, w_gate_up, w_down, local_ids, weights, token_slot, lora, plan, extras)
