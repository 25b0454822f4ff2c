"""Soak test of `moelora serve` (not run in CI): mixed streaming traffic with aborts, disconnects,
malformed requests and adapters loaded and unloaded at random, for a bounded time; then every count,
KV block and adapter slot must be back to zero, no request lost, and the server's memory flat.

    python bench/soak.py --minutes 30 [--tp 2 --ep 2] [--clients 12] [--output-json soak.json]

Lost = a request that got no answer (transport error, timeout), a 5xx, or a stream that ended without
[DONE]; 4xx answers to the malformed requests are expected. RSS is the server's and its workers'.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from moelora.benchmark.server_proc import ServerProcess
from moelora.demo import demo_adapter_paths

MALFORMED: list[tuple[str, Any]] = [
    ("/v1/completions", b'{"model": "demo", "prompt": '),
    ("/v1/completions", {"model": "demo", "prompt": "a\ud800b"}),
    ("/v1/completions", {"model": "demo", "prompt": "x", "n": 100000}),
    ("/v1/completions", {"model": "demo", "prompt": "x", "stream": "yes"}),
    ("/v1/completions", {"model": "ghost", "prompt": "x"}),
    ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 2**63}),
    ("/v1/completions", {"model": "demo", "prompt": [True, False]}),
    ("/v1/chat/completions", {"model": "demo", "messages": [], "max_tokens": 2}),
    (
        "/v1/chat/completions",
        {"model": "demo", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
    ),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "../etc"}),
    ("/v1/load_lora_adapter", {"lora_name": "bad name", "lora_path": "a0"}),
]


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    refused: int = 0  # expected 4xx (malformed requests, adapters unloaded under a request)
    lost: int = 0
    disconnects: int = 0
    loads: int = 0
    unloads: int = 0
    errors: list[str] = field(default_factory=list)

    def lose(self, why: str) -> None:
        self.lost += 1
        if len(self.errors) < 20:
            self.errors.append(why)


def rss_mib(pid: int) -> float:
    """Resident memory of the process and its children, MiB."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if int(entry.name) == pid or ppid == pid:
            total += next(
                (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")), 0
            )
    return total / 1024


async def stream_one(client: httpx.AsyncClient, model: str, tally: Tally, rng: random.Random) -> None:
    chat = rng.random() < 0.3
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(1, 48), "stream": True,
                            "temperature": rng.choice([0, 0.8]), "n": rng.choice([1, 1, 2])}  # fmt: skip
    body |= {"messages": [{"role": "user", "content": "Hello there"}]} if chat else {"prompt": "The weather"}
    leave_after = rng.randint(1, 5) if rng.random() < 0.2 else None
    async with client.stream("POST", path, json=body) as response:
        if response.status_code >= 500:
            tally.lose(f"{response.status_code} {(await response.aread())[:200]!r}")
            return
        if response.status_code != 200:
            tally.refused += 1  # the adapter was unloaded meanwhile
            return
        chunks = 0
        async for line in response.aiter_lines():
            if not line:
                continue
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                tally.disconnects += 1
                return  # the client goes away mid-stream
            if line == "data: [DONE]":
                tally.ok += 1
                return
        tally.lose("a stream ended without [DONE]")


async def one_action(
    client: httpx.AsyncClient, adapters: list[str], tally: Tally, rng: random.Random
) -> None:
    roll = rng.random()
    models = ["demo", *adapters]
    if roll < 0.6:
        await stream_one(client, rng.choice(models), tally, rng)
        return
    if roll < 0.75:
        body = {"model": rng.choice(models), "prompt": "Hello", "max_tokens": rng.randint(1, 16)}
        response = await client.post("/v1/completions", json=body)
    elif roll < 0.88:
        path, payload = rng.choice(MALFORMED)
        content = payload if isinstance(payload, bytes) else json.dumps(payload)
        response = await client.post(path, content=content, headers={"content-type": "application/json"})
    elif roll < 0.94:
        name = f"s{rng.randint(0, 5)}"
        source = rng.choice(["a0", "a1", "a2"])
        response = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": source})
        if response.status_code == 200:
            tally.loads += 1
            adapters.append(name)
    else:
        if not adapters:
            return
        name = rng.choice(adapters)
        response = await client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code == 200:
            tally.unloads += 1
            adapters.remove(name)
    if response.status_code >= 500:
        tally.lose(f"{response.status_code} {response.text[:200]}")
    elif response.status_code >= 400:
        tally.refused += 1
    else:
        tally.ok += 1


