"""The Python API: `LLM(model, ...)` loads a model and its tokenizer and runs it."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moelora import ops
from moelora.config import EngineArgs, LoraArgs, ModelArgs, ParallelArgs, parse_overrides
from moelora.demo import DEMO_NAME, demo_adapter_paths
from moelora.engine.detokenizer import token_bytes
from moelora.engine.engine import Engine, encode_prompt
from moelora.engine.graphs import free_cublas_workspaces
from moelora.engine.heap import freeze_heap, thaw_heap
from moelora.engine.messages import Stop
from moelora.engine.worker import run_torchrun_worker
from moelora.generation_config import sampling_defaults
from moelora.loader.model_loader import check_layout, load_model, resolve_device, resolve_load_format
from moelora.loader.resolve import resolve_model
from moelora.lora.dummy import DummyLora
from moelora.lora.manager import LoraInfo
from moelora.lora.source import as_source, load_adapter
from moelora.ops.torch.sample import forget_column_hashes
from moelora.outputs import RequestOutput
from moelora.parallel.launch import LaunchSpec, WorkerGroup, device_for, torchrun_rank
from moelora.sampling_params import SamplingParams

Prompt = str | Sequence[int]
_DEFAULT_LORA_RANK = 16  # vLLM's default max_lora_rank

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(folder: Path) -> Any:
    """The folder's Hugging Face tokenizer, or None if it has none (prompts must then be token ids)."""
    if not any((folder / name).exists() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def generation_eos_ids(folder: Path) -> tuple[int, ...]:
    """EOS ids from generation_config.json (official checkpoints list more there than in config.json)."""
    path = folder / "generation_config.json"
    try:
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return ()
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items: list[Any] = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # one prompt of token ids
    return items


def _per_prompt(value: Any, n: int, name: str, kind: type) -> list[Any]:
    if value is None or isinstance(value, kind):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} prompts: give one, or one per prompt")
    return values


class LLMShutDownError(RuntimeError):
    """An LLM used after `shutdown()` (or after its `with` block)."""


