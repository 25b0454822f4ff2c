"""`moelora bench latency | throughput | serve`: the flags (the model's, as `generate` takes them, plus the
workload's and each benchmark's own) and the runs."""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
from typing import Any

from moelora.benchmark.args import LatencyArgs, ServeBenchArgs, ThroughputArgs, WorkloadArgs
from moelora.config import DummyLoraArgs, EngineArgs, LoraArgs, ModelArgs, ParallelArgs
from moelora.flags import add_dataclass_args, add_model_flags, dataclass_argv, from_args

_KINDS: dict[str, tuple[type, str]] = {
    "latency": (LatencyArgs, "fixed batches: prefill time and decode time per step, against the byte floor"),
    "throughput": (ThroughputArgs, "every prompt at once (offline): requests and tokens per second"),
    "serve": (
        ServeBenchArgs,
        "streaming requests at a Poisson rate against `moelora serve`: TTFT, TPOT, ITL",
    ),
}


def add_bench_commands(commands: Any) -> None:
    bench = commands.add_parser("bench", help="benchmark a model end to end (dummy weights need no files)")
    kinds = bench.add_subparsers(dest="bench", required=True)
    for name, (cls, help_text) in _KINDS.items():
        parser = kinds.add_parser(name, help=help_text, description=help_text)
        add_dataclass_args(parser, ModelArgs, positional=("model",))
        add_model_flags(parser)
        add_dataclass_args(parser, WorkloadArgs)
        add_dataclass_args(parser, cls)


def run_bench(args: argparse.Namespace) -> int:
    # Each row's line as soon as it is measured, also into a file or a pipe: a run cut short (a time
    # limit, Ctrl-C) keeps the rows it finished.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    workload: WorkloadArgs = from_args(WorkloadArgs, args)
    if args.bench == "serve":
        return _run_serve(args, workload)
    from moelora.benchmark.report import memory, write_json
    from moelora.benchmark.session import open_session
    from moelora.flags import make_llm, start_modules

    margs: ModelArgs = from_args(ModelArgs, args)
    specific = from_args(_KINDS[args.bench][0], args)
    modules = start_modules(args, margs.model)
    with make_llm(args, modules) as llm:
        session = open_session(llm, workload, list(modules), margs.seed)
        _print_header(session.env, session.settings() | {"memory": memory(llm.device)})
        rows = _latency(session, specific) if args.bench == "latency" else _throughput(session, specific)
        settings = session.settings() | {"bench": args.bench, "args": specific, "memory": memory(llm.device)}
        write_json(workload.output_json, {"env": session.env, "settings": settings, "rows": rows})
    return 0


def _latency(session: Any, args: LatencyArgs) -> list[dict[str, Any]]:
    from moelora.benchmark.latency import print_latency, run_latency
    from moelora.benchmark.plot import plot_latency

    rows = run_latency(session, args)
    print_latency(session, rows)
    summaries = [r.summary() for r in rows]
    if session.workload.plot:
        title = f"{session.llm.args.model}, {session.env['device']}: input {session.workload.input_len}"
        plot_latency(session.workload.plot, summaries, title)
    return summaries


def _throughput(session: Any, args: ThroughputArgs) -> list[dict[str, Any]]:
    from moelora.benchmark.plot import plot_throughput
    from moelora.benchmark.throughput import print_throughput, run_throughput

    rows = run_throughput(session, args)
    print_throughput(session, rows)
    summaries = [r.summary() for r in rows]
    if session.workload.plot:
        plot_throughput(
            session.workload.plot, summaries, f"{session.llm.args.model}, {session.env['device']}"
        )
    return summaries


