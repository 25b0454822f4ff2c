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
    model_kwargs,
    sampling_from_args,
    start_modules,
)


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
    forward.add_argument("--top", type=int, default=5, help="how many next tokens to print (default: 5)")
    generate = commands.add_parser("generate", help="generate completions of one or more prompts")
    add_dataclass_args(generate, ModelArgs, positional=("model",))
    add_sampling_args(generate)
    generate.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    add_model_flags(generate)
    generate.add_argument(
        "--use",
        action="append",
        metavar="NAME",
        help="run every prompt on this adapter ('base' for none; repeatable; "
        "default: base and every adapter)",
    )
    generate.set_defaults(sp_max_tokens=32)
    _add_serve(commands)
    add_bench_commands(commands)
    return parser


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_dataclass_args(serve, ModelArgs, positional=("model",))
    add_dataclass_args(serve, ServerArgs)
    add_model_flags(serve)


def _forward(args: argparse.Namespace) -> int:
    from moelora.llm import LLM

    margs: ModelArgs = from_args(ModelArgs, args)
    prompts = args.prompt or ["The capital of France is"]
    with LLM(**model_kwargs(margs)) as llm:
        for prompt, top in zip(prompts, llm.top_next_tokens(prompts, args.top), strict=True):
            print(f"prompt: {prompt!r}")
            for token, prob in top:
                print(f"  {prob:7.4f}  {token!r}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)
    modules = start_modules(args, from_args(ModelArgs, args).model)
    uses: list[str | None] = [None if u == "base" else u for u in (args.use or ["base", *modules])]
    prompts = args.prompt or ["The weather today is"]
    with make_llm(args, modules) as llm:
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

    from moelora.server.app import serve
    from moelora.server.context import default_served_name

    margs: ModelArgs = from_args(ModelArgs, args)
    sargs: ServerArgs = from_args(ServerArgs, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    # Runtime loading needs adapter slots even when no adapter is given at start.
    modules = start_modules(args, margs.model)
    with make_llm(args, modules, enable_lora=sargs.lora_dir is not None) as llm:
        serve(llm, sargs, sargs.served_model_name or default_served_name(margs.model))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
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
    except (ValueError, FileNotFoundError) as e:
        print(f"moelora: error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
