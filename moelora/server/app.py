"""The FastAPI app: routes, API-key check, OpenAI-shaped errors, /health and /metrics; `serve` runs it."""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

import moelora
from moelora.config import ServerArgs
from moelora.llm import LLM
from moelora.lora.adapter import AdapterError
from moelora.server.context import ServerContext
from moelora.server.metrics import ServerMetrics
from moelora.server.protocol import ApiError
from moelora.server.routes import router

_LOG = logging.getLogger(__name__)
# On SIGINT/SIGTERM uvicorn stops accepting and lets running requests finish for this long; then the
# engine shuts down and requests still running end with an error.
GRACEFUL_SHUTDOWN_S = 30


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

    @app.exception_handler(AdapterError)
    async def adapter_failed(_: Request, exc: AdapterError) -> Response:
        # An adapter whose files changed or vanished after it was loaded: its requests fail, it is unloaded.
        return JSONResponse(ApiError(400, str(exc)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception) -> Response:
        _LOG.exception("unhandled error")
        return JSONResponse(ApiError(500, f"internal error: {exc!r}").body(), status_code=500)


def build_app(llm: LLM, args: ServerArgs, served_name: str) -> FastAPI:
    """The app serving `llm`; the engine is shut down when the app's lifespan ends."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        _LOG.info("shutting down the engine")
        llm.shutdown()

    app = FastAPI(title="moelora", lifespan=lifespan)
    app.state.ctx = ServerContext(llm, args, served_name, ServerMetrics(llm.engine))
    _install_error_handlers(app)
    auth = Depends(_api_key_check(args.api_key))
    app.include_router(router, dependencies=[auth])

    @app.get("/health")
    async def health() -> Response:
        if not llm.engine.load().alive:
            return JSONResponse(ApiError(503, "the engine is not running").body(), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version", dependencies=[auth])
    async def version() -> Response:
        return JSONResponse({"version": moelora.__version__})

    @app.get("/metrics", dependencies=[auth])
    async def metrics() -> Response:
        return Response(app.state.ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def check_port_free(host: str, port: int) -> None:
    """ValueError now if (host, port) cannot be bound (in use, or no such address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port") from e


def describe(llm: LLM, served_name: str, args: ServerArgs) -> str:
    """One start-up line: what is served, how, and with what capacity."""
    engine = llm.engine
    blocks, size = engine.allocator.num_blocks, engine.args.block_size
    kv_gib = engine.cache.num_bytes / 2**30
    adapters = ", ".join(i.name for i in llm.list_loras()) or "none"
    slots = (
        f"{engine.loras.num_slots} adapter slots of rank {engine.loras.pool.max_rank}"
        if engine.loras is not None
        else "adapters off"
    )
    return (
        f"serving {llm.model_path} as '{served_name}' ({str(llm.model.dtype).removeprefix('torch.')}, "
        f"{llm.load_format} weights, tp {llm.parallel.tp_size} ep {llm.parallel.experts_over}) on "
        f"http://{args.host}:{args.port}; adapters: {adapters}; {slots}; max_model_len "
        f"{engine.max_model_len}; KV cache {blocks} blocks of {size} tokens ({blocks * size} tokens, "
        f"{kv_gib:.2f} GiB)"
    )


def serve(llm: LLM, args: ServerArgs, served_name: str) -> None:
    """Run the server until SIGINT/SIGTERM (graceful: running requests get GRACEFUL_SHUTDOWN_S to finish)."""
    import uvicorn

    _LOG.info("%s", describe(llm, served_name, args))
    app = build_app(llm, args, served_name)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, log_level="info"
    )
    uvicorn.Server(config).run()