def _print_header(env: dict[str, Any], settings: dict[str, Any]) -> None:
    ceilings, memory = settings["ceilings"], settings["memory"]
    used = f"; {memory['device_used_gib']:.1f} GiB in use on the card" if memory else ""
    gemm = f", dense GEMM {ceilings.gemm_flops / 1e12:.0f} TFLOP/s" if ceilings.gemm_flops else ""
    on = {True: "on", False: "off"}
    s = settings
    versions = f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}"
    layout = f"tp {s['tp_size']} ep {s['ep_size']}"
    switches = f"prefix caching {on[s['prefix_caching']]}, CUDA graphs {on[s['cuda_graphs']]}"
    if "chunked_prefill" in s:  # (older JSON files have no such key)
        switches += f", chunked prefill {on[s['chunked_prefill']]} ({s['step_tokens']} tokens a step)"
    copy = (
        f"copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s, read {ceilings.read_bytes_per_s / 1e12:.2f} TB/s"
    )
    fp8 = ", FP8 weights" if s.get("quantization") == "fp8" else ""
    model = f"{s['model']} ({s['load_format']} weights), {s['dtype']}{fp8}, {layout}"
    plan = f"; MOELORA_PLAN={env['kernel_plan']!r}" if env.get("kernel_plan") else ""
    print(f"\n{env['device']}; {versions}; {model}; {switches}; {copy}{gemm}{used}{plan}; {env['date']}")


def _run_serve(args: argparse.Namespace, workload: WorkloadArgs) -> int:
    """Start `moelora serve` with the model flags (unless --base-url names a running one), run each mix."""
    from moelora.benchmark.report import environment, write_json
    from moelora.benchmark.serve import drive, print_serve, summarize
    from moelora.benchmark.server_proc import ServerProcess
    from moelora.benchmark.workload import PromptMaker, build_mixes
    from moelora.config import parse_overrides
    from moelora.flags import start_modules
    from moelora.loader.model_loader import read_model_config
    from moelora.loader.resolve import resolve_model

    sargs: ServeBenchArgs = from_args(ServeBenchArgs, args)
    margs: ModelArgs = from_args(ModelArgs, args)
    cfg, _ = read_model_config(resolve_model(margs.model), parse_overrides(margs.hf_overrides))
    server = None
    if sargs.base_url is None:
        modules = start_modules(args, margs.model)
        server = ServerProcess(_serve_argv(args), api_key=sargs.api_key, timeout=3600)
    base_url = sargs.base_url or server.base_url  # type: ignore[union-attr]
    try:
        served, adapters = _served_names(base_url, sargs.api_key)
        if server is not None:
            adapters = [a for a in modules if a in adapters]
        mixes = build_mixes(workload, adapters)
        prompts = PromptMaker(cfg.vocab_size, workload, margs.seed)
        rows = []
        for mix in mixes:
            warm = min(8, sargs.num_prompts)
            asyncio.run(drive(base_url, served, prompts.make(warm), mix.assign(warm), workload, sargs, False))
            n = sargs.num_prompts
            outcomes, duration = asyncio.run(
                drive(base_url, served, prompts.make(n), mix.assign(n), workload, sargs, margs.progress)
            )
            rows.append(summarize(mix, outcomes, duration, sargs))
    finally:
        if server is not None:
            server.stop()
    title = (
        f"bench serve: {served} at {base_url}, rate {sargs.request_rate} req/s, input {workload.input_len}, "
        f"output {workload.output_len}"
    )
    print_serve(rows, title)
    env = environment(__import__("torch").device("cpu")) | {"server": base_url}
    settings = {"bench": "serve", "model": margs.model, "args": sargs, "workload": workload}
    write_json(workload.output_json, {"env": env, "settings": settings, "rows": rows})
    return 0


def _served_names(base_url: str, api_key: str | None) -> tuple[str, list[str]]:
    """(the base model's name, the adapters' names) from the server's /v1/models."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    cards = httpx.get(f"{base_url.rstrip('/')}/v1/models", headers=headers, timeout=30).json()["data"]
    base = next(c["id"] for c in cards if not c.get("parent"))
    return base, [c["id"] for c in cards if c.get("parent")]


def _serve_argv(args: argparse.Namespace) -> list[str]:
    """`moelora serve`'s arguments for the model, parallel, engine and adapter flags given here."""
    argv = [args.model]
    for cls in (ModelArgs, ParallelArgs, EngineArgs, LoraArgs, DummyLoraArgs):
        argv += dataclass_argv(from_args(cls, args), skip=("model",))
    for item in args.lora or []:
        argv += ["--lora", item]
    if args.no_demo_adapters:
        argv.append("--no-demo-adapters")
    return argv
