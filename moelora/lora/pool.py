"""Device slots for adapters: per-layer LoRA buffers laid out as the op contract says, and slot writes.

`S = num_slots` slots, `R = max_rank`. Every target the model declares (`MoeForCausalLM.lora_targets`)
gets zeroed buffers at start (an adapter that does not touch a target leaves zeros there, which add
nothing); a smaller rank is zero-padded to R. Each buffer is sharded like the base weight it modifies, and
the expert buffers hold only this rank's experts (their local ids come from the layer's one expert
placement). The pool writes this rank's shards only: the executor repeats every write on every rank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch

from moelora.layers.linear import ColumnLinear, LoraTarget, RowLinear
from moelora.layers.moe import ExpertsTarget, FusedMoE
from moelora.lora.adapter import LoraAdapter, LoraWeights, check_rank
from moelora.models.decoder import MoeForCausalLM
from moelora.ops.dense_lora import DenseLora
from moelora.ops.expert_lora import ExpertLora

_LOG = logging.getLogger(__name__)


def _shapes(t: LoraTarget | ExpertsTarget, s: int, r: int) -> list[tuple[int, ...]]:
    """The buffer shapes of one target for s slots of rank r: (a, b) of a linear layer, or the experts'
    (a_gu, b_gu, a_dn, b_dn), in the op contract's layout."""
    if isinstance(t, LoraTarget):
        out, inp = t.module.weight.shape
        return [(s, len(t.names), r, inp), (s, out, r)]
    e_loc, h, i_loc = t.module.w_down.shape
    return [(s, e_loc, 2, r, h), (s, e_loc, 2, i_loc, r), (s, e_loc, r, i_loc), (s, e_loc, h, r)]


def pool_bytes(model: MoeForCausalLM, num_slots: int, max_rank: int) -> int:
    """The bytes a pool for `model` would take, computed without allocating it."""
    itemsize = next(model.parameters()).element_size()
    shapes = (shape for t in model.lora_targets() for shape in _shapes(t, num_slots, max_rank))
    return itemsize * sum(math.prod(shape) for shape in shapes)


def check_pool_fits(model: MoeForCausalLM, num_slots: int, max_rank: int, free_bytes: int) -> None:
    """ValueError, with the numbers and the knobs, if the pool needs more than `free_bytes`."""
    need = pool_bytes(model, num_slots, max_rank)
    if need > free_bytes:
        raise ValueError(
            f"adapter slots need {need / 2**30:.2f} GiB ({num_slots} slots of rank {max_rank}) but "
            f"{free_bytes / 2**30:.2f} GiB is free: lower max_loras_per_batch or max_lora_rank"
        )


