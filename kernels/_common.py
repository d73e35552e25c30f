"""Helpers shared by the Triton launchers."""

import functools

import torch


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; under TRITON_INTERPRET=1 on the CPU, 4: a few
    programs, so that the loops over rows or tiles inside a program are exercised by the tests."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
