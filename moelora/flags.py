"""Command-line flags generated from frozen dataclasses: one flag per field, help and aliases from its
metadata (`moelora.config.option`), so the Python API, the CLI and the docs cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from moelora.config import DummyLoraArgs, EngineArgs, LoraArgs, ModelArgs, ParallelArgs
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
    """One flag per field of `cls` (`--tp-size` for tp_size, plus the aliases in its metadata).

    A tuple field takes one or more values (`--batch-size 1 16 64`); its metadata's `nargs` says so."""
    for f in dataclasses.fields(cls):
        meta, default = f.metadata, f.default
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        kwargs: dict[str, Any] = {"help": f"{meta.get('help', '')} (default: {shown})"}
        if f.name in positional:
            parser.add_argument(f.name, nargs="?", default=default, **kwargs)
            continue
        flags = [f"--{f.name.replace('_', '-')}", *meta.get("aliases", ())]
        if isinstance(default, bool):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, **kwargs)
            continue
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
        kind = _field_type(f)
        parser.add_argument(*flags, dest=f.name, type=kind, default=default, **kwargs)


def _field_type(f: dataclasses.Field[Any]) -> type:
    """int, float or str from the field's annotation (`int | None` -> int, `tuple[int, ...]` -> int)."""
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    first = annotation.split(" | ")[0].removeprefix("tuple[").split(",")[0]
    for name, kind in (("int", int), ("float", float)):
        if first == name:
            return kind
    return str


# SamplingParams fields a model's generation config may set (see moelora.generation_config).
_MODEL_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")


def add_sampling_args(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """Flags for SamplingParams (`--sampling-seed` for its seed: `--seed` is the engine's). A flag not
    given is absent from the namespace: the model's generation config, then `defaults`, then
    SamplingParams' own default apply (`sampling_from_args`)."""
    for f in dataclasses.fields(SamplingParams):
        flag = "--sampling-seed" if f.name == "seed" else f"--{f.name.replace('_', '-')}"
        shown = (defaults or {}).get(f.name, f.default)
        shown = "none" if shown in ((), None) else shown
        where = "the model's generation config, else " if f.name in _MODEL_DEFAULTS else ""
        kwargs: dict[str, Any] = {
            "dest": f"sp_{f.name}",
            "default": argparse.SUPPRESS,
            "help": f"{_SAMPLING_HELP[f.name]} (default: {where}{shown})",
        }
        if f.name in ("stop", "stop_token_ids"):
            parser.add_argument(
                flag, action="append", type=int if f.name == "stop_token_ids" else str, **kwargs
            )
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, type=_field_type(f), **kwargs)


def sampling_from_args(
    args: argparse.Namespace, model_defaults: dict[str, Any], defaults: dict[str, Any] | None = None
) -> SamplingParams:
    """The sampling flags given, over the model's defaults, over `defaults` (e.g. the command's own)."""
    given = {
        f.name: getattr(args, f"sp_{f.name}")
        for f in dataclasses.fields(SamplingParams)
        if hasattr(args, f"sp_{f.name}")
    }
    return SamplingParams(**((defaults or {}) | model_defaults | given))


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """An instance of `cls` from the flags `add_dataclass_args` made (lists of values become tuples)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def dataclass_argv(obj: Any, skip: Sequence[str] = ()) -> list[str]:
    """The flags that rebuild `obj` from its class's defaults (those of `add_dataclass_args`)."""
    argv: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in skip or value == f.default or value is None:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{f.name.replace('_', '-')}")
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that build an LLM besides ModelArgs' (added by the caller, with its positional model):
    parallel layout, engine, adapter slots, adapters to load at start."""
    add_dataclass_args(parser, ParallelArgs)
    add_dataclass_args(parser, EngineArgs)
    add_dataclass_args(parser, LoraArgs)
    add_dataclass_args(parser, DummyLoraArgs)
    parser.add_argument(
        "--lora", action="append", metavar="NAME=PATH", help="load a PEFT adapter at start (repeatable)"
    )
    parser.add_argument(
        "--lora-modules",
        action="extend",
        nargs="+",
        metavar="NAME=PATH",
        help='vLLM\'s form of --lora: several NAME=PATH (or JSON {"name": ..., "path": ...}) at once',
    )
    parser.add_argument(
        "--no-demo-adapters", action="store_true", help="with the demo model, do not load its demo adapters"
    )
    parser.add_argument(
        "--enforce-eager", dest="cuda_graphs", action="store_false", help="vLLM's name for --no-cuda-graphs"
    )


def model_kwargs(margs: ModelArgs) -> dict[str, Any]:
    """LLM's arguments for the model flags (ModelArgs' fields are LLM's keyword arguments of one name)."""
    return dataclasses.asdict(margs)


def parse_lora_modules(items: Sequence[str] | None) -> dict[str, str]:
    """`NAME=PATH` pairs (or vLLM's JSON objects with "name" and "path") from --lora / --lora-modules."""
    modules: dict[str, str] = {}
    for item in items or []:
        if item.lstrip().startswith("{"):
            try:
                spec = json.loads(item)
                name, path = str(spec["name"]), str(spec["path"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f'--lora-modules JSON needs "name" and "path", got \'{item}\'') from e
        else:
            name, sep, path = item.partition("=")
            if not sep:
                name = path = ""
        if not name or not path:
            raise ValueError(f"--lora expects NAME=PATH, got '{item}'")
        if name in modules:
            raise ValueError(f"--lora names '{name}' twice")
        modules[name] = path
    return modules


def make_llm(args: argparse.Namespace, modules: dict[str, Any], enable_lora: bool = False) -> Any:
    """The LLM the model, parallel, engine and adapter flags describe, with `modules` loaded at start."""
    from moelora.llm import LLM

    margs: ModelArgs = from_args(ModelArgs, args)
    pargs: ParallelArgs = from_args(ParallelArgs, args)
    eargs: EngineArgs = from_args(EngineArgs, args)
    largs: LoraArgs = from_args(LoraArgs, args)
    largs = dataclasses.replace(largs, enable_lora=largs.enable_lora or enable_lora)
    return LLM(
        **model_kwargs(margs),
        **dataclasses.asdict(pargs),
        lora_modules=modules,
        **dataclasses.asdict(largs),
        **dataclasses.asdict(eargs),
    )


def start_modules(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Adapters to load at start: --lora, then --dummy-loras (dummy-0, dummy-1, ...); with neither, the demo
    model's own unless --no-demo-adapters."""
    from moelora.demo import DEMO_NAME, demo_adapter_paths
    from moelora.lora.dummy import DummyLora, parse_targets

    modules: dict[str, Any] = dict(parse_lora_modules([*(args.lora or []), *(args.lora_modules or [])]))
    dummy: DummyLoraArgs = from_args(DummyLoraArgs, args)
    if dummy.dummy_loras:
        targets = parse_targets(dummy.dummy_lora_targets)
        for i in range(dummy.dummy_loras):
            modules[f"dummy-{i}"] = DummyLora(dummy.dummy_lora_rank, seed=i + 1, targets=targets)
    if not modules and model == DEMO_NAME and not args.no_demo_adapters:
        modules = dict(demo_adapter_paths())
    return modules
