"""Triton kernels (GPU); each shares its signature and Semantics with the PyTorch twin in `ops/torch/`."""
