"""RMSNorm (the math in `ops.rms_norm`: fp32, cast back before the weight as Hugging Face's Llama-style
norms do, or after it as GPT-OSS's does)."""

from __future__ import annotations

import torch
from torch import nn

from moelora import ops
from moelora.layers.spec import Form, Piece, WeightSpec, sharded, whole
from moelora.ops.dense_lora import DenseLora
from moelora.ops.input_norm import InputNorm
from moelora.parallel import comm
from moelora.parallel.sharding import shard_range
from moelora.parallel.state import ParallelState


class RMSNorm(nn.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)) over the last dimension (`weight_first`: the weight applied
    before the cast back to x's dtype, as GPT-OSS's norm does; `zero_centered`: Qwen3-Next's, whose
    checkpoint stores w - 1: the parameter holds 1 + stored in fp32 and is applied first)."""

    def __init__(
        self,
        size: int,
        eps: float,
        dtype: torch.dtype,
        weight_first: bool = False,
        zero_centered: bool = False,
    ) -> None:
        super().__init__()
        self.eps, self.weight_first, self.zero_centered = eps, weight_first or zero_centered, zero_centered
        param_dtype = torch.float32 if zero_centered else dtype
        self.weight = nn.Parameter(torch.empty(size, dtype=param_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, weight_first=self.weight_first)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add and the norm in one op."""
        return ops.rms_norm(x, self.weight, self.eps, residual, self.weight_first)

    def add_norm_shrink(
        self, x: torch.Tensor, residual: torch.Tensor, lora: DenseLora, token_slot: torch.Tensor, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`add_norm`, and the LoRA shrink of the linear layer after it (`ops.add_norm_shrink`)."""
        return ops.add_norm_shrink(
            x, self.weight, self.eps, residual, self.weight_first, lora, token_slot, chunk
        )

    def before(self, residual: torch.Tensor | None) -> InputNorm:
        """This norm with `residual` to add first, as a layer after it runs it (`ops.norm_linear`)."""
        return InputNorm(residual, self.weight, self.eps, self.weight_first)

    def shrink(
        self, x: torch.Tensor, residual: torch.Tensor, lora: DenseLora, token_slot: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        """`add_norm_shrink`'s LoRA shrink alone, where the layer after the norm runs the norm itself
        (`ops.norm_shrink`)."""
        return ops.norm_shrink(x, self.weight, self.eps, residual, self.weight_first, lora, token_slot, chunk)

    def weight_specs(self, key: str) -> list[WeightSpec]:
        if self.zero_centered:
            piece = Piece(key, tuple(self.weight.shape), transform=("plus_one",))
            return [WeightSpec(self.weight, (Form("", (piece,)),))]
        return [whole(self.weight, key)]


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a dimension split across TP ranks (OLMoE's q/k norm over the whole projection).

    Each rank holds `size / tp` features; the mean of squares needs the sum over all ranks, so this norm
    does its own all-reduce of one float per token.
    """

    def __init__(self, size: int, eps: float, ps: ParallelState, dtype: torch.dtype) -> None:
        super().__init__()
        self.size, self.eps, self.ps = size, eps, ps
        self.cols = shard_range(size, ps.tp_size, ps.tp_rank, "q/k norm size")
        self.weight = nn.Parameter(
            torch.empty(self.cols.stop - self.cols.start, dtype=dtype), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sum_sq = xf.pow(2).sum(-1, keepdim=True)
        sum_sq = comm.all_reduce(sum_sq, self.ps)
        xf = xf * torch.rsqrt(sum_sq / self.size + self.eps)
        return self.weight * xf.to(x.dtype)

    def weight_specs(self, key: str) -> list[WeightSpec]:
        return [sharded(self.weight, key, (self.size,), (self.cols,))]
