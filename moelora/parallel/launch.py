"""Worker processes for tensor and expert parallelism: rank 0 (the driver) drives ranks 1..tp_size-1.

`WorkerGroup.start` spawns the workers (or, under `torchrun`, joins the processes torchrun started), sets
up the process groups (gloo on CPU, NCCL on GPU for the model's collectives; a gloo group for control
messages) and hands back rank 0's `ParallelState`. Each worker loads its own share of the model from disk
and then repeats, in order, every command rank 0 broadcasts:

    ("init", num_kv_blocks, block_size, lora_slots, lora_rank)  build the KV cache and adapter slots
    ("step", StepInput)                                        run one engine step's forward pass
    ("forward", ids, seq_lens)                                 a cacheless forward (LLM.logits)
    ("lora", slot, name, source, max_rank, fingerprint)        re-read an adapter, write this rank's shards;
                                                               every rank answers (all_gather) None or why
                                                               it could not, and then all clear the slot
    ("clear", slot)                                            zero an adapter slot
    ("copy", src, dst)                                         copy a KV block (a prompt shared by n > 1)
    ("stop",)                                                  leave the loop and exit

Only rank 0 samples, so slot assignment and every decision is made once, by the driver. A worker that
fails prints its traceback and exits non-zero; the driver then fails with an error naming that rank
instead of hanging (gloo reports the closed connection; every group has a timeout besides).
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
import traceback
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


def _backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _groups(spec: LaunchSpec) -> tuple[Any, Any]:
    """The model's TP group and the gloo control group; every rank creates them in the same order."""
    timeout = datetime.timedelta(seconds=spec.timeout_s)
    ranks = list(range(spec.tp_size))
    tp_group = dist.new_group(ranks, timeout=timeout, backend=_backend(spec.device_type))
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

        Workers are fresh interpreters (`python -m moelora.parallel.worker`), so scripts need no
        `if __name__ == "__main__"` guard and notebooks work. They report through the rendezvous store:
        `hello/r` once running, `ready/r` once their share is loaded, `error/r` with the reason if not.
        """
        ParallelState(0, spec.tp_size, spec.ep_size)  # the layout errors, before any process starts
        group = cls(spec)
        rendezvous = datetime.timedelta(seconds=_RENDEZVOUS_TIMEOUT_S)
        backend = _backend(spec.device_type)
        if torchrun_rank(spec.tp_size) is not None:
            dist.init_process_group(backend, timeout=rendezvous)
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
                cmd = [sys.executable, "-m", "moelora.parallel.worker", spec_json, str(rank), str(port)]
                group._procs.append(subprocess.Popen(cmd, env=env))
            try:
                group._wait_for("hello")
                dist.init_process_group(
                    backend, store=group._store, rank=0, world_size=spec.tp_size, timeout=rendezvous
                )
            except BaseException:
                group.shutdown()
                raise
        tp_group, group._ctrl = _groups(spec)
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

    def send(self, command: tuple[Any, ...]) -> None:
        """Broadcast one command to every worker (hold `lock` across it and the collectives after it)."""
        if self._closed:
            raise WorkerError("the worker group has been shut down")
        dead = self._dead()
        if dead:
            raise WorkerError(dead)
        self.checked(lambda: dist.broadcast_object_list([command], src=0, group=self._ctrl))

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

    def shutdown(self) -> None:
        """Stop the workers (politely, then by force) and leave the process groups."""
        if self._closed:
            return
        self._closed = True
        if self._ctrl is not None and self._dead() is None:
            try:
                with self.lock:
                    dist.broadcast_object_list([("stop",)], src=0, group=self._ctrl)
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


# ---------------------------------------------------------------------------------------- worker side


def _exit_with_parent() -> None:
    """Exit when the process that started this worker is gone (killed, crashed): never linger orphaned,
    blocked in a collective nobody else will join."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="moelora-parent-watch", daemon=True).start()


def _worker_main(spec: LaunchSpec, rank: int, port: int) -> None:
    """Entry of a worker started by WorkerGroup: report through the store, load, serve."""
    _exit_with_parent()
    rendezvous = datetime.timedelta(seconds=_RENDEZVOUS_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, spec.tp_size, is_master=False, timeout=rendezvous)
    store.set(f"hello/{rank}", "1")
    try:
        torch.set_num_threads(spec.threads)
        dist.init_process_group(
            _backend(spec.device_type), store=store, rank=rank, world_size=spec.tp_size, timeout=rendezvous
        )
        worker = Worker.create(spec, rank)
    except BaseException as e:
        traceback.print_exc()
        store.set(f"error/{rank}", f"{type(e).__name__}: {e}")
        sys.exit(1)
    store.set(f"ready/{rank}", "1")
    worker.serve_forever()


