"""On a GPU: an LLM's whole device memory comes back at shutdown (three lifetimes in one process), and a
whole forward pass with invalid expert ids and adapter slots mixed in reads and writes nothing outside
its buffers (run under compute-sanitizer; see docs/reliability.md)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moelora import LLM, SamplingParams
from moelora.batch import ForwardBatch
from moelora.lora.dummy import DummyLora

pytestmark = pytest.mark.gpu
SMALL_QWEN3 = {"num_hidden_layers": 2}  # the full-size layers of Qwen3-30B-A3B, two of them


@pytest.mark.cuda_graphs
def test_three_lifetimes_give_all_memory_back():
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    peaks = []
    for _ in range(3):
        with LLM("preset:qwen3-30b-a3b", hf_overrides=SMALL_QWEN3, progress=False, max_num_seqs=8,
                 lora_modules={"d": DummyLora(16, 1)}, kv_cache_memory=2**30) as llm:  # fmt: skip
            llm.engine.capture_graphs()
            params = SamplingParams(max_tokens=4, ignore_eos=True)
            llm.generate([[1, 2, 3]] * 3, params, lora=[None, "d", "d"])
            peaks.append(torch.cuda.memory_allocated() - start)
        leftover = torch.cuda.memory_allocated() - start
        assert leftover < 8 * 2**20, f"{leftover / 2**20:.1f} MiB still allocated after shutdown"
    assert min(peaks) > 2**30  # the model really was on the card


def test_forward_with_invalid_expert_ids_and_slots_stays_in_bounds():
    """Half of each MoE layer's experts mapped to -1 (as another EP rank's are) and slots -1, 4 and 99
    (outside [0, 4)) among valid ones: kernels skip them; the output is finite."""
    adapters = {f"d{i}": DummyLora(8, i) for i in range(4)}
    with LLM("preset:tiny-qwen3-moe", dtype="bfloat16", progress=False, cuda_graphs=False,
             lora_modules=adapters, max_loras_per_batch=4) as llm:  # fmt: skip
        for layer in llm.model.decoder_layers():
            experts = layer.mlp.experts
            experts.expert_map[::2] = -1
        llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=1), lora=["d0", "d1", "d2", "d3"])
        lens = [5, 1, 7, 3]
        slots = torch.tensor([0, -1, 4, 1, 99, 2, 3, -7] * 2, dtype=torch.int32, device=llm.device)
        batch = replace(ForwardBatch.prefill(lens, llm.device), token_slot=slots[: sum(lens)])
        ids = torch.randint(0, llm.model.cfg.vocab_size, (sum(lens),), device=llm.device)
        with llm.engine.executor.runner.lock:
            hidden = llm.model(ids, batch)
            logits = llm.model.compute_logits(hidden)
        torch.cuda.synchronize()
        assert torch.isfinite(logits).all()
