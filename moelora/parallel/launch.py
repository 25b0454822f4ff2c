"""Processes for tensor and expert parallelism and the channel between them: rank 0 (the driver)
starts and drives ranks 1..tp_size-1.

`WorkerGroup.start` spawns the workers (`moelora.engine.worker.main`) or, under `torchrun`, joins
the processes torchrun started; it sets up the process groups (gloo on CPU, NCCL on GPU for the model's
collectives; a gloo group for control messages) and hands back rank 0's `ParallelState`. The driver
broadcasts messages (`send`) and gathers answers (`gather`); a worker's `WorkerChannel` receives and
answers them. What the messages are and do is the executor's business (`moelora.engine`), not this
module's: it only moves them.

A worker that fails prints its traceback and exits non-zero; the driver then fails with an error naming
that rank instead of hanging (gloo reports the closed connection; every group has a timeout besides).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from moelora.parallel.state import ParallelState

_LOG = logging.getLogger(__name__)
_RENDEZVOUS_TIMEOUT_S = 120
T = TypeVar("T")
# A worker process: `python -c` with this, then SPEC_JSON RANK PORT (the package imports the worker module,
# so `python -m` would run a second copy of it).
_WORKER_MAIN = "import sys; from moelora.engine.worker import main; main(sys.argv[1:])"


class WorkerError(RuntimeError):
    """A worker process failed or died; the group cannot run another step."""


@dataclass(frozen=True)
class LaunchSpec:
    """What every rank needs to build its share of the model."""

    model_path: str
    dtype: str
    device_type: str  # "cpu" or "cuda"
    tp_size: int
    ep_size: int
    seed: int = 0
    threads: int = 1  # torch threads per worker on CPU
    timeout_s: float = 600.0  # a collective that waits longer than this fails
    load_format: str = "auto"
    hf_overrides: dict[str, Any] | None = None
    kernel_backend: str = "auto"
    quantization: str = "auto"


def backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def groups(spec: LaunchSpec) -> tuple[Any, Any]:
    """The model's TP group and the gloo control group; every rank creates them in the same order."""
    timeout = datetime.timedelta(seconds=spec.timeout_s)
    ranks = list(range(spec.tp_size))
    tp_group = dist.new_group(ranks, timeout=timeout, backend=backend(spec.device_type))
    ctrl = dist.new_group(ranks, timeout=timeout, backend="gloo")
    return tp_group, ctrl