async def client_loop(
    base: str, deadline: float, adapters: list[str], tally: Tally, seed: int, limit: int
) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(120)) as client:
        while time.monotonic() < deadline and tally.sent < limit:
            tally.sent += 1
            try:
                await one_action(client, adapters, tally, rng)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                tally.lose(f"{type(e).__name__}: {e}")


def scrape(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    wanted = ("moelora_requests_running", "moelora_requests_waiting", "moelora_requests_pending",
              "moelora_kv_blocks_used", "moelora_lora_slots_used")  # fmt: skip
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(wanted)}


async def run(args: argparse.Namespace, server: ServerProcess, tally: Tally) -> list[tuple[float, float]]:
    deadline = time.monotonic() + args.minutes * 60
    adapters: list[str] = []
    clients = [
        asyncio.create_task(client_loop(server.base_url, deadline, adapters, tally, i, args.max_requests))
        for i in range(args.clients)
    ]
    samples = []
    start = time.monotonic()
    while not all(c.done() for c in clients):
        samples.append((time.monotonic() - start, rss_mib(server.proc.pid)))
        await asyncio.wait(clients, timeout=args.sample_s)
    await asyncio.gather(*clients)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        for name in list(adapters):  # unload what is left: every slot must then be free
            await client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    samples.append((time.monotonic() - start, rss_mib(server.proc.pid)))
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many actions")
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--sample-s", type=float, default=30)
    ap.add_argument("--output-json", type=Path)
    args = ap.parse_args()
    lora_dir = Path(tempfile.mkdtemp(prefix="moelora-soak-"))
    for i, path in enumerate(demo_adapter_paths().values()):
        shutil.copytree(path, lora_dir / f"a{i}")
    flags = ["--no-demo-adapters", "--lora-dir", str(lora_dir), "--enable-lora", "--max-loras-per-batch", "3"]
    flags += ["--num-kv-blocks", "96", "--max-num-seqs", "16", "--tp", str(args.tp), "--ep", str(args.ep)]
    server = ServerProcess(flags, timeout=600)
    tally = Tally()
    try:
        samples = asyncio.run(run(args, server, tally))
        time.sleep(2)
        final = scrape(server.base_url)
    finally:
        server.stop()
        shutil.rmtree(lora_dir, ignore_errors=True)
    warm = [rss for t, rss in samples if t >= 0.1 * samples[-1][0]] or [samples[-1][1]]
    growth = (samples[-1][1] - warm[0]) / warm[0]
    leaks = {k: v for k, v in final.items() if v != 0}
    report = {"args": vars(args) | {"output_json": str(args.output_json)}, "tally": asdict(tally),
              "final_gauges": final, "rss_mib": samples, "rss_growth_after_warmup": growth}  # fmt: skip
    print(f"\nsoak: {args.minutes} min, tp {args.tp} ep {args.ep}, {args.clients} clients")
    columns = ["sent", "answered", "refused (4xx)", "lost", "client disconnects", "loads / unloads",
               "leaked gauges", "RSS MiB after warm-up -> end"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {tally.sent} | {tally.ok} | {tally.refused} | {tally.lost} | {tally.disconnects} | "
          f"{tally.loads} / {tally.unloads} | {leaks or 'none'} | {warm[0]:.0f} -> {samples[-1][1]:.0f} "
          f"({growth:+.1%}) |")  # fmt: skip
    if tally.errors:
        print("lost:", *tally.errors, sep="\n  ")
    if args.output_json:
        args.output_json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
