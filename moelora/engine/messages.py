"""What rank 0 asks the other ranks to do: one frozen message class per executor command. A worker runs
`message.apply(executor)`; adding a command is adding a class here and a method to the executor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moelora.engine.executor import Executor, ExecutorPlan
    from moelora.engine.runner import StepInput


@dataclass(frozen=True)
class Init:
    """Build the executor (KV cache, adapter slots) to the plan rank 0 made; the first message."""

    plan: ExecutorPlan


@dataclass(frozen=True)
class Step:
    """Run one engine step's forward pass. `fed_rows`: with async scheduling, the number of ids the
    previous step chose; rank 0 broadcasts them on the device first (the step's `fed` tokens read them)."""

    step: StepInput
    fed_rows: int = 0

    def apply(self, executor: Executor) -> None:
        executor.run_step(self.step, self.fed_rows)


@dataclass(frozen=True)
class Forward:
    """A cacheless forward pass (`LLM.logits`)."""

    ids: list[int]
    seq_lens: tuple[int, ...]

    def apply(self, executor: Executor) -> None:
        executor.run_forward(self.ids, self.seq_lens)


@dataclass(frozen=True)
class WriteSlot:
    """Read the adapter again (this rank's experts only) and write its shards into `slot`; every rank
    answers None or why it could not, and if one could not, all leave the slot empty."""

    slot: int
    name: str
    source: Any  # a folder or a DummyLora (moelora.lora.source.AdapterSource)
    max_rank: int
    fingerprint: tuple[int, ...]

    def apply(self, executor: Executor) -> None:
        executor.write_own_shards(self)


@dataclass(frozen=True)
class ClearSlot:
    slot: int

    def apply(self, executor: Executor) -> None:
        executor.run_clear_slot(self.slot)


@dataclass(frozen=True)
class CopyBlock:
    """Copy a KV block (the last partial block of a prompt shared by n > 1 completions)."""

    src: int
    dst: int

    def apply(self, executor: Executor) -> None:
        executor.run_copy_block(self.src, self.dst)


@dataclass(frozen=True)
class CaptureGraphs:
    """Capture every decode graph now (with adapters too if `lora`): each rank its own, their all-reduces
    inside, at the same moment as rank 0."""

    lora: bool

    def apply(self, executor: Executor) -> None:
        executor.run_capture_graphs(self.lora)


@dataclass(frozen=True)
class UsePlan:
    """Change the process's kernel plan (`ops.plan.use_plan`) and drop the decode graphs captured with the
    old one, on every rank alike."""

    spec: str

    def apply(self, executor: Executor) -> None:
        executor.run_use_plan(self.spec)


@dataclass(frozen=True)
class CopyState:
    """Copy a sequence's linear-attention states to another slot (n > 1 completions of one prompt)."""

    src: int
    dst: int

    def apply(self, executor: Executor) -> None:
        executor.run_copy_state(self.src, self.dst)


@dataclass(frozen=True)
class Stop:
    """Leave the worker loop and exit."""

    def apply(self, executor: Executor) -> None:
        raise AssertionError("Stop ends the worker loop; it is never applied")


Message = (
    Init | Step | Forward | WriteSlot | ClearSlot | CopyBlock | CopyState | CaptureGraphs | UsePlan | Stop
)
