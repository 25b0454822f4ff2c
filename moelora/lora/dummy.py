"""Random adapters made in memory (benchmarks): `DummyLora(rank=16, seed=1)` is served like a PEFT folder.

A dummy adapter is built straight in the canonical form `LoraPool` takes (`LoraAdapter`), for every layer
and the chosen targets, with nonzero A and B so that the LoRA path does real work and changes the output.
It is a pure function of its spec: every rank (and every re-read after a CPU-cache eviction) draws the same
tensors, each from a generator seeded by the spec's seed and the tensor's place.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from moelora.lora.adapter import EXPERT_PROJS, LoraAdapter, LoraWeights, attention_targets, dense_shape
from moelora.models.config import ModelConfig

TARGET_GROUPS = ("attn", "experts", "shared", "mlp")
DEFAULT_TARGETS = ("attn", "experts")
_B_STD = 0.01  # delta W x is then about 1% of W x for a base weight of std 0.02


@dataclass(frozen=True)
class DummyLora:
    """A random adapter of rank `rank` on `targets`: attn (q/k/v/o), experts (every routed expert's
    gate/up/down), shared (the shared expert's), mlp (dense MLP layers'). Scales are folded in (none)."""

    rank: int
    seed: int = 0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"dummy adapter rank must be >= 1, got {self.rank}")
        unknown = sorted(set(self.targets) - set(TARGET_GROUPS))
        if unknown or not self.targets:
            raise ValueError(
                f"dummy adapter targets {list(self.targets)}: choose from {', '.join(TARGET_GROUPS)}"
            )

    def __str__(self) -> str:
        return f"dummy:rank={self.rank},seed={self.seed},targets={'+'.join(self.targets)}"


def parse_targets(text: str) -> tuple[str, ...]:
    """`attn,experts` -> ("attn", "experts"), checked."""
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    DummyLora(1, 0, targets)
    return targets


def make_dummy_adapter(
    name: str,
    spec: DummyLora,
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    owns_expert: Callable[[int], bool] | None = None,
    device: torch.device | None = None,
) -> LoraAdapter:
    """The adapter `spec` describes for the model `cfg`, in `dtype`, in CPU memory; per-expert weights
    only for the experts `owns_expert` accepts (an EP rank's own), all of them by default. Drawn on
    `device` (a GPU draws a full-size adapter in a fraction of a second; every rank uses the same kind)."""
    device = device or torch.device("cpu")
    adapter = LoraAdapter(name, spec, {}, {})
    groups = set(spec.targets)
    for layer in range(cfg.num_layers):
        for target in _dense_targets(groups, cfg, layer):
            in_f, out_f = dense_shape(cfg, target)
            a, b = _draw(spec, f"{layer}/{target}", (), in_f, out_f, dtype, device)
            adapter.dense[(layer, target)] = LoraWeights(a, b)
        if "experts" not in groups or not cfg.moe_layers[layer]:
            continue
        owned = [e for e in range(cfg.num_experts) if owns_expert is None or owns_expert(e)]
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        for proj in EXPERT_PROJS:
            in_f, out_f = (i, h) if proj == "down" else (h, i)
            # One draw for all experts (every rank draws the same), each owned expert's part kept.
            a, b = _draw(spec, f"{layer}/{proj}", (cfg.num_experts,), in_f, out_f, dtype, device)
            if len(owned) < cfg.num_experts:  # do not keep the others' memory alive through views
                a, b = a[owned], b[owned]
            a, b = a.cpu(), b.cpu()
            adapter.experts[(layer, proj)] = {e: LoraWeights(a[j], b[j]) for j, e in enumerate(owned)}
    return adapter


def _dense_targets(groups: set[str], cfg: ModelConfig, layer: int) -> Iterator[str]:
    if "attn" in groups:
        yield from attention_targets(cfg, layer)
    moe = cfg.moe_layers[layer]
    if "mlp" in groups and not moe:
        yield from ("gate_proj", "up_proj", "down_proj")
    if "shared" in groups and moe and cfg.shared_expert_intermediate_size:
        yield from (f"shared_expert.{p}_proj" for p in EXPERT_PROJS)


def _draw(
    spec: DummyLora,
    site: str,
    lead: tuple[int, ...],
    in_f: int,
    out_f: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [*lead, r, in] ~ N(0, 1 / in) (so A x has unit scale), B [*lead, out, r] ~ N(0, _B_STD^2 / r)."""
    seed = ((spec.seed % 2**32) << 32) + zlib.crc32(site.encode())
    g = torch.Generator(device).manual_seed(seed)
    r = spec.rank
    a = torch.randn(*lead, r, in_f, generator=g, dtype=dtype, device=device).mul_(1 / math.sqrt(in_f))
    b = torch.randn(*lead, out_f, r, generator=g, dtype=dtype, device=device).mul_(_B_STD / math.sqrt(r))
    return a.cpu(), b.cpu()
