"""PyTorch implementations of the ops: the CPU path, and the oracle the GPU kernels are tested against."""

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of `dtype`: fp32 for the 16-bit types and fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)
