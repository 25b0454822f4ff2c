"""`moelora bench serve`: streaming completions at a Poisson rate against `moelora serve`; time to first
token, time per output token, inter-token latency and end-to-end latency percentiles, and goodput."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from moelora.benchmark.args import ServeBenchArgs, WorkloadArgs, parse_goodput
from moelora.benchmark.report import fmt, percentile, print_table
from moelora.benchmark.workload import Mix


@dataclass
class Outcome:
    """One request as the client saw it (seconds from its own send)."""

    model: str
    ttft: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    e2el: float = 0.0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        return (self.e2el - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


async def _one(client: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> Outcome:
    out = Outcome(body["model"])
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                out.error = f"{response.status_code}: {(await response.aread()).decode()[:200]}"
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = str(chunk["error"].get("message"))
                for choice in chunk.get("choices", []):
                    if choice.get("token_ids"):
                        out.chunk_times.append(time.perf_counter() - start)
                        out.tokens += len(choice["token_ids"])
    except Exception as e:  # a transport failure is this request's result, not the run's end
        out.error = f"{type(e).__name__}: {e}"
    out.e2el = time.perf_counter() - start
    out.ttft = out.chunk_times[0] if out.chunk_times else out.e2el
    return out


async def drive(
    base_url: str,
    served: str,
    prompts: Sequence[list[int]],
    loras: Sequence[str | None],
    w: WorkloadArgs,
    args: ServeBenchArgs,
    progress: bool,
) -> tuple[list[Outcome], float]:
    """Send every request at its arrival time (gamma gaps of mean 1 / rate); (outcomes, seconds)."""
    import httpx

    rng = random.Random(len(prompts))
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = f"{base_url.rstrip('/')}/v1/completions"
    bar = tqdm(total=len(prompts), desc="bench serve", unit="req", disable=not progress)

    async def send(client: Any, prompt: list[int], lora: str | None) -> Outcome:
        body = {
            "model": lora or served,
            "prompt": prompt,
            "max_tokens": w.output_len,
            "temperature": w.temperature,
            "stream": True,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        async with limit:
            out = await _one(client, url, body, headers)
        bar.update()
        return out

    timeout = httpx.Timeout(None, connect=30)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None)) as client:
        tasks = []
        start = time.perf_counter()
        for prompt, lora in zip(prompts, loras, strict=True):
            tasks.append(asyncio.create_task(send(client, prompt, lora)))
            if args.request_rate != float("inf"):
                gap = rng.gammavariate(args.burstiness, 1 / (args.request_rate * args.burstiness))
                await asyncio.sleep(gap)
        outcomes = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    bar.close()
    return outcomes, duration


def summarize(mix: Mix, outcomes: list[Outcome], duration: float, args: ServeBenchArgs) -> dict[str, Any]:
    done = [o for o in outcomes if o.error is None]
    slos = parse_goodput(args.goodput)
    good = [o for o in done if _meets(o, slos)]
    ms = 1e3
    metrics: dict[str, list[float]] = {
        "ttft": [o.ttft * ms for o in done],
        "tpot": [o.tpot * ms for o in done if o.tpot is not None],
        "itl": [g * ms for o in done for g in o.itl],
        "e2el": [o.e2el * ms for o in done],
    }
    summary: dict[str, Any] = {
        "mix": mix.name,
        "requests": len(outcomes),
        "failed": len(outcomes) - len(done),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_tok_s": sum(o.tokens for o in done) / duration,
        "generated_tokens": sum(o.tokens for o in done),
        "goodput": len(good) / duration if slos else None,
    }
    for name, values in metrics.items():
        for q in (50, 90, 99):
            summary[f"{name}_ms_p{q}"] = percentile(values, q)
        summary[f"{name}_ms_mean"] = sum(values) / len(values) if values else float("nan")
    return summary


def _meets(o: Outcome, slos: dict[str, float]) -> bool:
    values = {"ttft": o.ttft * 1e3, "tpot": (o.tpot or 0.0) * 1e3, "e2el": o.e2el * 1e3}
    return all(values[k] <= limit for k, limit in slos.items())


def print_serve(rows: list[dict[str, Any]], title: str) -> None:
    table = [
        [
            r["mix"],
            f"{r['requests'] - r['failed']}/{r['requests']}",
            fmt(r["request_throughput"]),
            fmt(r["output_tok_s"], 0),
            *(
                f"{fmt(r[f'{m}_ms_p50'], 1)} / {fmt(r[f'{m}_ms_p99'], 1)}"
                for m in ("ttft", "tpot", "itl", "e2el")
            ),
            fmt(r["goodput"]),
        ]
        for r in rows
    ]
    header = ["mix", "ok", "req/s", "output tok/s", "TTFT ms p50 / p99", "TPOT ms p50 / p99",
              "ITL ms p50 / p99", "E2E ms p50 / p99", "goodput req/s"]  # fmt: skip
    print_table(title, header, table)
