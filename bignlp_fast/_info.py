"""What `bignlp-fast info` prints: versions, how the extension was built, which backends run each op."""

from __future__ import annotations

import platform

import torch

from bignlp_fast import _backend


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "not installed"


def _usable_here(backend: str) -> str:
    """Whether ``backend`` can run on this machine, on the device it runs on here."""
    gpu = torch.cuda.is_available()
    if backend == "cuda" and not gpu:
        built = _backend.unavailable("cuda", torch.device("cuda"))
        return f"no: {built}" if built else "no: built, but no CUDA GPU on this machine"
    if backend == "triton" and not gpu and not _backend.triton_interpreted():
        return "no: no CUDA GPU (TRITON_INTERPRET=1 runs it on CPU tensors, slowly, for testing)"
    device = torch.device("cuda" if backend in ("cuda", "triton") and gpu else "cpu")
    reason = _backend.unavailable(backend, device)
    return f"yes ({device.type} tensors)" if reason is None else f"no: {reason}"


def info() -> dict:
    """Versions, build flags, per-op backends (dtypes, usable here or why not), and the fallback record."""
    from bignlp_fast.ops.linear import (  # (ops imports this module's package)
        MIN_ROWS_AVX2, MIN_WEIGHT_BYTES_AVX2, MIN_WEIGHT_BYTES_PREPACKED_AVX2, prepacked_bytes, prepacked_weights)
    ops = {}
    for name, op in sorted(_backend.OPS.items()):
        ops[name] = {}
        for backend in _backend.BACKENDS:
            dtypes = op.dtypes.get(backend, ())
            ops[name][backend] = {
                "dtypes": "any" if backend == "torch" else ", ".join(_backend.dtype_name(d) for d in dtypes),
                "usable": f"no: {op.missing[backend]}" if backend in op.missing else _usable_here(backend),
            }
            for device_type, order in op.auto_order.items():  # an op that ranks its backends its own way
                if backend in order:
                    ops[name][backend]["usable"] += f"; automatic order on {device_type} tensors: {', '.join(order)}"
    return {
        "bignlp_fast": __import__("bignlp_fast").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": _triton_version(),
        "triton_interpret": _backend.triton_interpreted(),
        "cpu_capability_runtime": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpu_vendor": _backend.cpu_vendor(),
        # which fp32 GEMM the RNN layers' input projections take on the CPU (nn/rnn.py)
        "fp32_projection_gemm": ("torch (MKL: AVX-512 on an Intel CPU, or a build without AVX-512 off Zen 1/2)"
                                 if _backend.blas_sgemm_is_fast()
                                 else f"bignlp_fast.ops.linear: its streaming kernels up to "
                                      f"{_backend.linear_streaming_rows()} rows and its packed GEMM from "
                                      f"{MIN_ROWS_AVX2} rows, with a weight of "
                                      f"{MIN_WEIGHT_BYTES_AVX2 >> 20} MiB or more (an AVX2 build); for a weight "
                                      f"packed once (ops.prepack), the packed GEMM from "
                                      f"{_backend.linear_streaming_rows(prepacked=True) + 1} rows and "
                                      f"{MIN_WEIGHT_BYTES_PREPACKED_AVX2 >> 10} KiB"
                                 if _backend.cpu_kernels_avx2()
                                 else "bignlp_fast.ops.linear (the project's packed GEMM)"),
        # the most rows ops.linear runs without packing the weight (csrc/cpu/skinny_gemm.h), and for a
        # weight packed once (ops.prepack)
        "linear_streaming_rows": _backend.linear_streaming_rows(),
        "linear_streaming_rows_prepacked": _backend.linear_streaming_rows(prepacked=True),
        # the weights ops.prepack marked, and the bytes of their packed copies
        "prepacked_weights": prepacked_weights(),
        "prepacked_bytes": prepacked_bytes(),
        # which GEMM bf16 products on the CPU take in nn.Linear, the models and the RNN projections
        "bf16_gemm": ("torch's (oneDNN's kernels: this CPU has AVX-512)" if _backend.blas_bf16_gemm_is_fast()
                      else "bignlp_fast.ops.linear from 262k multiply-adds (torch's bf16 GEMM has no vector "
                           "kernels without AVX-512)"),
        # what the bf16 CPU kernels multiply their tiles on (csrc/cpu/amx.h, gemm.h)
        "bf16_tiles": {"amx": "AMX (oneDNN brgemm ukernel)", "avx512_bf16": "AVX512_BF16 dot products (no AMX here)",
                       "fp32": "fp32 FMA tiles (no AMX; AVX512_BF16 not built or switched off)"}[_backend.bf16_tiles()],
        # which main loops fp32 CPU convolutions take (csrc/cpu/conv.cpp, kWideVectors)
        "conv_main_loops": ("the project's (implicit GEMM, Winograd) where shapes allow" if _backend.conv_own_loops()
                            else "oneDNN's, but Winograd F(2, 3) for conv1d k=3 and F(2x2, 3x3) for conv2d 3x3 "
                                 "from 128 input channels (a build without AVX-512)"),
        # freed large CPU outputs kept for the next call of the same size (csrc/cpu/buffer_cache.h)
        "cpu_buffer_cache": _backend.buffer_cache(),
        "build": _backend.build_info(),
        "ops": ops,
        "fallbacks": _backend.report(),
    }