def device_for(spec: LaunchSpec, rank: int) -> torch.device:
    if spec.device_type == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def torchrun_rank(tp_size: int) -> int | None:
    """This process's rank when it was started by torchrun for `tp_size` ranks, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "RANK" not in os.environ:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp_size:
        raise ValueError(
            f"torchrun started {world} processes but tp_size is {tp_size}: start one process per TP rank "
            f"(--nproc-per-node x --nnodes = {tp_size})"
        )
    return int(os.environ["RANK"])


class WorkerGroup:
    """Rank 0's handle on the workers: broadcast commands, notice failures, shut them down."""

    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self.lock = threading.Lock()  # one command and its collectives at a time
        self._procs: list[subprocess.Popen[bytes]] = []
        self._store: Any = None
        self._ctrl: Any = None
        self._closed = False
        self.ps: ParallelState

    @classmethod
    def start(cls, spec: LaunchSpec) -> WorkerGroup:
        """Start (or, under torchrun, join) the workers; rank 0's ParallelState is `.ps`.

        Workers are fresh interpreters (`moelora.engine.worker.main`), so scripts need no
        `if __name__ == "__main__"` guard and notebooks work. They report through the rendezvous store:
        `hello/r` once running, `ready/r` once their share is loaded, `error/r` with the reason if not.
        """
        ParallelState(0, spec.tp_size, spec.ep_size)  # the layout errors, before any process starts
        group = cls(spec)
        rendezvous = datetime.timedelta(seconds=_RENDEZVOUS_TIMEOUT_S)
        kind = backend(spec.device_type)
        if torchrun_rank(spec.tp_size) is not None:
            dist.init_process_group(kind, timeout=rendezvous)
        else:
            port = _free_port()
            group._store = dist.TCPStore(
                "127.0.0.1", port, spec.tp_size, is_master=True, timeout=rendezvous, wait_for_workers=False
            )
            env = dict(os.environ)
            root = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
            spec_json = json.dumps(dataclasses.asdict(spec))
            for rank in range(1, spec.tp_size):
                cmd = [sys.executable, "-c", _WORKER_MAIN, spec_json, str(rank), str(port)]
                group._procs.append(subprocess.Popen(cmd, env=env))
            try:
                group._wait_for("hello")
                dist.init_process_group(
                    kind, store=group._store, rank=0, world_size=spec.tp_size, timeout=rendezvous
                )
            except BaseException:
                group.shutdown()
                raise
        tp_group, group._ctrl = groups(spec)
        group.ps = ParallelState(0, spec.tp_size, spec.ep_size, tp_group)
        return group

    def _wait_for(self, state: str) -> None:
        """Block until every worker has set `state/rank` in the store; raise as soon as one fails."""
        pending = set(range(1, len(self._procs) + 1))
        while pending:
            dead = self._dead()
            if dead:
                raise WorkerError(dead)
            pending = {r for r in pending if not self._store.check([f"{state}/{r}"])}
            if pending:
                time.sleep(0.05)

    def wait_ready(self) -> None:
        """Block until every worker has loaded its share of the model; raise if one failed."""
        if self._store is not None:
            self._wait_for("ready")

    def _dead(self) -> str | None:
        """A message naming the first worker that has exited (with the reason it reported, if any), else
        None. Cheap when all are alive (one waitpid each): it runs before every command."""
        for rank, proc in enumerate(self._procs, start=1):
            code = proc.poll()
            if code is not None:
                key = f"error/{rank}"
                reported = self._store is not None and self._store.check([key])
                detail = self._store.get(key).decode() if reported else "see its output above"
                return f"worker rank {rank} exited with code {code}: {detail}"
        return None

    def send(self, message: Any) -> None:
        """Broadcast one message to every worker (hold `lock` across it and the collectives after it)."""
        if self._closed:
            raise WorkerError("the worker group has been shut down")
        dead = self._dead()
        if dead:
            raise WorkerError(dead)
        self.checked(lambda: dist.broadcast_object_list([message], src=0, group=self._ctrl))

    def gather(self, mine: Any) -> list[Any]:
        """Every rank's answer to the last command (rank 0's is `mine`), in rank order."""
        answers: list[Any] = [None] * self.spec.tp_size
        dist.all_gather_object(answers, mine, group=self._ctrl)
        return answers

    def checked(self, fn: Callable[[], T]) -> T:
        """Run `fn` (which meets the workers in collectives); a failure names the worker that died."""
        try:
            return fn()
        except Exception as e:
            dead = None
            for _ in range(50):  # the error can reach us a moment before the process is reaped
                dead = self._dead()
                if dead:
                    break
                time.sleep(0.1)
            raise WorkerError(dead or f"a collective with the workers failed: {e}") from e

    def shutdown(self, stop: Any = None) -> None:
        """Stop the workers (politely, with the `stop` message, then by force) and leave the groups."""
        if self._closed:
            return
        self._closed = True
        if self._ctrl is not None and self._dead() is None:
            try:
                with self.lock:
                    dist.broadcast_object_list([stop], src=0, group=self._ctrl)
            except Exception:  # a worker already gone: the waits below clean up
                _LOG.warning("could not send stop to the workers", exc_info=True)
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerChannel:
    """A worker's end: receive rank 0's messages in order, answer the ones that want an answer."""

    def __init__(self, ctrl: Any, world: int) -> None:
        self.ctrl, self.world = ctrl, world

    def receive(self) -> Any:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.ctrl)
        return box[0]

    def gather(self, mine: Any) -> list[Any]:
        answers: list[Any] = [None] * self.world
        dist.all_gather_object(answers, mine, group=self.ctrl)
        return answers


def rendezvous_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=_RENDEZVOUS_TIMEOUT_S)


def exit_with_parent() -> None:
    """Exit when the process that started this worker is gone (killed, crashed): never linger orphaned,
    blocked in a collective nobody else will join."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="moelora-parent-watch", daemon=True).start()
