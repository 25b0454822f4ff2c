"""The FastAPI app: routes, API-key check, OpenAI-shaped errors, /health and /metrics; `serve` runs it."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

import moelora
from moelora.config import ServerArgs
from moelora.engine.stream import EngineDeadError
from moelora.llm import LLM
from moelora.lora.adapter import AdapterError
from moelora.server.context import ServerContext
from moelora.server.metrics import ServerMetrics
from moelora.server.protocol import ApiError
from moelora.server.routes import router

_LOG = logging.getLogger(__name__)


def _api_key_check(key: str | None) -> Callable[[Request], Awaitable[None]]:
    async def check(http: Request) -> None:
        if key is None:
            return
        scheme, _, token = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
        if not secrets.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    return check


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) of the first validation error; param is the request field it is about."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type")
    if kind == "json_invalid":  # loc holds a character offset, not a field
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    where = ".".join(loc)
    if kind == "extra_forbidden":
        return f"{where}: unknown field; moelora honours or refuses every field it knows", loc[0]
    message = f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg"))
    return message, loc[0] if loc else None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        return JSONResponse(ApiError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> Response:
        return JSONResponse(ApiError(503, f"the engine is not running: {exc}").body(), status_code=503)

    @app.exception_handler(AdapterError)
    async def adapter_failed(_: Request, exc: AdapterError) -> Response:
        # An adapter whose files changed or vanished after it was loaded: its requests fail, it is unloaded.
        return JSONResponse(ApiError(400, str(exc)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception) -> Response:
        _LOG.exception("unhandled error")
        return JSONResponse(ApiError(500, f"internal error: {exc!r}").body(), status_code=500)


class BodyLimit:
    """ASGI middleware: a request body above `limit` bytes gets 413 before anything parses it (by its
    Content-Length, or as it streams in)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(
            ApiError(413, f"the request body is larger than {self.limit} bytes (--max-body-bytes)").body()
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


class _TooLarge(Exception):
    pass


def build_app(llm: LLM, args: ServerArgs, served_name: str) -> FastAPI:
    """The app serving `llm`; the engine is shut down when the app's lifespan ends."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        _LOG.info("shutting down the engine")
        llm.shutdown()

    # No /docs or /redoc (they load assets from a CDN); the schema is at /openapi.json, behind the key.
    app = FastAPI(title="moelora", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=args.max_body_bytes)
    app.state.ctx = ServerContext(llm, args, served_name, ServerMetrics(llm.engine))
    _install_error_handlers(app)
    auth = Depends(_api_key_check(args.api_key))
    app.include_router(router, dependencies=[auth])

    @app.get("/health")
    async def health() -> Response:
        engine = getattr(llm, "engine", None)
        if engine is None or not engine.load().alive:
            why = engine.failure() if engine is not None else "the model has been shut down"
            return JSONResponse(ApiError(503, f"the engine is not running: {why}").body(), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/openapi.json", dependencies=[auth], include_in_schema=False)
    async def openapi() -> Response:
        return JSONResponse(app.openapi())

    @app.get("/version", dependencies=[auth])
    async def version() -> Response:
        return JSONResponse({"version": moelora.__version__})

    @app.get("/metrics", dependencies=[auth])
    async def metrics() -> Response:
        return Response(app.state.ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