class LLM:
    """A loaded model. `LLM("demo")` needs no download; a folder or a cached Hugging Face id works too.

    Use as a context manager (or call `shutdown()`) to release the model's memory deterministically.
    """

    def __init__(
        self,
        model: str = "demo",
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        tp_size: int = 1,
        ep_size: int = 1,
        enable_expert_parallel: bool = False,
        progress: bool = True,
        lora_modules: Mapping[str, str | Path | DummyLora] | None = None,
        max_loras_per_batch: int = 4,
        max_lora_rank: int | None = None,
        max_cpu_loras: int | None = None,
        enable_lora: bool = False,
        load_format: str = "auto",
        hf_overrides: Mapping[str, Any] | str | None = None,
        quantization: str | None = None,
        generation_config: str = "auto",
        trust_remote_code: bool = False,
        kernel_backend: str = "auto",
        **engine_args: Any,
    ) -> None:
        """`engine_args`: any field of `moelora.config.EngineArgs` (block_size, num_kv_blocks, ...).

        `load_format="dummy"` draws random weights on the device from config.json alone (benchmarks; the
        default "auto" does so for `preset:NAME` models); `hf_overrides` replaces config.json fields, e.g.
        {"num_hidden_layers": 4}. `quantization="fp8"` holds the routed experts' weights in FP8 (half their
        bytes; adapters stay in `dtype`): a block-FP8 checkpoint's own (the default for one, "auto"), or
        quantised at load; "none" serves every weight in `dtype`. `generation_config`: where default sampling
        parameters come from ("auto": the model's generation_config.json, "vllm": none, or a folder).
        `trust_remote_code` is accepted for vLLM compatibility and changes nothing: moelora never runs a
        model's own code.
        `kernel_backend`: "auto" (Triton on CUDA), "torch" or "triton", for every op of this process.

        `lora_modules` {name: PEFT adapter folder or DummyLora} are loaded at start (for "demo", its demo
        adapters unless given); adapters can also be loaded later with `load_lora` when adapters are on
        (`lora_modules` given or `enable_lora=True`). Adapter slots hold rank `max_lora_rank`, default 16
        or the largest start adapter's rank if that is larger.
        """
        self.lora_args = LoraArgs(enable_lora, max_loras_per_batch, max_lora_rank, max_cpu_loras)
        overrides = parse_overrides(dict(hf_overrides) if isinstance(hf_overrides, Mapping) else hf_overrides)
        self.args = ModelArgs(
            model=str(model),
            dtype=str(dtype),
            device=device,
            seed=seed,
            progress=progress,
            load_format=load_format,
            hf_overrides=json.dumps(overrides) if overrides else None,
            quantization=quantization or "auto",
            generation_config=generation_config,
            trust_remote_code=trust_remote_code,
            kernel_backend=kernel_backend,
        )
        ops.use_backend(kernel_backend)
        self.hf_overrides = overrides
        self.parallel = ParallelArgs(tp_size, ep_size, enable_expert_parallel)
        known = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise TypeError(f"LLM() got unknown arguments {unknown}; engine arguments are {sorted(known)}")
        self.engine_args = EngineArgs(max_model_len=max_model_len, **engine_args)
        self.model_path = resolve_model(model)
        self.load_format = resolve_load_format(load_format, self.model_path)  # auto resolved
        # Request fields left unset take these (the model's generation config by default).
        self.sampling_defaults = sampling_defaults(generation_config, self.model_path)
        if lora_modules is None and str(model) == DEMO_NAME:
            lora_modules = dict(demo_adapter_paths())
        self.workers: WorkerGroup | None = None
        torch.manual_seed(seed)
        if tp_size == 1 and torchrun_rank(1) is None:
            self.model = load_model(self.model_path, device=device, **self._load_options(dtype))
        else:
            self.model = self._start_parallel(dtype, device, seed, progress)
        self.device = next(self.model.parameters()).device
        self.tokenizer: Any = load_tokenizer(self.model_path)
        self._token_bytes: Callable[[int], bytes] | None = None
        try:  # from here on a failure must not leave worker processes or the engine thread behind
            start_adapters = {
                name: load_adapter(
                    name,
                    as_source(src),
                    self.model.cfg,
                    self.model.family,
                    max_lora_rank,
                    dtype=self.model.dtype,
                    device=self.device,
                )
                for name, src in (lora_modules or {}).items()
            }
            lora_rank = None
            if start_adapters or enable_lora or max_lora_rank is not None:
                lora_rank = max_lora_rank or max(
                    [_DEFAULT_LORA_RANK, *(a.rank for a in start_adapters.values())]
                )
            self.engine = Engine(
                self.model,
                self.tokenizer,
                self.engine_args,
                seed=seed,
                eos_token_ids=generation_eos_ids(self.model_path),
                lora_rank=lora_rank,
                lora_args=self.lora_args,
                workers=self.workers,
            )
            for name, adapter in start_adapters.items():
                assert self.engine.loras is not None
                self.engine.loras.register(name, adapter, pinned=False)
            freeze_heap()  # no full collection of the loaded model's objects inside a decode step
        except BaseException:
            self.shutdown()
            raise

    def _load_options(self, dtype: str | torch.dtype) -> dict[str, Any]:
        """The load_model arguments every rank uses alike (the device and parallel state differ)."""
        a = self.args
        return dict(
            dtype=dtype,
            progress=a.progress,
            load_format=a.load_format,
            hf_overrides=self.hf_overrides,
            seed=a.seed,
            quantization=a.quantization,
        )

    def _start_parallel(self, dtype: str | torch.dtype, device: str, seed: int, progress: bool) -> Any:
        """Check the layout, start the worker processes, load rank 0's share; the workers load theirs."""
        tp, ep = self.parallel.tp_size, self.parallel.experts_over
        check_layout(self.model_path, tp, ep, self.hf_overrides)
        device_type = resolve_device(device).type
        if device_type == "cuda" and torch.cuda.device_count() < tp:
            raise ValueError(f"tp_size={tp} needs {tp} GPUs; torch sees {torch.cuda.device_count()}")
        threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // tp))
        spec = LaunchSpec(
            str(self.model_path),
            str(dtype).removeprefix("torch."),
            device_type,
            tp,
            ep,
            seed,
            threads,
            load_format=self.args.load_format,
            hf_overrides=self.hf_overrides or None,
            kernel_backend=self.args.kernel_backend,
            quantization=self.args.quantization,
        )
        rank = torchrun_rank(tp)
        if rank is not None and rank != 0:  # under torchrun: this process only serves rank 0, then exits
            run_torchrun_worker(spec, rank)
            sys.exit(0)
        self.workers = WorkerGroup.start(spec)
        try:
            model = load_model(
                self.model_path, device=device_for(spec, 0), ps=self.workers.ps, **self._load_options(dtype)
            )
            self.workers.wait_ready()
        except BaseException:
            self.workers.shutdown(Stop())
            raise
        return model

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the engine (running requests end with an error), the workers, and free the device memory
        of the weights, KV cache, adapter slots and CUDA graphs now, even while this object (or one of
        its request streams) is still referenced; any later use raises LLMShutDownError."""
        self.__dict__["_shut_down"] = True
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            engine.shutdown()
            engine.release()
        workers = self.__dict__.pop("workers", None)
        if workers is not None:
            workers.shutdown(Stop())
        self.__dict__.pop("model", None)
        del engine
        thaw_heap()  # frozen, the model's objects would never be collected
        forget_column_hashes()  # the sampler's per-device vocabulary hashes (1.2 MB at 151,936 tokens)
        gc.collect()  # the engine's reference cycles (callbacks, threads) hold the model otherwise
        if torch.cuda.is_available():
            free_cublas_workspaces()
            torch.cuda.empty_cache()

    def __getattr__(self, name: str) -> Any:
        """Only reached for attributes not set: those shutdown() dropped raise LLMShutDownError."""
        if name in ("engine", "model", "workers") and self.__dict__.get("_shut_down"):
            raise LLMShutDownError(
                f"this LLM ({self.__dict__['args'].model}) has been shut down: create a new one"
            )
        raise AttributeError(f"'LLM' object has no attribute '{name}'")

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (a string is tokenised as is, no chat template); validated."""
        return encode_prompt(self.tokenizer, prompt, self.model.cfg.vocab_size)

    def chat_prompt(self, user_message: str) -> str:
        """The prompt text for one user turn, through the tokenizer's chat template."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.model_path} has no chat template")
        messages = [{"role": "user", "content": user_message}]
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (part of a character for some tokens; `<id>` without a
        tokenizer)."""
        if self.tokenizer is None:
            return f"<{token}>".encode()
        if self._token_bytes is None:
            self._token_bytes = token_bytes(self.tokenizer)
        return self._token_bytes(token)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (`<id>` placeholders when the model folder has no tokenizer)."""
        if self.tokenizer is None:
            return "".join(f"<{i}>" for i in ids)
        return str(self.tokenizer.decode(list(ids)))

    @torch.inference_mode()
    def logits(self, prompts: Sequence[Prompt]) -> list[torch.Tensor]:
        """One forward pass over all prompts as one batch: fp32 logits [len(prompt), vocab] per prompt.

        Row i is the model's distribution for the token after position i.
        """
        seqs = [self.encode(p) for p in prompts]
        if not seqs:
            return []
        lens = tuple(len(s) for s in seqs)
        logits = self.engine.forward_logits([t for s in seqs for t in s], lens).cpu()
        return list(logits.split(lens))

    def load_lora(self, name: str, source: str | Path | DummyLora, pinned: bool = False) -> None:
        """Load a PEFT adapter folder (or a `DummyLora`, random weights) under `name`; safe while requests
        run. `pinned` keeps it in a device slot."""
        self.engine.load_lora(name, source, pinned)

    def unload_lora(self, name: str) -> None:
        """Requests already running on `name` finish; new ones for it fail with an unknown-adapter error."""
        self.engine.unload_lora(name)

    def list_loras(self) -> list[LoraInfo]:
        """Name, path, rank, pinned and whether it holds a device slot now, for every loaded adapter."""
        return self.engine.list_loras()

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's defaults (its generation config; see `generation_config`)."""
        return SamplingParams(**self.sampling_defaults)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (one batch, continuously scheduled); outputs in prompt order.

        prompts: a string, a list of token ids, or a list of either. sampling_params: one for all prompts
        or one per prompt; None takes the model's defaults (`default_sampling_params`). lora: None (base
        model), an adapter name, or one per prompt. Always a list, one RequestOutput per prompt (a single
        prompt gives a list of one).
        """
        batch = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params, len(batch), "sampling_params", SamplingParams)
        params = [p or self.default_sampling_params() for p in params]
        loras = _per_prompt(lora, len(batch), "lora", str)
        items = list(zip(batch, params, loras, strict=True))
        streams = self.engine.submit_many(items, text_deltas=False)  # only the whole outputs are read
        return [s.result() for s in streams]

    def top_next_tokens(
        self, prompts: Sequence[Prompt], k: int = 5, lora: str | Sequence[str | None] | None = None
    ) -> list[list[tuple[str, float]]]:
        """For each prompt (on its adapter, if any), the k <= 20 likeliest next tokens and their
        probabilities, likeliest first."""
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=k)
        result = []
        for out in self.generate(list(prompts), params, lora=lora):
            (entry,) = out.logprobs or [{}]
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            result.append([(self.decode([t]), math.exp(lp)) for t, lp in ranked])
        return result
