"""The `moelora` command. Flags come from the config dataclasses' fields (see `moelora.config`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from moelora.benchmark.cli import add_bench_commands, run_bench
from moelora.config import ModelArgs, ServerArgs
from moelora.flags import (
    add_dataclass_args,
    add_model_flags,
    add_sampling_args,
    from_args,
    make_llm,
    sampling_from_args,
    start_modules,
)
from moelora.sampling_params import MAX_LOGPROBS

_GENERATE_DEFAULTS = {"max_tokens": 32}  # `generate`'s own, where the model's generation config has none


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelora", description="Serve Mixture-of-Experts LLMs with many LoRA adapters."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    forward = commands.add_parser(
        "forward", help="run one forward pass and print the likeliest next tokens of each prompt"
    )
    add_dataclass_args(forward, ModelArgs, positional=("model",))
    forward.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    forward.add_argument(
        "--top",
        type=int,
        default=5,
        help=f"how many next tokens to print, at most {MAX_LOGPROBS} (default: 5)",
    )
    add_model_flags(forward)
    _add_use(forward)
    generate = commands.add_parser("generate", help="generate completions of one or more prompts")
    add_dataclass_args(generate, ModelArgs, positional=("model",))
    add_sampling_args(generate, _GENERATE_DEFAULTS)
    generate.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    add_model_flags(generate)
    _add_use(generate)
    _add_serve(commands)
    add_bench_commands(commands)
    _add_adapter(commands)
    return parser


def _add_adapter(commands: Any) -> None:
    adapter = commands.add_parser("adapter", help="inspect or convert a LoRA adapter folder")
    actions = adapter.add_subparsers(dest="action", required=True)
    inspect = actions.add_parser(
        "inspect", help="print the layouts, targets, ranks and scales of an adapter, and whether it fits"
    )
    inspect.add_argument("path", help="the adapter folder (adapter_config.json, adapter_model.safetensors)")
    inspect.add_argument(
        "--model", help="check the adapter against this model (a folder, cached HF id, demo or preset:NAME)"
    )
    convert = actions.add_parser(
        "convert", help="write an adapter in PEFT's per-expert form (one A/B pair per expert projection)"
    )
    convert.add_argument("path", help="the adapter folder to read")
    convert.add_argument("out", help="the folder to write (new or empty)")
    convert.add_argument(
        "--model", required=True, help="the model the adapter is for (only its config is read)"
    )


def _adapter(args: argparse.Namespace) -> int:
    from moelora.loader.model_loader import read_model_config
    from moelora.loader.resolve import resolve_model
    from moelora.lora.inspect import convert_adapter, format_report, inspect_adapter

    model = None
    if args.model is not None:
        cfg, family = read_model_config(resolve_model(args.model))
        model = (args.model, cfg, family)
    if args.action == "inspect":
        report = inspect_adapter(args.path, model)
        print(format_report(report))
        return 0 if report.fits is not False else 1
    assert model is not None  # --model is required by the parser
    out = convert_adapter(args.path, args.out, model)
    print(f"wrote {out} (PEFT per-expert form for {args.model})")
    return 0


def _add_use(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--use",
        action="append",
        metavar="NAME",
        help="run every prompt on this adapter ('base' for none; repeatable; "
        "default: base and every adapter)",
    )


def _uses(args: argparse.Namespace, modules: dict[str, Any]) -> list[str | None]:
    return [None if u == "base" else u for u in (args.use or ["base", *modules])]


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_dataclass_args(serve, ModelArgs, positional=("model",))
    add_dataclass_args(serve, ServerArgs)
    add_model_flags(serve)


def _forward(args: argparse.Namespace) -> int:
    modules = start_modules(args, from_args(ModelArgs, args).model)
    uses = _uses(args, modules)
    prompts = args.prompt or ["The capital of France is"]
    with make_llm(args, modules) as llm:
        batch = [(p, u) for p in prompts for u in uses]
        tops = llm.top_next_tokens([p for p, _ in batch], args.top, lora=[u for _, u in batch])
        for (prompt, use), top in zip(batch, tops, strict=True):
            print(f"prompt: {prompt!r}" + (f"  adapter: {use}" if len(uses) > 1 or use else ""))
            for token, prob in top:
                print(f"  {prob:7.4f}  {token!r}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    sampling_from_args(args, {}, _GENERATE_DEFAULTS)  # bad sampling flags fail before the model loads
    modules = start_modules(args, from_args(ModelArgs, args).model)
    uses = _uses(args, modules)
    prompts = args.prompt or ["The weather today is"]
    with make_llm(args, modules) as llm:
        params = sampling_from_args(args, llm.sampling_defaults, _GENERATE_DEFAULTS)
        if args.chat:
            prompts = [llm.chat_prompt(p) for p in prompts]
        batch = [(p, u) for p in prompts for u in uses]  # one mixed batch: every prompt on every adapter
        outputs = llm.generate([p for p, _ in batch], params, lora=[u for _, u in batch])
        for (prompt, use), out in zip(batch, outputs, strict=True):
            print(f"prompt: {prompt!r}  adapter: {use or 'base model'}")
            for c in out.outputs:
                label = f"[{c.index}] " if len(out.outputs) > 1 else ""
                print(f"  {label}completion ({c.finish_reason}, {len(c.token_ids)} tokens): {c.text!r}")
                for tok, lps in zip(c.token_ids, c.logprobs or [], strict=False):
                    top = ", ".join(f"{llm.decode([t])!r}: {v:.3f}" for t, v in lps.items())
                    print(f"      {llm.decode([tok])!r} <- {{{top}}}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    from moelora.server.context import default_served_name
    from moelora.server.serving import check_port_free, serve

    margs: ModelArgs = from_args(ModelArgs, args)
    sargs: ServerArgs = from_args(ServerArgs, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    check_port_free(sargs.host, sargs.port)  # before minutes of loading, not after
    # Runtime loading needs adapter slots even when no adapter is given at start.
    modules = start_modules(args, margs.model)
    with make_llm(args, modules, enable_lora=sargs.lora_dir is not None) as llm:
        serve(llm, sargs, sargs.served_model_name or default_served_name(margs.model))
    return 0


# vLLM flags that mean nothing here: each gets an error that says why and what to use instead.
VLLM_ONLY = {
    "--pipeline-parallel-size": "moelora splits models by tensor and expert parallelism: --tp and --ep",
    "-pp": "moelora splits models by tensor and expert parallelism: --tp and --ep",
    "--data-parallel-size": "run one moelora server per replica; inside one, --tp and --ep",
    "--swap-space": "preempted requests are recomputed, never swapped: size the KV cache with "
    "--kv-cache-memory or --gpu-memory-utilization",
    "--cpu-offload-gb": "weights stay on the device: lower --max-model-len or use more GPUs (--tp)",
    "--kv-cache-dtype": "the KV cache is kept in --dtype",
    "--tokenizer": "the tokenizer is read from the model folder",
    "--tokenizer-mode": "the tokenizer is read from the model folder",
    "--download-dir": "moelora never downloads: `hf download ID` first, or give the folder",
    "--revision": "moelora never downloads: give the folder of the revision you want",
    "--chat-template": "the chat template is the tokenizer's, from the model folder",
    "--lora-extra-vocab-size": "adapters that add tokens are refused; nothing to size",
    "--fully-sharded-loras": "adapters are always sharded like the weights they modify",
    "--max-seq-len-to-capture": "decode graphs cover every batch size up to --max-num-seqs",
    "--disable-log-requests": "moelora logs no per-request lines; drop the flag",
    "--disable-log-stats": "moelora logs no periodic stats (see /metrics); drop the flag",
}


def _vllm_only(argv: Sequence[str]) -> str | None:
    """The error for the first vLLM flag in argv that means nothing here, if any."""
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in VLLM_ONLY:
            return f"{flag} is a vLLM flag with no meaning here: {VLLM_ONLY[flag]}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    refused = _vllm_only(argv)
    if refused:
        print(f"moelora: error: {refused}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        if args.command == "forward":
            return _forward(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "bench":
            return run_bench(args)
        if args.command == "adapter":
            return _adapter(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"moelora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: whatever ran has already shut down cleanly
        print("moelora: interrupted", file=sys.stderr)
        return 130
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
