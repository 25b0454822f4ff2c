"""PyTorch implementations of the ops: the CPU path, and the oracle the GPU kernels are tested against."""
