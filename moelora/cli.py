"""The `moelora` command. Flags come from the config dataclasses' fields (see `moelora.config`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from moelora.config import ModelArgs


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
        kind = type(default) if default is not None else str
        parser.add_argument(*flags, dest=f.name, type=kind, default=default, **kwargs)


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
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "forward":
            return _forward(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"moelora: error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