class LoraPool:
    """Allocates every declared target's adapter buffers once and attaches them to the layers."""

    def __init__(self, model: MoeForCausalLM, num_slots: int, max_rank: int) -> None:
        self.num_slots, self.max_rank = num_slots, max_rank
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self._linears: list[LoraTarget] = []
        self._experts: list[ExpertsTarget] = []
        for t in model.lora_targets():
            buffers = [
                torch.zeros(shape, dtype=self.dtype, device=self.device)
                for shape in _shapes(t, num_slots, max_rank)
            ]
            # Each slot's rank per target (per part for stacked layers): kernels skip the padding above it.
            ranks = (num_slots, len(t.names)) if isinstance(t, LoraTarget) else (num_slots,)
            rank = torch.zeros(ranks, dtype=torch.int32, device=self.device)
            if isinstance(t, LoraTarget):
                a, b = buffers
                t.module.lora = DenseLora(a, b, rank)
                self._linears.append(t)
            else:
                a_gu, b_gu, a_dn, b_dn = buffers
                t.module.lora = ExpertLora(a_gu, b_gu, a_dn, b_dn, rank)
                self._experts.append(t)
        _LOG.info("adapter slots: %d of rank %d, %.1f MiB", num_slots, max_rank, self.num_bytes / 2**20)

    def release(self) -> None:
        """Detach and drop every buffer (the engine has stopped)."""
        for t in self._linears:
            t.module.lora = None
        for e in self._experts:
            e.module.lora = None
        self._linears, self._experts = [], []

    def buffers(self) -> Iterator[torch.Tensor]:
        for t in self._linears:
            assert t.module.lora is not None
            yield t.module.lora.a
            yield t.module.lora.b
        for e in self._experts:
            assert e.module.lora is not None
            yield from (e.module.lora.a_gu, e.module.lora.b_gu, e.module.lora.a_dn, e.module.lora.b_dn)

    @property
    def num_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def clear(self, slot: int) -> None:
        for b in self.buffers():
            b[slot].zero_()
        for t in self._linears:
            assert t.module.lora is not None
            t.module.lora.rank[slot] = 0
        for e in self._experts:
            assert e.module.lora is not None and e.module.lora.rank is not None  # the pool always sets it
            e.module.lora.rank[slot] = 0

    def write(self, slot: int, adapter: LoraAdapter) -> None:
        """Put `adapter` into `slot`: this rank's shards of every target, zeros where it has none."""
        check_rank(adapter.name, adapter.rank, self.max_rank)
        self.clear(slot)
        for t in self._linears:
            lora = t.module.lora
            assert lora is not None
            offset = 0
            for p, name in enumerate(t.names):
                rows = _part_rows(t.module, p)
                w = adapter.dense.get((t.layer, name))
                if w is not None:
                    self._write_linear(lora, slot, p, offset, rows, t.module, w)
                offset += sum(r.stop - r.start for r in rows)
        for e in self._experts:
            self._write_experts(slot, e.layer, e.module, adapter)

    def _write_linear(
        self,
        lora: DenseLora,
        slot: int,
        part: int,
        offset: int,
        rows: tuple[slice, ...],
        module: ColumnLinear | RowLinear,
        w: LoraWeights,
    ) -> None:
        r = w.rank
        lora.rank[slot, part] = r
        if isinstance(module, RowLinear):  # A split on its input columns, B whole
            lora.a[slot, part, :r] = w.A[:, module.cols].to(self.dtype)
            lora.b[slot, :, :r] = w.B.to(self.dtype)
        else:  # A whole, B split on its output rows (gathered from several ranges where the part regroups)
            b = torch.cat([w.B[r_] for r_ in rows])
            lora.a[slot, part, :r] = w.A.to(self.dtype)
            lora.b[slot, offset : offset + b.shape[0], :r] = b.to(self.dtype)

    def _write_experts(self, slot: int, layer: int, moe: FusedMoE, adapter: LoraAdapter) -> None:
        lora = moe.lora
        assert lora is not None and lora.rank is not None  # the pool always sets it
        cols = moe.cols  # this rank's share of the intermediate dimension
        top = 0  # the slot's largest rank among these experts
        for proj in ("gate", "up", "down"):
            by_expert = adapter.experts.get((layer, proj), {})
            for g, w in by_expert.items():
                if not moe.placement.owns(g):
                    continue  # another EP rank's expert: nothing of it is held here
                e, r = moe.placement.local_id(g), w.rank
                top = max(top, r)
                if proj == "down":
                    lora.a_dn[slot, e, :r] = w.A[:, cols].to(self.dtype)
                    lora.b_dn[slot, e, :, :r] = w.B.to(self.dtype)
                else:
                    half = 0 if proj == "gate" else 1
                    lora.a_gu[slot, e, half, :r] = w.A.to(self.dtype)
                    lora.b_gu[slot, e, half, :, :r] = w.B[cols].to(self.dtype)
        lora.rank[slot] = top


def _part_rows(module: ColumnLinear | RowLinear, part: int) -> tuple[slice, ...]:
    """Rows of the full checkpoint weight that part `part` of this rank's output holds, in order."""
    if isinstance(module, RowLinear):
        return (slice(0, module.out),)
    return module.parts[part].ranges
