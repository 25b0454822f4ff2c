"""User-facing settings as frozen dataclasses; the CLI's flags are generated from their fields.

Each field's metadata carries its help text and optional short aliases (`--tp` for `tp_size`), so the
Python API, the CLI and the docs cannot drift apart.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "float64")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
QUANTIZATIONS = ("auto", "fp8", "none")
KERNEL_BACKENDS = ("auto", "torch", "triton")  # = moelora.ops.BACKENDS (config sits below ops)


def option(
    default: Any,
    help: str,
    *,
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    nargs: str | None = None,
) -> Any:
    """A dataclass field with the metadata the CLI builds its flag from (`nargs="+"` for a tuple field)."""
    meta = {"help": help, "aliases": aliases, "choices": choices, "nargs": nargs}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelArgs:
    """Which model to load and how."""

    model: str = option(
        "demo",
        "model folder, a Hugging Face id already in the local cache, 'demo', or 'preset:NAME' (a published "
        "model's config, random weights)",
    )
    dtype: str = option("auto", "weight and activation dtype; auto = the checkpoint's", choices=DTYPE_CHOICES)
    device: str = option("auto", "torch device; auto = cuda if available, else cpu")
    seed: int = option(0, "random seed for everything the model does")
    progress: bool = option(True, "show a progress bar while loading")
    load_format: str = option(
        "auto",
        "safetensors: read the checkpoint; dummy: random weights drawn on the device, from config.json "
        "alone (benchmarks; nothing read or written); auto: dummy for a preset, else safetensors",
        choices=LOAD_FORMATS,
    )
    hf_overrides: str | None = option(
        None, "JSON object of config.json fields to replace, e.g. '{\"num_hidden_layers\": 4}'"
    )
    quantization: str = option(
        "auto",
        "fp8: hold the routed experts' and the linear layers' weights in FP8 (e4m3, a scale per row and 128 "
        "input columns): a block-FP8 checkpoint's own values and scales, or quantised at load from 16 bits; "
        "routers, gates, embeddings and adapters stay in --dtype. none: every weight in --dtype (an FP8 "
        "checkpoint dequantised). auto: fp8 for a block-FP8 checkpoint, else none",
        aliases=("-q",),
        choices=QUANTIZATIONS,
    )
    generation_config: str = option(
        "auto",
        "default sampling parameters: auto = the model's generation_config.json (temperature, top_p, "
        "top_k, min_p, repetition_penalty, max_new_tokens; do_sample false = greedy), vllm = none, or a "
        "folder holding a generation_config.json; a request's own values always win",
    )
    trust_remote_code: bool = option(
        False, "accepted for vLLM compatibility; moelora never runs a model's own code (no effect)"
    )
    kernel_backend: str = option(
        "auto",
        "ops' implementation: auto = Triton kernels on CUDA, PyTorch elsewhere; torch = PyTorch everywhere; "
        "triton = Triton everywhere (CPU tensors need TRITON_INTERPRET=1). One choice per process",
        choices=KERNEL_BACKENDS,
    )

    def __post_init__(self) -> None:
        parse_overrides(self.hf_overrides)


def parse_overrides(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """`hf_overrides` as a dict: given as one, or as the text of a JSON object."""
    if text is None or isinstance(text, dict):
        return dict(text or {})
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"hf_overrides must be a JSON object, got '{text}': {e}") from e
    if not isinstance(value, dict):
        raise ValueError(
            f"hf_overrides must be a JSON object such as '{{\"num_hidden_layers\": 4}}', got '{text}'"
        )
    return value


@dataclass(frozen=True)
class ParallelArgs:
    """How the model is split over processes (tensor and expert parallelism)."""

    tp_size: int = option(
        1,
        "tensor-parallel processes (attention heads, MLPs, vocabulary)",
        aliases=("--tp", "--tensor-parallel-size", "-tp"),
    )
    ep_size: int = option(1, "expert-parallel groups the routed experts are split over", aliases=("--ep",))
    enable_expert_parallel: bool = option(
        False, "vLLM's switch: the routed experts split over all TP ranks (ep_size = tp_size)"
    )

    def __post_init__(self) -> None:
        if self.enable_expert_parallel and self.ep_size not in (1, self.tp_size):
            raise ValueError(
                f"--enable-expert-parallel means ep_size = tp_size = {self.tp_size}, but ep_size is "
                f"{self.ep_size}: give one of the two"
            )

    @property
    def experts_over(self) -> int:
        """The EP size these flags mean."""
        return self.tp_size if self.enable_expert_parallel else self.ep_size


@dataclass(frozen=True)
class EngineArgs:
    """The KV cache and the scheduler."""

    max_model_len: int | None = option(
        None, "longest prompt + completion in tokens; default: the model's limit, capped by the KV cache"
    )
    block_size: int = option(16, "tokens per KV cache block")
    num_kv_blocks: int | None = option(None, "number of KV cache blocks (overrides --kv-cache-memory)")
    kv_cache_memory: float | None = option(
        None,
        "KV cache budget: bytes if > 1, else a fraction of free device memory; "
        "default on CUDA 0.8 of the memory free after the adapter slots, less if the largest step's "
        "activations need more of it; on CPU what max_num_seqs x max_model_len needs, up to 1 GiB",
    )
    max_num_seqs: int = option(256, "most sequences in one step")
    max_num_batched_tokens: int | None = option(
        None,
        "most tokens in one step; default 8192 with chunked prefill, else max(8192, max_model_len) (a "
        "whole prompt of the longest length in one step)",
    )
    enable_chunked_prefill: bool = option(
        True,
        "compute a prompt that does not fit the step's token budget over several steps, beside the other "
        "sequences' decoding, so that no step needs the activations of more than max_num_batched_tokens "
        "tokens (a linear-attention layer continues its state from one part to the next)",
    )
    long_prefill_token_threshold: int = option(
        0,
        "with chunked prefill, the most tokens of one prompt in a step (0: the step's budget), so that "
        "one long prompt leaves room for others beside it",
    )
    enable_prefix_caching: bool = option(
        True, "reuse the KV blocks of an earlier prompt with the same prefix and adapter"
    )
    state_snapshots: int = option(
        16,
        "models with linear-attention layers, with prefix caching and chunked prefill: how many cached "
        "prefixes keep those layers' states (each the size of a running sequence's), so that a later "
        "prompt can start after one; 0 turns prefix caching off for such models",
    )
    cuda_graphs: bool = option(
        True, "replay decode steps from CUDA graphs (used on CUDA in fp16/bf16; each TP rank its own)"
    )
    async_scheduling: bool = option(
        True,
        "build and queue each step while the device still runs the one before (its sampled tokens are "
        "fed to the next step on the device, broadcast to the other ranks there)",
    )
    gpu_memory_utilization: float | None = option(
        None,
        "vLLM's budget: the share of the card's memory this process may fill; the KV cache gets what is "
        "left of it after the weights and adapter slots, less 10%% for activations (overrides "
        "--kv-cache-memory; CUDA only)",
    )

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_model_len", "num_kv_blocks", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        budget = self.max_num_batched_tokens
        if budget is not None and budget < self.max_num_seqs:  # as vLLM: every sequence decodes a step
            raise ValueError(
                f"max_num_batched_tokens ({budget}) must be at least max_num_seqs ({self.max_num_seqs}): a "
                f"step decodes one token of every running sequence; lower max_num_seqs or raise the budget"
            )
        if self.state_snapshots < 0:
            raise ValueError(f"state_snapshots must be >= 0, got {self.state_snapshots}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(
                f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}"
            )
        if self.long_prefill_token_threshold and not self.enable_chunked_prefill:
            raise ValueError(
                "long_prefill_token_threshold caps a prompt's part of a step: it needs chunked prefill "
                "(drop --no-enable-chunked-prefill)"
            )
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0, got {self.kv_cache_memory}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class LoraArgs:
    """Adapter slots on the device and the CPU cache of adapters."""

    enable_lora: bool = option(False, "reserve adapter slots even when no adapter is given at start")
    max_loras_per_batch: int = option(
        4, "device adapter slots: the most distinct adapters in one step", aliases=("--max-loras",)
    )
    max_lora_rank: int | None = option(
        None,
        "largest adapter rank the slots hold; default: 16, or the largest start adapter's rank if larger",
    )
    max_cpu_loras: int | None = option(
        None, "adapters kept in CPU memory; least recently used ones beyond it are re-read when needed"
    )

    def __post_init__(self) -> None:
        if self.max_loras_per_batch < 1:
            raise ValueError(f"max_loras_per_batch must be >= 1, got {self.max_loras_per_batch}")
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < 1:
            raise ValueError(f"max_cpu_loras must be >= 1, got {self.max_cpu_loras}")


@dataclass(frozen=True)
class DummyLoraArgs:
    """Random adapters made in memory at start, named dummy-0, dummy-1, ... (benchmarks; no files)."""

    dummy_loras: int = option(0, "random adapters to load at start, named dummy-0, dummy-1, ...")
    dummy_lora_rank: int = option(16, "rank of the dummy adapters")
    dummy_lora_targets: str = option(
        "attn,experts",
        "what the dummy adapters adapt, comma-separated: attn (q/k/v/o), experts (every routed expert), "
        "shared (the shared expert), mlp (dense MLP layers)",
    )

    def __post_init__(self) -> None:
        if self.dummy_loras < 0:
            raise ValueError(f"dummy_loras must be >= 0, got {self.dummy_loras}")
        if self.dummy_lora_rank < 1:
            raise ValueError(f"dummy_lora_rank must be >= 1, got {self.dummy_lora_rank}")


@dataclass(frozen=True)
class ServerArgs:
    """The OpenAI-compatible HTTP server (`moelora serve`)."""

    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = option(8000, "TCP port to listen on")
    served_model_name: str | None = option(
        None, "the `model` name of the base model in the API; default: the model folder's name (or the id)"
    )
    api_key: str | None = option(
        None, "require `Authorization: Bearer <key>` on every route but /health; default: no auth"
    )
    lora_dir: str | None = option(
        None,
        "allow loading adapters at runtime (/v1/load_lora_adapter), only from folders inside this one; "
        "default: runtime loading off",
    )
    max_waiting: int = option(
        1024,
        "most sequences (a request with n completions counts n) waiting for their first token; more are "
        "refused with 503 until some start",
    )
    max_n: int = option(128, "most completions one request may ask for (n); more are refused with 400")
    timeout_graceful_shutdown: int = option(
        30,
        "seconds running requests get to finish after SIGINT/SIGTERM; then they end with an error "
        "(streams with an error event and [DONE])",
    )
    max_body_bytes: int = option(
        32 * 2**20, "largest request body in bytes; larger ones are refused with 413 before they are parsed"
    )
    max_prompt_chars: int | None = option(
        None,
        "longest prompt (or chat messages together) in characters, checked before tokenising; default: "
        "32 x max_model_len",
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        for name in ("max_n", "max_body_bytes", "max_prompt_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.served_model_name is not None and (
            not self.served_model_name or ":" in self.served_model_name
        ):
            raise ValueError(
                f"served_model_name must be non-empty and contain no ':' (it separates the adapter), "
                f"got '{self.served_model_name}'"
            )
        if self.lora_dir is not None and not os.path.isdir(self.lora_dir):
            raise ValueError(f"lora_dir '{self.lora_dir}' is not a directory: create it or fix the path")
