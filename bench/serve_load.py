"""Load test of `moelora serve` (not run in CI): N concurrent streaming greedy requests over the base model
and four adapters, while one adapter is loaded and another unloaded; every output must equal the same
request run alone, with zero failed requests. Prints throughput and TTFT / inter-token latency percentiles.

    python bench/serve_load.py [--requests 200] [--max-tokens 32] [--tp 2 --ep 2] [-- extra serve flags]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from moelora.benchmark.server_proc import ServerProcess
from moelora.demo import demo_adapter_paths

PROMPTS = ["The weather today is", "Hello", "To make a simple soup,", "Fresh bread", "She measured the flour"]
START_ADAPTERS = ("expert-r8", "fused-r16", "partial-r4", "extra")  # "extra": a copy of fused-r16
LOADED, UNLOADED = "late", "partial-r4"  # "late" (a copy of expert-r8) arrives during the run


@dataclass
class Result:
    model: str
    prompt: str
    token_ids: list[int] = field(default_factory=list)
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    error: str | None = None


async def one(client: Any, model: str, prompt: str, max_tokens: int, started: asyncio.Event) -> Result:
    result = Result(model, prompt)
    t0 = time.perf_counter()
    last = None
    try:
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        started.set()
        async for chunk in stream:
            ids = chunk.choices[0].token_ids if chunk.choices else []
            if not ids:
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft = now - t0
            else:
                result.gaps.append((now - last) / len(ids))
            last = now
            result.token_ids += ids
    except openai.APIError as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        started.set()
    return result


def lora_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="moelora-bench-loras-"))
    demo = demo_adapter_paths()
    for name in ("expert-r8", "fused-r16", "partial-r4"):
        shutil.copytree(demo[name], root / name)
    shutil.copytree(demo["fused-r16"], root / "extra")
    shutil.copytree(demo["expert-r8"], root / LOADED)
    return root


def references(client: openai.OpenAI, max_tokens: int) -> dict[tuple[str, str], list[int]]:
    """Each (model, prompt) run alone; "late" is a copy of expert-r8, so it shares its references."""
    refs = {}
    for model in ("demo", *START_ADAPTERS):
        for prompt in PROMPTS:
            out = client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )
            refs[model, prompt] = out.choices[0].token_ids  # type: ignore[attr-defined]
    for prompt in PROMPTS:
        refs[LOADED, prompt] = refs["expert-r8", prompt]
    return refs


async def run_load(server: ServerProcess, n: int, max_tokens: int) -> tuple[list[Result], float]:
    """Wave 1 over base + four adapters; then load one and unload another; wave 2 includes the new one."""
    limits = httpx.Limits(max_connections=n + 16, max_keepalive_connections=n + 16)
    client = openai.AsyncOpenAI(
        base_url=f"{server.base_url}/v1",
        api_key=server.api_key or "none",
        max_retries=0,
        timeout=600,
        http_client=httpx.AsyncClient(limits=limits, timeout=600),
    )
    first_models = ["demo", *START_ADAPTERS]
    wave1 = [(first_models[i % 5], PROMPTS[(i // 5) % len(PROMPTS)]) for i in range(n * 3 // 4)]
    second_models = ["demo", LOADED, *[m for m in START_ADAPTERS if m != UNLOADED]]
    wave2 = [(second_models[i % 5], PROMPTS[i % len(PROMPTS)]) for i in range(n - len(wave1))]
    start = time.perf_counter()
    events = [asyncio.Event() for _ in wave1]
    tasks = [
        asyncio.create_task(one(client, m, p, max_tokens, e)) for (m, p), e in zip(wave1, events, strict=True)
    ]
    await asyncio.gather(*(e.wait() for e in events))  # every wave-1 request accepted (streaming)
    async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers, timeout=60) as http:
        loaded = await http.post("/v1/load_lora_adapter", json={"lora_name": LOADED, "lora_path": LOADED})
        unloaded = await http.post("/v1/unload_lora_adapter", json={"lora_name": UNLOADED})
    assert loaded.is_success and unloaded.is_success, (loaded.text, unloaded.text)
    tasks += [asyncio.create_task(one(client, m, p, max_tokens, asyncio.Event())) for m, p in wave2]
    results = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    await client.close()
    return list(results), elapsed


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def report(results: list[Result], refs: dict[tuple[str, str], list[int]], elapsed: float, args: Any) -> int:
    failed = [r for r in results if r.error is not None]
    wrong = [r for r in results if r.error is None and r.token_ids != refs[r.model, r.prompt]]
    tokens = sum(len(r.token_ids) for r in results)
    ttft = [r.ttft * 1000 for r in results if r.error is None]
    itl = [g * 1000 for r in results for g in r.gaps]
    print(f"requests {len(results)}  max_tokens {args.max_tokens}  tp {args.tp}  ep {args.ep}")
    print(f"{'metric':<28}{'value':>12}")
    rows = [
        ("failed requests", len(failed)),
        ("outputs != run alone", len(wrong)),
        ("wall time (s)", elapsed),
        ("requests / s", len(results) / elapsed),
        ("output tokens / s", tokens / elapsed),
    ]
    for name, value in rows:
        print(f"{name:<28}{value:>12.2f}" if isinstance(value, float) else f"{name:<28}{value:>12}")
    print(f"{'latency (ms)':<16}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    for name, values in (("TTFT", ttft), ("inter-token", itl)):
        print(
            f"{name:<16}" + "".join(f"{pct(values, q):10.1f}" for q in (50, 90, 99)) + f"{max(values):10.1f}"
        )
    for r in failed[:5]:
        print(f"failed: {r.model} {r.prompt!r}: {r.error}")
    return 1 if failed or wrong else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200, help="concurrent streaming requests")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (EOS ignored)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel processes of the server")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel groups of the server")
    parser.add_argument("serve_args", nargs="*", help="more `moelora serve` flags (after --)")
    args = parser.parse_args()
    loras = lora_dir()
    flags = [f"--lora={name}={loras / name}" for name in START_ADAPTERS]
    flags += [
        "--lora-dir",
        str(loras),
        "--tp",
        str(args.tp),
        "--ep",
        str(args.ep),
        "--max-loras-per-batch",
        "4",
    ]
    server = ServerProcess([*flags, *args.serve_args], timeout=600)
    try:
        refs = references(server.client(timeout=600), args.max_tokens)
        results, elapsed = asyncio.run(run_load(server, args.requests, args.max_tokens))
        return report(results, refs, elapsed, args)
    finally:
        server.stop()
        shutil.rmtree(loras, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
