"""Runs the model on one scheduled step: builds the batch metadata once, returns the logits it needs."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from moelora.batch import ForwardBatch, PagedKV
from moelora.cache.kv_cache import KVCache
from moelora.engine.request import Sequence
from moelora.models.decoder import MoeForCausalLM


class ModelRunner:
    def __init__(self, model: MoeForCausalLM, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device

    def build_batch(self, seqs: Seq[Sequence]) -> tuple[torch.Tensor, ForwardBatch]:
        """Token ids [T] and the batch: each sequence runs token_ids[num_cached:]."""
        bs = self.cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens, kv_lens = [], []
        for s in seqs:
            start, end = s.num_cached, len(s.token_ids)
            ids += s.token_ids[start:end]
            positions += range(start, end)
            slots += (s.blocks[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end - start)
            kv_lens.append(end)
        width = max(len(s.blocks) for s in seqs)
        tables = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], dtype=torch.int32)
        dev = self.device
        kv = PagedKV(
            self.cache,
            torch.tensor(slots, dtype=torch.int64, device=dev),
            tables.to(dev),
            tuple(kv_lens),
        )
        entries = [s.request.lora_entry for s in seqs]
        lora_slots = [-1 if e is None or e.slot is None else e.slot for e in entries]
        token_slot = None
        if any(slot >= 0 for slot in lora_slots):
            per_seq = torch.tensor(lora_slots, dtype=torch.int32)
            token_slot = per_seq.repeat_interleave(torch.tensor(seq_lens)).to(dev)
        positions_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        batch = ForwardBatch(positions_t, tuple(seq_lens), kv, token_slot)
        return torch.tensor(ids, dtype=torch.int64, device=dev), batch

    @torch.inference_mode()
    def run(self, seqs: Seq[Sequence]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """-> (fp32 logits [B, V] at each sequence's last token, {batch index: fp32 logits of every
        prompt position but the last} for the sequences that want prompt log-probs)."""
        ids, batch = self.build_batch(seqs)
        hidden = self.model(ids, batch)
        ends = torch.tensor(batch.seq_lens, device=self.device).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[ends])
        prompt_logits: dict[int, torch.Tensor] = {}
        start = 0
        for i, (s, n) in enumerate(zip(seqs, batch.seq_lens, strict=True)):
            if s.wants_prompt_logprobs and s.num_cached == 0:
                prompt_logits[i] = self.model.compute_logits(hidden[start : start + s.num_prompt - 1])
            start += n
        return logits, prompt_logits
