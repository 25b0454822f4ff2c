"""The engine's adapters: names and slots (the `LoraManager`), reading and validating adapters for this
model, and putting the adapters of a step into device slots through the executor."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from moelora.config import LoraArgs
from moelora.engine.executor import Executor
from moelora.lora.adapter import AdapterError, LoraAdapter
from moelora.lora.dummy import DummyLora
from moelora.lora.manager import AdapterEntry, LoraManager, check_adapter_name
from moelora.lora.pool import check_pool_fits
from moelora.lora.source import AdapterSource, as_source, load_adapter
from moelora.models.decoder import MoeForCausalLM

_LOG = logging.getLogger(__name__)


class EngineAdapters:
    """Adapters of one engine; `manager` is thread safe for names, slots are the loop thread's."""

    def __init__(self, model: MoeForCausalLM, args: LoraArgs, rank: int, free_bytes: int) -> None:
        check_pool_fits(model, args.max_loras_per_batch, rank, free_bytes)
        self.model = model
        self.device: torch.device = next(model.parameters()).device
        self.manager = LoraManager(args.max_loras_per_batch, rank, self._reread, args.max_cpu_loras)

    def read(self, name: str, source: str | Path | DummyLora, max_rank: int | None) -> LoraAdapter:
        """The adapter `source` holds, validated against this model (nothing registered)."""
        m = self.model
        return load_adapter(
            name, as_source(source), m.cfg, m.family, max_rank, dtype=m.dtype, device=self.device
        )

    def _reread(self, name: str, source: AdapterSource, fingerprint: tuple[int, ...]) -> LoraAdapter:
        m = self.model
        return load_adapter(
            name, source, m.cfg, m.family, self.manager.max_rank, fingerprint=fingerprint, dtype=m.dtype,
            device=self.device,
        )  # fmt: skip

    def load(self, name: str, source: str | Path | DummyLora, pinned: bool) -> AdapterEntry:
        """Read, validate and register an adapter; safe while requests run."""
        check_adapter_name(name)
        return self.manager.register(name, self.read(name, source, self.manager.max_rank), pinned)

    # ---------------------------------------------------------------- loop thread

    def acquire(self, entries: list[AdapterEntry], executor: Executor) -> dict[AdapterEntry, AdapterError]:
        """Slots for this step's adapters, written on every rank; the adapters that could not be placed."""
        return self.manager.acquire(entries, executor.write_slot)

    def place_pinned(self, entry: AdapterEntry, running: set[AdapterEntry], executor: Executor) -> None:
        """Give a newly pinned adapter its slot now if one is free or held by an adapter not running."""
        if entry.slot is None and not entry.unloaded and self.manager.fits(running | {entry}):
            for error in self.acquire([*running, entry], executor).values():
                _LOG.error("%s", error)

    def collect(self, executor: Executor) -> None:
        """Free the slots of unloaded adapters no request uses any more."""
        self.manager.collect(executor.clear_slot)
