"""Runs benchmark cases: ours against the reference, in one process, on the same inputs.

Timing interleaves the two (ours, reference, ours, ...) and reports medians, so drift in a noisy
machine hits both alike. Each row also carries the achieved GB/s and its fraction of the machine's
copy rate, the peak extra memory of one call, the max error of both sides against float64, and the
backend that ran. For a memory-bound case (one with a byte count) the copy rate is measured right
before and right after the case (not in its turns: a 256 MiB copy would evict the inputs from the
caches before one side and not the other): on a shared machine the bandwidth can swing by half
between the start of a run and its end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import tempfile
import time
from typing import Optional

import torch

from bignlp_fast import _backend
from bignlp_fast.bench.cases import Case, to_float64


@dataclasses.dataclass
class Row:
    case: str
    op: str
    mode: str
    shape: str
    dtype: str
    backend: str
    ms: float
    ref_ms: float
    speedup: float
    gbps: Optional[float]
    pct_of_copy: Optional[float]
    copy_gbps: Optional[float]  # the copy rate pct_of_copy is relative to
    gflops: Optional[float]
    peak_mb: float
    ref_peak_mb: float
    max_err: Optional[float]  # None: not measured (Case.check_error)
    ref_max_err: Optional[float]
    reference: str


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: list, device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds of each function, timed in turns."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync(device)
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[i].append(time.perf_counter() - t0)
    return [statistics.median(s) for s in samples]


_COPY_BUFFERS: dict = {}


def _copy_probe(device: torch.device, mbytes: int = 256):
    """A copy of a tensor far past the caches, and the bytes it moves (read + write); the buffers are
    made once per device and kept for the run."""
    if device not in _COPY_BUFFERS:
        src = torch.empty(mbytes << 18, dtype=torch.float32, device=device).uniform_()
        _COPY_BUFFERS[device] = (src, torch.empty_like(src))
    src, dst = _COPY_BUFFERS[device]
    return (lambda: dst.copy_(src)), 2 * src.numel() * 4


def copy_gbps(device: torch.device, repeats: int = 15, mbytes: int = 256) -> float:
    """The machine's copy rate: read + write bytes per second of a large tensor copy (past the caches)."""
    copy, nbytes = _copy_probe(device, mbytes)
    (t,) = time_interleaved([copy], device, repeats)
    return nbytes / t / 1e9


def gemm_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 7) -> float:
    """The machine's matrix-multiply rate: torch.mm of two n x n matrices, in GFLOP/s. Compute-bound
    kernels (attention, RNNs, convolutions) are judged against it."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    (t,) = time_interleaved([lambda: torch.mm(a, b)], device, repeats)
    return 2 * n ** 3 / t / 1e9


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the profiler's native log lines (e.g. about a missing GPU) while it runs."""
    fd = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def peak_extra_mb(fn, device: torch.device) -> float:
    """The most memory one call of ``fn`` holds at once beyond what existed before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    level = peak = 0
    for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        if e["args"].get("Device Type", 0) == 0:
            level += e["args"]["Bytes"]
            peak = max(peak, level)
    return peak / 2**20


def max_err(outs: list, refs: list) -> float:
    return max(((o.detach().double() - r.detach()).abs().max().item() for o, r in zip(outs, refs)
                if o.numel()), default=0.0)


def run_case(case: Case, device: torch.device, backend: Optional[str] = None, repeats: int = 10,
             copy_rate: Optional[float] = None) -> Row:
    """One row. The % of copy of a memory-bound case is against ``copy_rate`` when given, else against
    the mean of copy rates measured just before and just after the case. A named ``backend`` is also
    set as BIGNLP_FAST_BACKEND for the case: the model, classifier and cell cases run whole modules,
    whose ops choose per call, and would otherwise run (and be labelled) another backend. Without one,
    an op case calls the op as a user does, with no backend named (so its eager lane, where it has one
    and the call qualifies), and the row names the backend the automatic choice takes."""
    with _environment("BIGNLP_FAST_BACKEND", backend):
        return _run_case(case, device, backend, repeats, copy_rate)


@contextlib.contextmanager
def _environment(name: str, value: Optional[str]):
    """``os.environ[name] = value`` for the block (nothing when value is None), restored after."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _run_case(case: Case, device: torch.device, backend: Optional[str], repeats: int,
              copy_rate: Optional[float]) -> Row:
    inputs = case.make(device, case.dtype)
    chosen = _backend.choose(_backend.OPS[case.op], device, case.dtype, backend)
    ours = lambda: case.ours(inputs, backend)  # noqa: E731
    ref = lambda: case.ref(inputs)  # noqa: E731
    measure_copy = case.bytes and copy_rate is None
    before = copy_gbps(device, repeats=5) if measure_copy else None
    t_ours, t_ref = time_interleaved([ours, ref], device, repeats)
    if measure_copy:
        copy_rate = (before + copy_gbps(device, repeats=5)) / 2
    ref64 = case.ref(to_float64(inputs)) if case.check_error else None
    gbps = case.bytes / t_ours / 1e9 if case.bytes else None
    return Row(
        case=case.id, op=case.name, mode=case.mode, shape="x".join(map(str, case.shape)),
        dtype=str(case.dtype).replace("torch.", ""), backend=chosen, ms=t_ours * 1e3, ref_ms=t_ref * 1e3,
        speedup=t_ref / t_ours, gbps=gbps,
        pct_of_copy=100 * gbps / copy_rate if gbps and copy_rate else None,
        copy_gbps=copy_rate if gbps else None,
        gflops=case.flops / t_ours / 1e9 if case.flops else None,
        peak_mb=peak_extra_mb(ours, device), ref_peak_mb=peak_extra_mb(ref, device),
        max_err=max_err(ours(), ref64) if ref64 is not None else None,
        ref_max_err=max_err(ref(), ref64) if ref64 is not None else None, reference=case.ref_name)


