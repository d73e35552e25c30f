"""csrc/cuda's kernels run on the CPU by an emulation of CUDA's execution model (emu.h), so that the
tests parametrized with the cuda backend also run where no GPU is: as ``cuda-emulated``, on CPU tensors
(tests/conftest.py). What it checks and what it cannot (timing, memory coalescing, races between blocks,
the tensor cores' rounding) is written at the top of emu.h."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch

from bignlp_fast import _backend


@functools.cache
def module(asan: bool = False):
    """The emulation module, compiled on first use (about a minute on 2 cores) into build/cuda_emu;
    ``asan``: with AddressSanitizer (build.load)."""
    from . import build

    return build.load(asan=asan)


class _Compiled:
    """bignlp_fast._C with its ``*_cuda`` entry points taken from the emulation."""

    def __init__(self, real, emulated):
        self._real, self._emulated = real, emulated

    def __getattr__(self, name):
        if name.endswith("_cuda"):
            return getattr(self._emulated, name)
        return getattr(self._real, name)


def options_from_environment() -> dict:
    """BIGNLP_FAST_CUDA_EMULATION="sms=N,reverse=1,asan=1" sets the emulation's options for the
    cuda-emulated tests (default: 4 SMs, threads in order, no AddressSanitizer; asan=1 needs the
    runtime preloaded: build.asan_runtime)."""
    options = {}
    for item in filter(None, os.environ.get("BIGNLP_FAST_CUDA_EMULATION", "").split(",")):
        key, _, value = item.partition("=")
        if key == "sms":
            options["sms"] = int(value)
        elif key in ("reverse", "asan"):
            options[key] = value not in ("", "0")
        else:
            raise ValueError(f"BIGNLP_FAST_CUDA_EMULATION: unknown option {key!r} (sms=N, reverse=0|1, asan=0|1)")
    return options


@contextlib.contextmanager
def active(monkeypatch, *, sms: int = 4, reverse: bool = False, asan: bool = False):
    """Within it, ``backend="cuda"`` runs CPU tensors on the emulated kernels."""
    emulated = module(asan)
    emulated.configure(sms=sms, reverse=reverse)
    real_unavailable = _backend._unavailable

    def unavailable(backend: str, kind: str, device: torch.device) -> Optional[str]:
        if backend == "cuda" and kind == "cpu":
            return None
        return real_unavailable(backend, kind, device)

    monkeypatch.setattr(_backend, "compiled", lambda: _Compiled(_backend._C, emulated))
    monkeypatch.setattr(_backend, "_unavailable", unavailable)  # (unavailable() asks it too)
    try:
        yield emulated
    finally:
        emulated.configure()
