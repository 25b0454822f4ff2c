"""Adapter names, the CPU cache of loaded adapters, pins, and which adapter sits in which device slot.

Names are looked up from any thread (under a lock); slots are only touched by the engine thread. An entry
lives until it is unloaded *and* no request uses it any more, so unloading never disturbs running requests,
and a new adapter loaded under the same name is a different entry (never mixed with the old one's slot).
"""

from __future__ import annotations

import itertools
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from moelora.lora.adapter import AdapterError, LoraAdapter, check_rank
from moelora.lora.source import AdapterSource

_UIDS = itertools.count(1)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


def check_adapter_name(name: str) -> None:
    """The one rule for adapter names (the API reaches an adapter by name, `SERVED:NAME` too): letters,
    digits and . _ @ + -, starting with a letter or digit, at most 128 characters."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"adapter name {name[:64]!r} is not allowed: use letters, digits and . _ @ + - (starting with a "
            "letter or digit, at most 128 characters)"
        )


_HISTORY_STEPS = 4096


@dataclass(eq=False)
class AdapterEntry:
    name: str
    source: AdapterSource
    rank: int
    pinned: bool
    adapter: LoraAdapter | None  # the CPU copy; None once evicted from the CPU cache (re-read on demand)
    fingerprint: tuple[int, ...] = ()  # of the files first read; a re-read must find the same
    slot: int | None = None
    users: int = 0  # requests (waiting or running) that use this entry
    unloaded: bool = False
    uid: int = field(default_factory=lambda: next(_UIDS))  # never reused: names its cached KV blocks


@dataclass(frozen=True)
class LoraInfo:
    """What `list_loras` reports for one adapter."""

    name: str
    path: str
    rank: int
    pinned: bool
    resident: bool  # holds a device slot now


@dataclass
class LoraStats:
    loads: int = 0  # adapter writes into a device slot
    evictions: int = 0  # adapters pushed out of a device slot to make room
    cpu_evictions: int = 0  # CPU copies dropped (re-read from disk when needed again)
    requests: dict[str, int] = field(default_factory=dict)  # per adapter name


# Writes an adapter into a device slot on every rank (the executor's write_slot); AdapterError if a rank
# could not (then no rank holds it).
SlotWriter = Callable[[int, LoraAdapter], None]


class LoraManager:
    """Bookkeeping only: which adapter holds which slot. Writing a slot is the caller's (the executor's),
    handed to `acquire` and `collect` for that call, never stored here."""

    def __init__(
        self,
        num_slots: int,
        max_rank: int,
        reader: Callable[[str, AdapterSource, tuple[int, ...]], LoraAdapter],
        max_cpu_loras: int | None,
    ) -> None:
        self.num_slots, self.max_rank = num_slots, max_rank
        self.reader, self.max_cpu_loras = reader, max_cpu_loras
        self._lock = threading.Lock()
        self._names: dict[str, AdapterEntry] = {}
        self._slots: list[AdapterEntry | None] = [None] * self.num_slots
        self._lru: OrderedDict[AdapterEntry, None] = OrderedDict()  # slot holders, least recent first
        self._cpu_lru: OrderedDict[AdapterEntry, None] = OrderedDict()  # CPU copies, least recent first
        self.stats = LoraStats()
        # Adapters of each recent step's batch, in the order acquired (bounded: it grows every step).
        self.history: deque[tuple[str, ...]] = deque(maxlen=_HISTORY_STEPS)

    # ---------------------------------------------------------------- any thread

    def register(self, name: str, adapter: LoraAdapter, pinned: bool) -> AdapterEntry:
        check_adapter_name(name)
        with self._lock:
            if name in self._names:
                raise ValueError(
                    f"an adapter named '{name}' is already loaded: unload it first or pick another name"
                )
            if pinned:
                pins = sum(e.pinned for e in self._names.values())
                if pins + 1 > self.num_slots - 1:
                    raise ValueError(
                        f"cannot pin '{name}': {pins} adapters are pinned "
                        "and at most max_loras_per_batch - 1 "
                        f"= {self.num_slots - 1} may be, so that unpinned adapters can still run"
                    )
            check_rank(name, adapter.rank, self.max_rank)
            entry = AdapterEntry(name, adapter.source, adapter.rank, pinned, adapter, adapter.fingerprint)
            self._names[name] = entry
            self._cpu_lru[entry] = None
            self.stats.requests.setdefault(name, 0)
            self._trim_cpu_cache()
            return entry

    def unregister(self, name: str) -> AdapterEntry:
        """Forget the name; requests already using the entry keep it until they finish."""
        with self._lock:
            entry = self._names.pop(name, None)
            if entry is None:
                raise KeyError(f"no adapter named '{name}' is loaded")
            entry.unloaded = True
            self.stats.requests.pop(name, None)  # no metric series outlives its adapter
            return entry

    def use(self, name: str) -> AdapterEntry:
        """The entry a new request runs on (counted until `release`)."""
        with self._lock:
            entry = self._names.get(name)
            if entry is None:
                loaded = ", ".join(sorted(self._names)) or "none"
                raise ValueError(f"unknown adapter '{name}' (loaded adapters: {loaded})")
            entry.users += 1
            self.stats.requests[name] = self.stats.requests.get(name, 0) + 1
            return entry

    def release(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.users -= 1

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._names)

    def cpu_copy(self, name: str) -> LoraAdapter | None:
        """The loaded adapter `name` as held in CPU memory (None if unknown or evicted from the CPU cache)."""
        with self._lock:
            entry = self._names.get(name)
            return entry.adapter if entry is not None else None

    def info(self) -> list[LoraInfo]:
        with self._lock:
            return [
                LoraInfo(e.name, str(e.source), e.rank, e.pinned, e.slot is not None)
                for e in sorted(self._names.values(), key=lambda e: e.name)
            ]

    @property
    def slots_in_use(self) -> int:
        return sum(e is not None for e in self._slots)

    # ---------------------------------------------------------------- engine thread

    def fits(self, batch: Iterable[AdapterEntry]) -> bool:
        """Whether these adapters can share one step: they plus pinned ones holding slots need <= S slots."""
        wanted = set(batch)
        held_by_pins = {e for e in self._slots if e is not None and e.pinned and e not in wanted}
        return len(wanted) + len(held_by_pins) <= self.num_slots

    def acquire(self, batch: Sequence[AdapterEntry], write: SlotWriter) -> dict[AdapterEntry, AdapterError]:
        """Give every adapter of this step a slot (`write` puts it there), evicting least-recently-used
        ones not in the step.

        An adapter that cannot be placed (its files, re-read after a CPU-cache eviction or by another
        rank, are gone or changed) gets no slot and is unloaded; it is returned with the reason, so the
        caller fails its requests while every other request runs on.
        """
        self.history.append(tuple(e.name for e in batch))
        wanted = set(batch)
        failed: dict[AdapterEntry, AdapterError] = {}
        for entry in batch:
            if entry.slot is None:
                try:
                    self._load(entry, wanted, write)
                except AdapterError as e:
                    failed[entry] = e
                    self._drop(entry)
                    continue
            self._lru.move_to_end(entry)
        return failed

    def _drop(self, entry: AdapterEntry) -> None:
        """Unload a broken adapter: its name is free again, its requests fail, its CPU copy goes."""
        with self._lock:
            if self._names.get(entry.name) is entry:
                del self._names[entry.name]
                self.stats.requests.pop(entry.name, None)
            entry.unloaded = True
            self._cpu_lru.pop(entry, None)
            entry.adapter = None

    def _load(self, entry: AdapterEntry, wanted: set[AdapterEntry], write: SlotWriter) -> None:
        slot = next((i for i, e in enumerate(self._slots) if e is None), None)
        if slot is None:
            victim = next((e for e in self._lru if e not in wanted and not e.pinned), None)
            if victim is None:
                raise AssertionError("no adapter slot can be freed: the scheduler admitted too many adapters")
            slot = self._evict(victim)
            self.stats.evictions += 1
        adapter = entry.adapter
        if adapter is None:  # dropped from the CPU cache: read it again
            adapter = self.reader(entry.name, entry.source, entry.fingerprint)
            with self._lock:
                entry.adapter = adapter
                self._cpu_lru[entry] = None
                self._trim_cpu_cache(keep=entry)
        write(slot, adapter)
        self._slots[slot], entry.slot = entry, slot
        self._lru[entry] = None
        self.stats.loads += 1
        with self._lock:
            if entry in self._cpu_lru:
                self._cpu_lru.move_to_end(entry)

    def _evict(self, entry: AdapterEntry) -> int:
        slot = entry.slot
        assert slot is not None
        self._slots[slot], entry.slot = None, None
        self._lru.pop(entry, None)
        return slot

    def collect(self, clear: Callable[[int], None]) -> None:
        """Free the slots (`clear` empties one) and CPU copies of unloaded adapters no request uses."""
        for entry in [e for e in self._lru if e.unloaded and e.users == 0]:
            clear(self._evict(entry))
        with self._lock:
            for entry in [e for e in self._cpu_lru if e.unloaded and e.users == 0]:
                self._cpu_lru.pop(entry)
                entry.adapter = None

    def _trim_cpu_cache(self, keep: AdapterEntry | None = None) -> None:
        """Drop the least recently used CPU copies beyond max_cpu_loras (never a pinned one). Lock held."""
        if self.max_cpu_loras is None:
            return
        for entry in list(self._cpu_lru):
            if len(self._cpu_lru) <= self.max_cpu_loras:
                return
            if entry is keep or entry.pinned:
                continue
            self._cpu_lru.pop(entry)
            entry.adapter = None
            self.stats.cpu_evictions += 1
