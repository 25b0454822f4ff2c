"""The `moelora` command. Flags come from the config dataclasses' fields (see `moelora.config`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from moelora.config import EngineArgs, LoraArgs, ModelArgs, ParallelArgs, ServerArgs
from moelora.sampling_params import SamplingParams

_SAMPLING_HELP = {
    "n": "completions per prompt",
    "temperature": "softmax temperature; 0 = greedy",
    "top_p": "nucleus sampling mass",
    "top_k": "keep the k likeliest tokens; -1 = off",
    "min_p": "drop tokens below min_p x the likeliest one's probability",
    "repetition_penalty": "penalty for tokens of the prompt and output; 1 = off",
    "presence_penalty": "subtracted from logits of tokens already generated",
    "frequency_penalty": "subtracted per occurrence in the output",
    "seed": "per-request sampling seed",
    "max_tokens": "most tokens to generate",
    "min_tokens": "no EOS or stop token before this many tokens",
    "stop": "stop string, excluded from the text (repeatable)",
    "stop_token_ids": "token id that stops generation (repeatable)",
    "ignore_eos": "keep generating after EOS",
    "logprobs": "print the top-N log-probs of each generated token",
    "prompt_logprobs": "top-N log-probs of each prompt token",
    "skip_special_tokens": "leave special tokens out of the text",
}


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, positional: Sequence[str] = ()) -> None:
    """One flag per field of `cls` (`--tp-size` for tp_size, plus the aliases in its metadata)."""
    for f in dataclasses.fields(cls):
        meta, default = f.metadata, f.default
        kwargs: dict[str, Any] = {"help": f"{meta.get('help', '')} (default: {default})"}
        if f.name in positional:
            parser.add_argument(f.name, nargs="?", default=default, **kwargs)
            continue
        flags = [f"--{f.name.replace('_', '-')}", *meta.get("aliases", ())]
        if isinstance(default, bool):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, **kwargs)
            continue
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        kind = _field_type(f)
        parser.add_argument(*flags, dest=f.name, type=kind, default=default, **kwargs)


def _field_type(f: dataclasses.Field[Any]) -> type:
    """int, float or str from the field's annotation (`int | None` -> int)."""
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    for name, kind in (("int", int), ("float", float)):
        if annotation.split(" | ")[0] == name:
            return kind
    return str


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Flags for SamplingParams (`--sampling-seed` for its seed: `--seed` is the engine's)."""
    for f in dataclasses.fields(SamplingParams):
        flag = "--sampling-seed" if f.name == "seed" else f"--{f.name.replace('_', '-')}"
        kwargs: dict[str, Any] = {
            "dest": f"sp_{f.name}",
            "default": f.default,
            "help": _SAMPLING_HELP[f.name],
        }
        if f.name in ("stop", "stop_token_ids"):
            kwargs["default"] = None
            parser.add_argument(
                flag, action="append", type=int if f.name == "stop_token_ids" else str, **kwargs
            )
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, type=_field_type(f), **kwargs)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        **{f.name: getattr(args, f"sp_{f.name}") for f in dataclasses.fields(SamplingParams)}
    )


def from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


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
    add_dataclass_args(generate, ParallelArgs)
    add_dataclass_args(generate, EngineArgs)
    add_sampling_args(generate)
    generate.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    add_dataclass_args(generate, LoraArgs)
    generate.add_argument(
        "--lora", action="append", metavar="NAME=PATH", help="load a PEFT adapter (repeatable)"
    )
    generate.add_argument(
        "--use",
        action="append",
        metavar="NAME",
        help="run every prompt on this adapter ('base' for none; repeatable; "
        "default: base and every adapter)",
    )
    generate.add_argument(
        "--no-demo-adapters", action="store_true", help="with the demo model, do not load its demo adapters"
    )
    generate.set_defaults(sp_max_tokens=32)
    _add_serve(commands)
    return parser


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_dataclass_args(serve, ModelArgs, positional=("model",))
    add_dataclass_args(serve, ServerArgs)
    add_dataclass_args(serve, ParallelArgs)
    add_dataclass_args(serve, EngineArgs)
    add_dataclass_args(serve, LoraArgs)
    serve.add_argument(
        "--lora", action="append", metavar="NAME=PATH", help="load a PEFT adapter at start (repeatable)"
    )
    serve.add_argument(
        "--no-demo-adapters", action="store_true", help="with the demo model, do not load its demo adapters"
    )


def _forward(args: argparse.Namespace) -> int:
    from moelora.llm import LLM

    margs: ModelArgs = from_args(ModelArgs, args)
    prompts = args.prompt or ["The capital of France is"]
    llm = LLM(margs.model, dtype=margs.dtype, device=margs.device, seed=margs.seed, progress=margs.progress)
    with llm:
        for prompt, top in zip(prompts, llm.top_next_tokens(prompts, args.top), strict=True):
            print(f"prompt: {prompt!r}")
            for token, prob in top:
                print(f"  {prob:7.4f}  {token!r}")
    return 0


def parse_lora_modules(items: Sequence[str] | None) -> dict[str, str]:
    """`NAME=PATH` pairs from repeated --lora flags."""
    modules: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora expects NAME=PATH, got '{item}'")
        if name in modules:
            raise ValueError(f"--lora names '{name}' twice")
        modules[name] = path
    return modules


def _make_llm(args: argparse.Namespace, modules: dict[str, Any], enable_lora: bool = False) -> Any:
    """The LLM the model, parallel, engine and adapter flags describe, with `modules` loaded at start."""
    from moelora.llm import LLM

    margs: ModelArgs = from_args(ModelArgs, args)
    pargs: ParallelArgs = from_args(ParallelArgs, args)
    eargs: EngineArgs = from_args(EngineArgs, args)
    largs: LoraArgs = from_args(LoraArgs, args)
    largs = dataclasses.replace(largs, enable_lora=largs.enable_lora or enable_lora)
    return LLM(
        margs.model,
        dtype=margs.dtype,
        device=margs.device,
        seed=margs.seed,
        progress=margs.progress,
        tp_size=pargs.tp_size,
        ep_size=pargs.ep_size,
        lora_modules=modules,
        **dataclasses.asdict(largs),
        **dataclasses.asdict(eargs),
    )


def _generate(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)
    modules = _start_modules(args, from_args(ModelArgs, args).model)
    uses: list[str | None] = [None if u == "base" else u for u in (args.use or ["base", *modules])]
    prompts = args.prompt or ["The weather today is"]
    with _make_llm(args, modules) as llm:
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


def _start_modules(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Adapters to load at start: --lora, or the demo model's own unless --no-demo-adapters."""
    from moelora.demo import DEMO_NAME, demo_adapter_paths

    modules: dict[str, Any] = dict(parse_lora_modules(args.lora))
    if not modules and model == DEMO_NAME and not args.no_demo_adapters:
        modules = dict(demo_adapter_paths())
    return modules


def _serve(args: argparse.Namespace) -> int:
    import logging

    from moelora.server.app import serve
    from moelora.server.context import default_served_name

    margs: ModelArgs = from_args(ModelArgs, args)
    sargs: ServerArgs = from_args(ServerArgs, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    # Runtime loading needs adapter slots even when no adapter is given at start.
    modules = _start_modules(args, margs.model)
    with _make_llm(args, modules, enable_lora=sargs.lora_dir is not None) as llm:
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
    except (ValueError, FileNotFoundError) as e:
        print(f"moelora: error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
