"""Engine requests of one API call, read on the event loop; whatever ends the reading (the last token, an
error, a client that went away) releases them: an unfinished request is aborted, which frees its KV blocks
and its adapter reference."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from starlette.requests import Request

from moelora.engine.engine import Engine
from moelora.engine.stream import RequestStream
from moelora.outputs import RequestDelta, RequestOutput
from moelora.server.metrics import RequestTimer

_DISCONNECT_POLL_S = 0.25
CLIENT_GONE = 499  # the status logged for a request whose client left before its answer (nginx's)


@dataclass
class Run:
    """One engine request; an API call with several prompts has one per prompt."""

    stream: RequestStream
    timer: RequestTimer
    first_choice: int  # index of its first completion among the response's choices (prompt index * n)

    def cancel(self, engine: Engine) -> None:
        self.timer.close()
        if not self.stream.finished:
            engine.abort(self.stream.request_id)


async def deltas(runs: Sequence[Run], engine: Engine) -> AsyncIterator[tuple[Run, RequestDelta]]:
    """Every run's deltas as they come (interleaved); on exit, for any reason, unfinished runs are aborted."""
    queue: asyncio.Queue[tuple[Run, RequestDelta | Exception | None]] = asyncio.Queue()

    async def pump(run: Run) -> None:
        try:
            async for delta in run.stream:
                queue.put_nowait((run, delta))
            queue.put_nowait((run, None))
        except Exception as e:  # the engine died or shut down: the caller reports it
            queue.put_nowait((run, e))

    tasks = [asyncio.create_task(pump(run)) for run in runs]
    try:
        remaining = len(runs)
        while remaining:
            run, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                run.timer.on_delta(item)
                yield run, item
    finally:
        for task in tasks:
            task.cancel()
        for run in runs:
            run.cancel(engine)


async def collect(runs: Sequence[Run], engine: Engine, http: Request) -> list[RequestOutput] | None:
    """Every run's output; None if the client disconnected first (all of them are then aborted)."""
    outputs: dict[int, RequestOutput] = {}

    async def consume() -> None:
        async for run, delta in deltas(runs, engine):
            if delta.output is not None:
                outputs[id(run)] = delta.output

    task = asyncio.create_task(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if not task.done() and await http.is_disconnected():
                task.cancel()
                return None
        task.result()
    finally:
        if not task.done():
            task.cancel()
    return [outputs[id(run)] for run in runs]
