"""Which backends exist, how one is chosen for each call, and the record of fallbacks.

Backends: ``cpu`` (C++ in bignlp_fast._C), ``cuda`` (CUDA in bignlp_fast._C), ``triton``
(kernels/), ``torch`` (plain PyTorch: the reference every other backend is tested against).

Choice, per call: the op's ``backend=`` argument, else the environment variable
``BIGNLP_FAST_BACKEND``, else the best backend for the tensors' device ("auto"). A backend asked for
by name that cannot run raises :class:`BackendError` saying why. An automatic choice that ends on
the ``torch`` reference is a *fallback*: it is counted in the record that :func:`report` returns, and
with ``BIGNLP_FAST_STRICT=1`` it raises instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.util
import os
from typing import Callable, Optional

import torch

BACKENDS = ("cpu", "cuda", "triton", "torch")

# Automatic choice: fused backends to try, best first, for each device type.
AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


class BackendError(RuntimeError):
    """A backend was asked for by name (or a fallback happened under BIGNLP_FAST_STRICT=1) and cannot run."""


def _env_reader(name: str) -> Callable[[], Optional[str]]:
    """A function that returns ``os.environ.get(name)``, read anew at each call (tests and users set the
    variables between calls), at ~0.05 us rather than ~0.7: ``os.environ.get`` of an unset variable
    raises and catches a KeyError inside, and every op's automatic choice reads BIGNLP_FAST_BACKEND,
    dozens of times per decoded token. On CPython, os.environ keeps its entries in ``_data`` under
    encoded keys; elsewhere (no such dict) the plain ``os.environ.get``."""
    data, encode, decode = (getattr(os.environ, attr, None) for attr in ("_data", "encodekey", "decodevalue"))
    if not isinstance(data, dict) or encode is None or decode is None:
        return lambda: os.environ.get(name)
    key = encode(name)

    def read() -> Optional[str]:
        raw = data.get(key)
        return None if raw is None else decode(raw)

    return read


# ---- the compiled extension -------------------------------------------------------------------
try:
    from bignlp_fast import _C  # type: ignore[attr-defined]

    _C_ERROR: Optional[str] = None
except ImportError as e:  # importing never fails because an optional part is missing
    _C = None
    _C_ERROR = f"{type(e).__name__}: {e}"


def compiled():
    """The compiled module bignlp_fast._C, or None when it could not be imported."""
    return _C


_BUILD_INFO: dict = dict(_C.build_info()) if _C is not None else {"error": _C_ERROR}


def build_info() -> dict:
    """How the extension was built (CPU flags and at::vec level, CUDA archs), or why it is missing."""
    return dict(_BUILD_INFO)


def buffer_cache() -> Optional[dict]:
    """The cache of CPU output buffers (128 KiB and up; csrc/cpu/buffer_cache.h): limit_bytes, cached_bytes,
    cached_buffers, hits, misses; None without the extension. Its size is BIGNLP_FAST_CPU_CACHE_MB
    (default 512; 0 turns it off), read when the extension loads."""
    return dict(_C.buffer_cache_stats()) if _C is not None else None


def clear_buffer_cache() -> int:
    """Frees the CPU buffers the cache holds (not those in use); returns the bytes freed."""
    return int(_C.buffer_cache_clear()) if _C is not None else 0


def steady_allocator() -> bool:
    """Makes glibc keep freed memory in the process: no mmap for large blocks, no trimming of the heap.

    By default glibc serves each large block with fresh pages and returns them on free, so a call
    that allocates a large tensor page-faults and zeroes it every time, not once (a 4-layer BERT
    training step, B8 L128, on 2 cores: ~23 thousand faults a step from torch's own allocations; our
    CPU kernels' outputs come from their own cache, csrc/cpu/buffer_cache.h). Call this once, early,
    in a long-running CPU process; the environment variable
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824`` does the same
    from the start. Freed memory is then reused, not returned to the system. The benchmark calls it
    so that neither side of a comparison pays page faults. Returns whether it took effect (glibc only).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def cpuinfo(field: str) -> str:
    """The first value of ``field`` ("vendor_id", "model name", ...) in /proc/cpuinfo, or ""."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


_CPU_VENDOR = cpuinfo("vendor_id")  # read once at import: a traced (torch.compile) call may not open files
# The extension decides (csrc/cpu/linear.cpp, cpu::blas_sgemm_is_fast): MKL where it takes AVX-512
# kernels (Intel CPUs) or where the CPU kernels were built without AVX-512 (MKL's AVX2 kernels beat
# them, measured on a Zen 3) but for AMD's Zen 1 / Zen 2 (the packed GEMM 1.06-1.24x MKL on a Zen 2);
# the packed GEMM on AVX-512 builds for other CPUs (~2x MKL on a Zen 5).
# Without the extension the question does not arise (ops.linear cannot run).
_BLAS_SGEMM_IS_FAST = bool(_C.blas_sgemm_is_fast()) if _C is not None else False


# The most rows of x that ops.linear runs on its streaming kernels for a [N, K] weight (csrc/cpu/
# skinny_gemm.h's kSkinnyRowsTiled: 64 in AVX2 builds, 16 in AVX-512 ones), and for one packed already
# (kSkinnyRowsPrepacked: 32 and 16); 16 without the extension.
_LINEAR_STREAMING_ROWS = ((int(_C.linear_streaming_rows(False)), int(_C.linear_streaming_rows(True)))
                          if _C is not None else (16, 16))


def linear_streaming_rows(prepacked: bool = False) -> int:
    """The most rows of x that ops.linear multiplies by a [N, K] weight on its streaming kernels, which
    read the weight once and pack nothing (csrc/cpu/skinny_gemm.h): 64 where the CPU kernels are an
    AVX2 build, 16 in an AVX-512 build; for a weight packed already (ops.linear.prepack), whose packed
    GEMM then skips the packing, 32 and 16."""
    return _LINEAR_STREAMING_ROWS[bool(prepacked)]


# The most rows of float32 x that ops.linear multiplies by a packed weight without packing x
# (csrc/cpu/gemm.h's prepacked_rows_gemm: 256 on Intel CPUs with an AVX-512 build, where it was
# measured against MKL; 0 elsewhere, where packed weights go to the packed GEMM); 0 without the extension.
_LINEAR_PREPACKED_DIRECT_ROWS = int(_C.linear_prepacked_direct_rows()) if _C is not None else 0


def linear_prepacked_direct_rows() -> int:
    """The most rows of float32 x that ops.linear multiplies by a weight packed once (ops.prepack) on
    the kernel that reads x in place (past the streaming rows; 0: none)."""
    return _LINEAR_PREPACKED_DIRECT_ROWS


def cpu_kernels_avx2() -> bool:
    """Whether the CPU kernels are an AVX2 build (at::vec's AVX2 level; the CPU lacks AVX-512)."""
    return _BUILD_INFO.get("cpu_capability") == "AVX2"


def cpu_vendor() -> str:
    """The CPU's vendor string from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD", ...), or ""."""
    return _CPU_VENDOR


def blas_sgemm_is_fast() -> bool:
    """Whether torch's fp32 GEMM beats the project's packed GEMM (csrc/cpu/gemm.h) on this CPU and build:
    MKL on an Intel CPU, or on any CPU but AMD's Zen 1 / Zen 2 where the CPU kernels were built without
    AVX-512."""
    return _BLAS_SGEMM_IS_FAST


def amx_bf16() -> bool:
    """Whether the bf16 CPU kernels multiply their tiles on Intel AMX now (csrc/cpu/amx.h): the CPU has
    AMX-BF16, torch has oneDNN's brgemm ukernel, and :func:`use_amx_bf16` has not turned it off."""
    return _C is not None and _C.amx_bf16()


@contextlib.contextmanager
def use_amx_bf16(enabled: bool):
    """Within the block, the bf16 CPU kernels take (or, with False, skip) their AMX path. Turning it on
    where AMX is missing changes nothing. The switch is process-wide (every thread sees it), not
    thread-local. For tests, which check both paths on one machine, and for measuring what AMX buys."""
    with _switched("set_amx_bf16", enabled):
        yield


def bf16_dot() -> bool:
    """Whether bf16 CPU kernels that are not on AMX multiply on AVX512_BF16 dot products now
    (gemm.h's small_gemm_bf16): the build targets AVX512_BF16 and :func:`use_bf16_dot` has not turned
    it off. Below both, bf16 operands are converted to fp32 for the FMA tiles."""
    return _C is not None and _C.bf16_dot()


@contextlib.contextmanager
def use_bf16_dot(enabled: bool):
    """Within the block, bf16 CPU kernels not on AMX take (or, with False, skip) their AVX512_BF16
    path. Process-wide, like :func:`use_amx_bf16`; for tests and for measuring what the path buys."""
    with _switched("set_bf16_dot", enabled):
        yield


def conv_own_loops() -> bool:
    """Whether CPU convolutions take the project's own main loops (the implicit GEMM, Winograd's
    F(2x2, 3x3)) where their shapes allow, now: by default on builds with AVX-512; on AVX2 builds
    oneDNN's measured faster (see csrc/cpu/conv.cpp, kWideVectors), except F(2x2, 3x3) from 128 input
    channels. Winograd's F(2, 3) for conv1d is taken on every build."""
    return _C is not None and _C.conv_own_loops()


@contextlib.contextmanager
def use_own_conv_loops(enabled: bool):
    """Within the block, CPU convolutions take (or, with False, skip) the project's own main loops,
    whatever the build. Process-wide; for tests, which check every path on one machine, and for
    measuring them against oneDNN's."""
    with _switched("set_conv_own_loops", enabled):
        yield


@contextlib.contextmanager
def _switched(setter: str, enabled: bool):
    """Sets one of the extension's path switches for the block (``setter`` returns the previous
    state), and restores it after; nothing without the extension."""
    if _C is None:
        yield
        return
    before = getattr(_C, setter)(enabled)
    try:
        yield
    finally:
        getattr(_C, setter)(before)


def bf16_tiles() -> str:
    """The tiles bf16 CPU kernels multiply on now: "amx", "avx512_bf16" or "fp32"."""
    return "amx" if amx_bf16() else "avx512_bf16" if bf16_dot() else "fp32"


_CAPABILITY_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


_C_MISSING = f"the compiled extension bignlp_fast._C did not import ({_C_ERROR})"


def _cpu_reason() -> Optional[str]:
    if _C is None:
        return _C_MISSING
    built = _BUILD_INFO["cpu_capability"]
    here = torch.backends.cpu.get_cpu_capability()
    if _CAPABILITY_RANK.get(built, 0) > _CAPABILITY_RANK.get(here, 0):
        return (f"the CPU kernels were built for {built} but this CPU supports {here}; rebuild with "
                "BIGNLP_FAST_CPU_ARCH=none or on this machine")
    missing = missing_cpu_isa(_BUILD_INFO.get("cpu_isa", []))
    if missing:  # e.g. built on a Zen 4 (AVX512_BF16), run on a Cascade Lake (AVX-512 without it)
        return (f"the CPU kernels were built for instruction-set extensions this CPU lacks ({', '.join(missing)}); "
                "rebuild on this machine or with BIGNLP_FAST_CPU_ARCH=none")
    return None


def missing_cpu_isa(needed, cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """Those of ``needed`` (names as /proc/cpuinfo's flags) this CPU does not list; none where the
    flags cannot be read (not Linux): the at::vec level check above still applies there."""
    try:
        with open(cpuinfo) as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), None)
    except OSError:
        return []
    if flags is None:
        return []
    have = set(flags)
    return [name for name in needed if name not in have]


# torch's bf16 GEMM on the CPU is oneDNN's, whose bf16 kernels need AVX-512 (F, BW, VL, DQ; faster
# still with AVX512_BF16 or AMX). Below that, at::native's generic loop: on a Zen 2 (AVX2) F.linear in
# bf16 took 9x ops.linear's time at [1024, 768] x [768, 3072] forward, 46x with the backward, and 10x
# fp32 F.linear's. Read once at import, as _CPU_VENDOR.
_BLAS_BF16_GEMM_IS_FAST = not missing_cpu_isa(["avx512f", "avx512bw", "avx512vl", "avx512dq"])


def blas_bf16_gemm_is_fast() -> bool:
    """Whether torch's bf16 GEMM on the CPU has vector kernels (oneDNN's, on a CPU with AVX-512); where
    it does not, bf16 products from ops.linear.MIN_MACS_BF16_GENERIC multiply-adds on take ops.linear
    (the packed GEMM, fp32 sums) in nn.Linear, the models and the RNN input projections."""
    return _BLAS_BF16_GEMM_IS_FAST


def _cuda_reason() -> Optional[str]:
    if _C is None:
        return _C_MISSING
    if not _BUILD_INFO["with_cuda"]:
        return ("the extension was built without its CUDA sources (torch without CUDA, nvcc not found, "
                "or BIGNLP_FAST_CUDA=0)")
    return None


# Fixed for the life of the process; computed once so that choosing a backend is plain Python that
# torch.compile can trace.
_CPU_UNAVAILABLE = _cpu_reason()
_CUDA_UNAVAILABLE = _cuda_reason()


def unavailable_cpu() -> Optional[str]:
    """Why the cpu backend cannot run in this process (no extension, a build for another CPU), or None."""
    return _CPU_UNAVAILABLE


def triton_interpreted() -> bool:
    """True when Triton kernels run through the interpreter (TRITON_INTERPRET=1), e.g. on a CPU."""
    return _ENV_TRITON_INTERPRET() == "1"


_ENV_BACKEND, _ENV_TRITON_INTERPRET = _env_reader("BIGNLP_FAST_BACKEND"), _env_reader("TRITON_INTERPRET")


# Whether triton is installed, known without importing it (importing it takes a while).
_TRITON_UNAVAILABLE = None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run tensors on ``device`` in this process, or None when it can."""
    return _unavailable(backend, device.type, device)


def _unavailable(backend: str, kind: str, device: torch.device) -> Optional[str]:
    """:func:`unavailable`, told ``device.type`` (``kind``; reading it costs ~0.3 us a call)."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if kind != "cpu":
            return f"the cpu backend runs CPU tensors, got tensors on {device}"
        return _CPU_UNAVAILABLE
    if backend == "cuda":
        if kind != "cuda":
            return f"the cuda backend runs CUDA tensors, got tensors on {device}"
        return _CUDA_UNAVAILABLE
    if backend == "triton":
        if _TRITON_UNAVAILABLE:
            return _TRITON_UNAVAILABLE
        if kind == "cuda" or (kind == "cpu" and triton_interpreted()):
            return None
        return f"the triton backend runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


# ---- the ops and their dtypes -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OpInfo:
    """What an op's backends accept. ``dtypes[backend]`` lists the dtypes that backend runs;
    ``missing[backend]`` says why a backend has no kernel for this op (yet); ``auto_order[device
    type]`` replaces AUTO_ORDER's ranking for this op (a kernel not yet measured on that device
    stays reachable by name but is not chosen automatically)."""

    name: str
    dtypes: dict
    missing: dict = dataclasses.field(default_factory=dict)
    auto_order: dict = dataclasses.field(default_factory=dict)


OPS: dict[str, OpInfo] = {}


def register_op(name: str, dtypes: dict, missing: Optional[dict] = None,
                auto_order: Optional[dict] = None) -> OpInfo:
    info = OpInfo(name, dtypes, dict(missing or {}), dict(auto_order or {}))
    OPS[name] = info
    return info


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_unsupported(op: OpInfo, backend: str, dtype: torch.dtype) -> Optional[str]:
    if backend in op.missing:
        return op.missing[backend]
    allowed = op.dtypes.get(backend, ())
    if backend == "torch" or dtype in allowed:
        return None
    return (f"the {backend} backend of {op.name} runs {', '.join(dtype_name(d) for d in allowed) or 'nothing'}, "
            f"got {dtype_name(dtype)}")


# ---- choosing, and the fallback record --------------------------------------------------------
_FALLBACKS: dict[tuple[str, str, str], int] = {}


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The backend asked for by name (argument, else BIGNLP_FAST_BACKEND), or None for automatic."""
    name = backend if backend is not None else _ENV_BACKEND() or None
    if name is None or name == "auto":
        return None
    if name not in BACKENDS:
        source = "" if backend is not None else " (from BIGNLP_FAST_BACKEND)"
        raise ValueError(f"unknown backend {name!r}{source}; expected one of auto, {', '.join(BACKENDS)}")
    return name


def plan(op: OpInfo, device: torch.device, dtype: torch.dtype, backend: Optional[str] = None,
         extra_check: Optional[Callable[[str], Optional[str]]] = None) -> tuple[Optional[str], bool, list]:
    """What :func:`choose` would decide, without raising or recording anything:
    (the backend that can run the call or None, whether one was asked for by name, and the
    (backend, reason) pairs of those that cannot)."""
    named = requested_backend(backend)
    kind = device.type
    if named is not None:
        candidates = (named,)
    else:
        candidates = op.auto_order.get(kind)
        if candidates is None:
            candidates = AUTO_ORDER.get(kind, ())
    reasons = []
    for name in candidates:
        reason = (_unavailable(name, kind, device) or dtype_unsupported(op, name, dtype)
                  or (extra_check(name) if extra_check is not None else None))
        if reason is None:
            return name, named is not None, reasons
        reasons.append((name, reason))
    return None, named is not None, reasons


def choose(op: OpInfo, device: torch.device, dtype: torch.dtype, backend: Optional[str] = None,
           extra_check: Optional[Callable[[str], Optional[str]]] = None) -> str:
    """The backend that runs this call of ``op``.

    ``extra_check(backend)`` returns why that backend cannot take this call (a head_dim or a size it
    does not support), or None. A named backend that cannot run raises BackendError; an automatic
    choice that ends on the reference records the fallback (or raises under BIGNLP_FAST_STRICT=1).
    """
    name, named, reasons = plan(op, device, dtype, backend, extra_check)
    if name is not None:
        return name
    if named:
        raise BackendError(f"{op.name}: backend {reasons[0][0]!r} cannot run this call: {reasons[0][1]}")
    if not reasons:
        reasons.append(("-", f"no fused backend for device type {device.type!r}"))
    _fall_back(op.name, reasons)
    return "torch"


def record_fallback(op: str, backend: str, reason: str) -> None:
    """Record that ``op`` ran the slow path instead of ``backend`` because of ``reason`` (for fallbacks
    that are not a backend choice, e.g. a module option the fused path does not support); raises
    BackendError instead under BIGNLP_FAST_STRICT=1 (after recording)."""
    _fall_back(op, [(backend, reason)])


def strict() -> bool:
    """BIGNLP_FAST_STRICT: 1 / true / yes / on (any case) make a fallback an error; unset, empty, 0 /
    false / no / off do not; anything else is an error, not a silent no."""
    value = os.environ.get("BIGNLP_FAST_STRICT", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"BIGNLP_FAST_STRICT={os.environ['BIGNLP_FAST_STRICT']!r}: expected 1 / true / yes / on, or "
                     "0 / false / no / off")


def _fall_back(op: str, reasons: list[tuple[str, str]]) -> None:
    for name, reason in reasons:
        key = (op, name, reason)
        _FALLBACKS[key] = _FALLBACKS.get(key, 0) + 1
    if strict():
        detail = "; ".join(f"{n}: {r}" for n, r in reasons)
        raise BackendError(f"{op}: would fall back to the torch reference ({detail}) and BIGNLP_FAST_STRICT=1")


def report() -> list[dict]:
    """Every fallback to the torch reference so far: op, backend tried, reason, count."""
    return [{"op": op, "backend": b, "reason": r, "count": n} for (op, b, r), n in sorted(_FALLBACKS.items())]


def reset_report() -> None:
    """Forget the fallbacks recorded so far."""
    _FALLBACKS.clear()
