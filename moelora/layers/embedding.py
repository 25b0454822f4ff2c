"""Token embedding and LM head, both split over TP ranks by vocabulary rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelora.layers.spec import WeightSpec, sharded
from moelora.parallel import comm
from moelora.parallel.sharding import shard_range
from moelora.parallel.state import ParallelState


class VocabEmbedding(nn.Module):
    """Embedding rows [vocab / tp, H] of this rank; tokens outside them give zeros before the reduce."""

    def __init__(self, vocab: int, hidden: int, ps: ParallelState, dtype: torch.dtype) -> None:
        super().__init__()
        self.vocab, self.hidden, self.ps = vocab, hidden, ps
        self.rows = shard_range(vocab, ps.tp_size, ps.tp_rank, "vocab size")
        self.weight = nn.Parameter(
            torch.empty(self.rows.stop - self.rows.start, hidden, dtype=dtype), requires_grad=False
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ps.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.rows.start
        owned = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(torch.where(owned, local, 0), self.weight) * owned[:, None].to(self.weight.dtype)
        return comm.all_reduce(out, self.ps)

    def weight_specs(self, key: str) -> list[WeightSpec]:
        return [sharded(self.weight, key, (self.vocab, self.hidden), (self.rows,))]


class LMHead(nn.Module):
    """logits = h W^T, W [vocab / tp, H] per rank, gathered to the full vocabulary (fp32)."""

    def __init__(self, embedding: VocabEmbedding, tied: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.ps, self.vocab, self.hidden, self.rows = (
            embedding.ps,
            embedding.vocab,
            embedding.hidden,
            embedding.rows,
        )
        self.tied = tied
        if tied:
            self.embedding = embedding
        else:
            self.weight = nn.Parameter(torch.empty_like(embedding.weight, dtype=dtype), requires_grad=False)

    def head_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.tied else self.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, self.head_weight()).float()
        return comm.all_gather_last_dim(logits, self.ps)

    def weight_specs(self, key: str) -> list[WeightSpec]:
        if self.tied:
            return []
        return [sharded(self.weight, key, (self.vocab, self.hidden), (self.rows,))]
