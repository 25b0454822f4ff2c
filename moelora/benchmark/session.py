"""One benchmark session: the loaded model, the mixes to run, fresh prompts, and what the card allows."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moelora.benchmark.args import WorkloadArgs
from moelora.benchmark.floors import (
    Ceilings,
    LoraBytes,
    ModelBytes,
    adapter_bytes,
    decode_bytes,
    measure_ceilings,
    model_bytes,
)
from moelora.benchmark.report import environment
from moelora.benchmark.workload import Mix, PromptMaker, build_mixes
from moelora.llm import LLM


@dataclass
class Session:
    llm: LLM
    workload: WorkloadArgs
    mixes: list[Mix]
    prompts: PromptMaker
    ceilings: Ceilings
    model: ModelBytes
    adapters: dict[str, LoraBytes]
    env: dict[str, Any]

    def floor_ms(self, mix: Mix, batch: int, context: float) -> float:
        """The byte floor of one decode step of `batch` requests of this mix, in ms."""
        counts: dict[str, int] = {}
        for name in mix.assign(batch):
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
        lora = {n: (c, self.adapters[n]) for n, c in counts.items()}
        return decode_bytes(self.model, batch, context, lora) / self.ceilings.bytes_per_s * 1e3

    def settings(self) -> dict[str, Any]:
        """What was run, for the JSON file and the header: model, dtype, engine switches."""
        llm, engine = self.llm, self.llm.engine
        return {
            "model": llm.args.model,
            "load_format": llm.load_format,
            "hf_overrides": llm.hf_overrides,
            "dtype": str(llm.model.dtype).removeprefix("torch."),
            "quantization": llm.args.quantization,
            "tp_size": llm.parallel.tp_size,
            "ep_size": llm.parallel.experts_over,
            "prefix_caching": engine.scheduler.prefix_caching,  # (off for models that cannot use it)
            "chunked_prefill": engine.scheduler.chunked_prefill,  # (the same)
            "step_tokens": engine.scheduler.max_num_batched_tokens,
            "cuda_graphs": engine.executor.runner.graphs is not None,
            "max_num_seqs": engine.args.max_num_seqs,
            "kv_blocks": engine.allocator.num_blocks,
            "max_model_len": engine.max_model_len,
            "workload": self.workload,
            "ceilings": self.ceilings,
        }


def open_session(llm: LLM, workload: WorkloadArgs, adapters: Sequence[str], seed: int) -> Session:
    """Measure the card, size the model's bytes, check the workload fits the engine; capture the decode
    graphs up front so that no timed step pays a capture."""
    engine = llm.engine
    needed = workload.input_len + workload.output_len
    if needed > engine.max_model_len:
        raise ValueError(
            f"--input-len + --output-len = {needed} is above max_model_len {engine.max_model_len}: "
            f"shorten them or give a larger --max-model-len"
        )
    mixes = build_mixes(workload, adapters)
    for mix in mixes:
        slots = engine.loras.num_slots if engine.loras is not None else 0
        if len(mix.adapters) > slots:
            raise ValueError(
                f"mix '{mix.name}' runs {len(mix.adapters)} adapters in one batch but there are {slots} "
                f"adapter slots: raise --max-loras-per-batch to {len(mix.adapters)}"
            )
    model = llm.model
    ceilings = measure_ceilings(llm.device, model.dtype)
    cfg, ps = model.cfg, model.ps
    kv_heads, k_dim, v_dim = model.kv_layout()
    kv_per_token = sum(model.kv_layers()) * kv_heads * (k_dim + v_dim) * model.dtype.itemsize
    lora_bytes = {}
    for name in adapters:
        copy = engine.loras.cpu_copy(name) if engine.loras is not None else None
        if copy is None:
            raise ValueError(f"adapter '{name}' is not loaded in CPU memory (raise --max-cpu-loras)")
        lora_bytes[name] = adapter_bytes(copy, model.dtype.itemsize, ps.tp_size, ps.moe_tp_size)
    start = time.perf_counter()
    captured = engine.capture_graphs()
    if captured:
        print(f"captured {captured} decode CUDA graphs in {time.perf_counter() - start:.1f} s", flush=True)
    prompts = PromptMaker(cfg.vocab_size, workload, seed, engine.args.block_size)
    return Session(
        llm,
        workload,
        mixes,
        prompts,
        ceilings,
        model_bytes(model, kv_per_token),
        lora_bytes,
        environment(llm.device),
    )
