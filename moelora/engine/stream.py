"""A request's stream of deltas: filled by the engine thread, read by one consumer (a thread or a task)."""

from __future__ import annotations

import asyncio
import inspect
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

from moelora.outputs import RequestDelta, RequestOutput


class EngineDeadError(RuntimeError):
    """The engine loop failed; every request it held fails with this error (its cause attached)."""


class RequestStream:
    """Iterate (`for` or `async for`) to receive a request's deltas in order; `result()` waits for the end."""

    def __init__(self, request_id: str, on_close: Callable[[str], None] | None = None) -> None:
        self.request_id = request_id
        self._items: deque[RequestDelta | BaseException] = deque()
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        # Held weakly: a stream the caller keeps must not keep the engine (and its model) alive.
        self._on_close = weakref.WeakMethod(on_close) if inspect.ismethod(on_close) else on_close
        self.claimed = False  # handed to a consumer: the engine forgets it when the request ends
        # Set by the engine for a request whose text is decoded by its consumer (`text_deltas=False`): the
        # completions' final texts, computed by `result()` in the consumer's thread, not the engine's.
        self.final_texts: Callable[[], list[str]] | None = None

    # -- engine side --
    def put(self, item: RequestDelta | BaseException) -> None:
        with self._cond:
            self._items.append(item)
            if isinstance(item, RequestDelta) and item.output is not None:
                self._output = item.output
            if isinstance(item, BaseException):
                self._error = item
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    @property
    def finished(self) -> bool:
        return self._output is not None or self._error is not None

    # -- consumer side --
    def _take(self) -> RequestDelta | None:
        """The next delta; None at the end of the stream. Caller holds the lock and knows items exist."""
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self._close()
            raise item
        if item.finished:
            self._close()
        return item

    def _close(self) -> None:
        callback = self._on_close() if isinstance(self._on_close, weakref.WeakMethod) else self._on_close
        self._on_close = None
        if callback is not None:
            callback(self.request_id)

    def __iter__(self) -> Iterator[RequestDelta]:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                delta = self._take()
            if delta is not None:
                yield delta
                if delta.finished:
                    return

    async def __aiter__(self) -> AsyncIterator[RequestDelta]:
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._async_waiters.append((loop, event))
        try:
            while True:
                with self._cond:
                    event.clear()
                    delta = self._take() if self._items else None
                if delta is None:
                    await event.wait()
                    continue
                yield delta
                if delta.finished:
                    return
        finally:
            with self._cond:
                self._async_waiters.remove((loop, event))

    def result(self) -> RequestOutput:
        """Wait for the request to finish and return its whole output (consumes the stream)."""
        for _ in self:
            pass
        assert self._output is not None
        if self.final_texts is not None:
            texts, self.final_texts = self.final_texts(), None
            for completion, text in zip(self._output.outputs, texts, strict=True):
                completion.text = text
        return self._output
