"""A worker process (ranks 1..tp_size-1): load this rank's share of the model, build the executor rank 0
plans, then apply rank 0's messages in order until Stop.

Started by `WorkerGroup.start` (`python -c` calling `main(SPEC_JSON RANK PORT)`: not `-m`, since the
package itself imports this module and runpy would run a second copy of it), or through
`run_torchrun_worker` under torchrun.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from moelora import ops
from moelora.engine.executor import Executor
from moelora.engine.heap import freeze_heap
from moelora.engine.messages import Init, Stop
from moelora.loader.model_loader import load_model
from moelora.models.decoder import MoeForCausalLM
from moelora.parallel.launch import (
    LaunchSpec,
    WorkerChannel,
    backend,
    device_for,
    exit_with_parent,
    groups,
    rendezvous_timeout,
)
from moelora.parallel.state import ParallelState


def load_share(spec: LaunchSpec, rank: int) -> tuple[MoeForCausalLM, WorkerChannel]:
    """This rank's process groups and its share of the model (read from disk, or drawn: dummy)."""
    tp_group, ctrl = groups(spec)
    ps = ParallelState(rank, spec.tp_size, spec.ep_size, tp_group)
    torch.manual_seed(spec.seed)
    ops.use_backend(spec.kernel_backend)
    model = load_model(
        Path(spec.model_path),
        dtype=spec.dtype,
        device=device_for(spec, rank),
        ps=ps,
        progress=False,
        load_format=spec.load_format,
        hf_overrides=spec.hf_overrides,
        seed=spec.seed,
        quantization=spec.quantization,
    )
    return model, WorkerChannel(ctrl, spec.tp_size)


def serve(model: MoeForCausalLM, channel: WorkerChannel) -> None:
    """Apply rank 0's messages until Stop; any failure ends the process (the driver names the rank)."""
    try:
        torch.set_grad_enabled(False)
        init = channel.receive()
        if isinstance(init, Stop):
            dist.destroy_process_group()
            return
        assert isinstance(init, Init), f"the first message must be Init, got {init!r}"
        executor = Executor(model, init.plan, channel=channel)
        freeze_heap()  # no full collection of the model's objects inside a step
        with torch.inference_mode():
            while not isinstance(message := channel.receive(), Stop):
                message.apply(executor)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # never linger half-alive: the driver sees the exit code
    dist.destroy_process_group()


def _worker_main(spec: LaunchSpec, rank: int, port: int) -> None:
    """Entry of a worker started by WorkerGroup: report through the store, load, serve."""
    exit_with_parent()
    store = dist.TCPStore("127.0.0.1", port, spec.tp_size, is_master=False, timeout=rendezvous_timeout())
    store.set(f"hello/{rank}", "1")
    try:
        torch.set_num_threads(spec.threads)
        dist.init_process_group(
            backend(spec.device_type), store=store, rank=rank, world_size=spec.tp_size,
            timeout=rendezvous_timeout(),
        )  # fmt: skip
        model, channel = load_share(spec, rank)
    except BaseException as e:
        traceback.print_exc()
        store.set(f"error/{rank}", f"{type(e).__name__}: {e}")
        sys.exit(1)
    store.set(f"ready/{rank}", "1")
    serve(model, channel)


def run_torchrun_worker(spec: LaunchSpec, rank: int) -> None:
    """Body of a non-zero rank under torchrun: join, load, serve rank 0's messages, then exit."""
    dist.init_process_group(backend(spec.device_type), timeout=rendezvous_timeout())
    serve(*load_share(spec, rank))


def main(argv: list[str]) -> None:
    """`WorkerGroup.start`'s command line: SPEC_JSON RANK PORT."""
    _worker_main(LaunchSpec(**json.loads(argv[0])), int(argv[1]), int(argv[2]))
