"""Helpers shared by the Triton launchers."""

import functools

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; under TRITON_INTERPRET=1 on the CPU, 4: a few
    programs, so that the loops over rows or tiles inside a program are exercised by the tests."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.lru_cache(maxsize=None)
def shared_memory_per_block(device: torch.device) -> int:
    """Bytes of shared memory one block may use on a CUDA device (the opt-in limit: 227 KiB on
    H100, 163 KiB on A100, 99 KiB on sm_86 / sm_89); under TRITON_INTERPRET=1 on the CPU, no limit."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return 1 << 30


@triton.jit
def flat_ids(n_inner):
    """(outer, inner) ids of this program in a flat grid of outer x n_inner programs, inner running
    fastest. The launchers use one grid dimension: CUDA caps dimensions 1 and 2 at 65535 programs,
    dimension 0 at 2^31 - 1."""
    pid = tl.program_id(0)
    return pid // n_inner, pid % n_inner


@triton.jit
def mma(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b accumulated in fp32. DOT_PRECISION: "ieee" (fp32 inputs: no tf32 rounding), "tf32" (16-bit
    inputs, where it does not apply), or "upcast": multiply in fp32 (bf16 under the interpreter, whose
    tl.dot multiplies the bf16 bit patterns as integers; bf16 products are exact in fp32, so this is
    what the tensor cores compute)."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


def dot_precision(t: torch.Tensor) -> str:
    """The DOT_PRECISION of :func:`mma` for operands of t's dtype on t's device."""
    if t.dtype == torch.float32:
        return "ieee"
    if t.dtype == torch.bfloat16 and t.device.type != "cuda":
        return "upcast"
    return "tf32"