def run_torchrun_worker(spec: LaunchSpec, rank: int) -> None:
    """Body of a non-zero rank under torchrun: join, load, serve rank 0's commands, then exit."""
    timeout = datetime.timedelta(seconds=_RENDEZVOUS_TIMEOUT_S)
    dist.init_process_group(_backend(spec.device_type), timeout=timeout)
    Worker.create(spec, rank).serve_forever()


class Worker:
    """One non-zero rank: its share of the model, its KV cache and adapter slots."""

    def __init__(self, spec: LaunchSpec, ps: ParallelState, ctrl: Any, model: Any) -> None:
        self.spec, self.ps, self.ctrl, self.model = spec, ps, ctrl, model
        self.runner: Any = None
        self.pool: Any = None

    @classmethod
    def create(cls, spec: LaunchSpec, rank: int) -> Worker:
        from moelora.loader.model_loader import load_model

        tp_group, ctrl = _groups(spec)
        ps = ParallelState(rank, spec.tp_size, spec.ep_size, tp_group)
        torch.manual_seed(spec.seed)
        device = device_for(spec, rank)
        model = load_model(
            Path(spec.model_path),
            dtype=spec.dtype,
            device=device,
            ps=ps,
            progress=False,
            load_format=spec.load_format,
            hf_overrides=spec.hf_overrides,
            seed=spec.seed,
        )
        return cls(spec, ps, ctrl, model)

    def serve_forever(self) -> None:
        try:
            torch.set_grad_enabled(False)
            while True:
                box: list[Any] = [None]
                dist.broadcast_object_list(box, src=0, group=self.ctrl)
                if not self.handle(box[0]):
                    break
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)  # never linger half-alive: the driver sees the exit code
        dist.destroy_process_group()

    @torch.inference_mode()
    def handle(self, command: tuple[Any, ...]) -> bool:
        from moelora.batch import ForwardBatch
        from moelora.cache.kv_cache import KVCache
        from moelora.cache.lora_pool import LoraPool
        from moelora.engine.runner import ModelRunner
        from moelora.lora.adapter import AdapterError
        from moelora.lora.source import load_adapter
        from moelora.parallel.sharding import place_experts

        kind, args = command[0], command[1:]
        model = self.model
        if kind == "stop":
            return False
        if kind == "init":
            num_blocks, block_size, lora_slots, lora_rank = args
            cfg = model.cfg
            kv_heads = model.decoder_layers()[0].self_attn.kv_heads
            device = next(model.parameters()).device
            cache = KVCache(
                cfg.num_layers, num_blocks, block_size, kv_heads, cfg.head_dim, model.dtype, device
            )
            self.runner = ModelRunner(model, cache)
            if lora_slots:
                self.pool = LoraPool(model, lora_slots, lora_rank)
        elif kind == "step":
            self.runner.execute(args[0])
        elif kind == "forward":
            ids, seq_lens = args
            device = next(model.parameters()).device
            batch = ForwardBatch.prefill(seq_lens, device)
            model.compute_logits(model(torch.tensor(ids, dtype=torch.int64, device=device), batch))
        elif kind == "lora":  # answered: None, or why this rank could not write it
            slot, name, source, max_rank, fingerprint = args
            error = None
            try:
                owns = place_experts(model.cfg.num_experts, self.ps.ep_size, self.ps.ep_rank).owns
                adapter = load_adapter(
                    name,
                    source,
                    model.cfg,
                    model.family,
                    max_rank,
                    fingerprint=fingerprint,
                    dtype=model.dtype,
                    device=next(model.parameters()).device,
                    owns_expert=owns,
                )
                self.pool.write(slot, adapter)
            except AdapterError as e:
                error = str(e)
            answers: list[Any] = [None] * self.spec.tp_size
            dist.all_gather_object(answers, error, group=self.ctrl)
            if any(a is not None for a in answers):
                self.pool.clear(slot)
        elif kind == "clear":
            self.pool.clear(args[0])
        elif kind == "copy":
            self.runner.cache.copy_block(*args)
        else:
            raise ValueError(f"unknown worker command {kind!r}")
        return True


def worker_entry(argv: list[str]) -> None:
    """`python -m moelora.parallel.worker SPEC_JSON RANK PORT` (what WorkerGroup.start runs)."""
    _worker_main(LaunchSpec(**json.loads(argv[0])), int(argv[1]), int(argv[2]))
