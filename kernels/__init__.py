"""Triton kernels, one module per op; submodules are imported on demand so that importing this never needs triton."""
