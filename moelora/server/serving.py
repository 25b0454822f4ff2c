"""Running the app: the port check before loading, the start-up line, and uvicorn with a shutdown that
ends every stream properly (a stream still running when the grace period ends gets an error event and
[DONE], not a cut connection)."""

from __future__ import annotations

import logging
import socket
import threading
from types import FrameType
from typing import Any

from moelora.config import ServerArgs
from moelora.llm import LLM
from moelora.server.app import build_app

_LOG = logging.getLogger(__name__)
_END_MARGIN_S = 2.0  # the engine stops this long before uvicorn gives up, so streams can say why


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
    kv_gib = engine.executor.cache.num_bytes / 2**30
    adapters = ", ".join(i.name for i in llm.list_loras()) or "none"
    slots = (
        f"{engine.loras.num_slots} adapter slots of rank {engine.loras.max_rank}"
        if engine.loras is not None
        else "adapters off"
    )
    fp8 = llm.model.cfg.fp8
    dtype = str(llm.model.dtype).removeprefix("torch.") + (f", {fp8.describe()}" if fp8 is not None else "")
    return (
        f"serving {llm.model_path} as '{served_name}' ({dtype}, "
        f"{llm.load_format} weights, tp {llm.parallel.tp_size} ep {llm.parallel.experts_over}) on "
        f"http://{args.host}:{args.port}; adapters: {adapters}; {slots}; max_model_len "
        f"{engine.max_model_len}; KV cache {blocks} blocks of {size} tokens ({blocks * size} tokens, "
        f"{kv_gib:.2f} GiB)"
    )


def serve(llm: LLM, args: ServerArgs, served_name: str) -> None:
    """Run the server until SIGINT/SIGTERM: it stops accepting, running requests get
    `args.timeout_graceful_shutdown` seconds to finish, then the engine stops and those still running
    end with an error (an error event and [DONE] for a stream, 503 otherwise)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not self.should_exit:
                grace = args.timeout_graceful_shutdown
                timer = threading.Timer(grace - min(_END_MARGIN_S, grace / 2), _end_requests, (llm,))
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    _LOG.info("%s", describe(llm, served_name, args))
    app = build_app(llm, args, served_name)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
        log_level="info",
    )
    Server(config).run()


def _end_requests(llm: Any) -> None:
    engine = getattr(llm, "engine", None)
    if engine is not None and engine.load().running + engine.load().waiting:
        _LOG.warning("the grace period is over: requests still running end with an error")
        engine.shutdown("the server is shutting down and the request did not finish in its grace period")