def _err(e: Optional[float]) -> str:
    return "-" if e is None else f"{e:.1e}"


def format_table(rows: list[Row], copy_rate: Optional[float] = None, gemm_rate: Optional[float] = None) -> str:
    head = ["case", "mode", "shape", "dtype", "backend", "ours ms", "torch ms", "speedup", "GB/s", "% copy",
            "GFLOP/s", "peak MB", "torch MB", "max err", "torch err"]
    body = []
    for r in rows:
        body.append([r.op, r.mode, r.shape, r.dtype, r.backend, f"{r.ms:.2f}", f"{r.ref_ms:.2f}",
                     f"{r.speedup:.2f}x" + ("" if r.speedup >= 1 else " SLOWER"),
                     f"{r.gbps:.1f}" if r.gbps else "-", f"{r.pct_of_copy:.0f}%" if r.pct_of_copy else "-",
                     f"{r.gflops:.0f}" if r.gflops else "-", f"{r.peak_mb:.1f}", f"{r.ref_peak_mb:.1f}", _err(r.max_err), _err(r.ref_max_err)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body]
    around = [r.copy_gbps for r in rows if r.copy_gbps]
    if copy_rate:
        out.append(f"\ncopy rate measured at the start of this run: {copy_rate:.1f} GB/s (read + write of a 256 MiB "
                   "tensor)")
    if around:
        out.append(f"{'' if copy_rate else chr(10)}copy rate around each memory-bound case (measured just before and "
                   f"after it; its % copy is against that): {min(around):.1f}-{max(around):.1f} GB/s")
    if gemm_rate:
        out.append(f"sgemm rate measured in this run: {gemm_rate:.0f} GFLOP/s (torch.mm, 2048 x 2048, float32)")
    return "\n".join(out)


def pyplot():
    """matplotlib.pyplot on a file-only backend, or SystemExit saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib ({e}); install it with: pip install matplotlib") from e
    return plt


def plot(rows: list[Row], path: str) -> None:
    plt = pyplot()
    labels = [f"{r.op} {r.mode}\n{r.shape} {r.dtype}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4.5))
    ax.bar(range(len(rows)), [r.speedup for r in rows], color=["tab:green" if r.speedup >= 1 else "tab:red"
                                                                for r in rows])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup over PyTorch (same run)")
    ax.set_title("bignlp_fast vs the PyTorch a user would run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
