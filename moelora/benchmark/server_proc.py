"""A real `moelora serve` process on a free localhost port: `moelora bench serve` starts one when given no
--base-url, and the server tests drive one. Needs httpx (the `bench` extra)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import httpx

_PORT_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m moelora.cli serve ARGS --port P`, started and waited for until /health answers."""

    def __init__(self, args: Sequence[str], api_key: str | None = None, timeout: float = 120) -> None:
        self.api_key = api_key
        # The free port can be taken (by any outgoing connection's ephemeral port) before the server binds
        # it: then the server exits at once, and another port is tried.
        for attempt in range(_PORT_ATTEMPTS):
            self._start(args)
            try:
                self._wait_ready(timeout)
                return
            except RuntimeError:
                if attempt + 1 == _PORT_ATTEMPTS or "address already in use" not in self.output():
                    raise

    def _start(self, args: Sequence[str]) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        fd, self.log_path = tempfile.mkstemp(prefix="moelora-serve-", suffix=".log")
        cmd = [sys.executable, "-m", "moelora.cli", "serve", "--no-progress", "--port", str(self.port), *args]
        if self.api_key is not None:
            cmd += ["--api-key", self.api_key]
        self.proc = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT)
        os.close(fd)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moelora serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moelora serve did not become healthy in {timeout}s:\n{self.output()}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs: Any) -> Any:
        """An OpenAI client of this server (the openai package is a test dependency)."""
        import openai

        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.api_key or "none", max_retries=0, **kwargs
        )

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics by name (labelled ones under `name{labels}`)."""
        text = httpx.get(f"{self.base_url}/metrics", headers=self.headers, timeout=10).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60) -> str:
        """SIGTERM, wait, and return the server's log; raises if it did not shut down cleanly."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        log = self.output()
        os.unlink(self.log_path)
        # uvicorn re-raises the signal it handled once shutdown is complete, so SIGTERM is the exit status.
        if self.proc.returncode not in (0, -signal.SIGTERM) or "shutting down the engine" not in log:
            raise RuntimeError(f"moelora serve did not shut down cleanly ({self.proc.returncode}):\n{log}")
        return log
