"""Host values to the device without waiting for the device.

A copy from pageable host memory waits for every kernel already queued on the stream (PyTorch
synchronises after it), which would stall the engine's loop behind the step in flight: with async
scheduling the next step's inputs are built while the card still runs the previous one. Pinned memory
makes the copy one more entry in the stream's queue (the pinned buffer is reused only after its copy ran).
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a number, a list or nested lists) as a tensor on `device` (on CUDA: queued, not waited
    for)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def pinned(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a host tensor, pinned when `device` is CUDA (the source of a non-blocking copy)."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")


class HostCopy:
    """A device tensor's values on their way to the host: the copy is queued now, `tolist()` waits for it.
    On the CPU the tensor itself (nothing to wait for)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event: torch.cuda.Event | None = None
        if tensor.is_cuda:
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor

    def tolist(self) -> Any:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
