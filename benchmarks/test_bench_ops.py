"""pytest-benchmark runs of the cases in bignlp_fast.bench: each case's fused op and the PyTorch code
it replaces share a benchmark group, so the report compares them directly.

    pytest benchmarks/ --benchmark-json out.json          # quick suite
    BIGNLP_FAST_BENCH_SUITE=full pytest benchmarks/       # every case (gpu: the GPU-sized cases)
"""

import os

import pytest
import torch

from bignlp_fast import _backend, steady_allocator
from bignlp_fast.bench import cases
from bignlp_fast.bench.cases import to_float64
from bignlp_fast.bench.runner import max_err, peak_extra_mb, sync

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases(os.environ.get("BIGNLP_FAST_BENCH_SUITE", "quick"))
steady_allocator()  # see its docstring: both sides then time the steady state, not page faults


@pytest.mark.parametrize("side", ["bignlp_fast", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bench(benchmark, case, side):
    inputs = case.make(DEVICE, case.dtype)
    backend = _backend.choose(_backend.OPS[case.op], DEVICE, case.dtype)  # (for the report)
    # the op called as a user calls it, no backend named (as bignlp-fast bench without --backend)
    run = (lambda: case.ours(inputs, None)) if side == "bignlp_fast" else (lambda: case.ref(inputs))

    def timed():
        out = run()
        sync(DEVICE)
        return out

    benchmark.group = case.id
    out = benchmark.pedantic(timed, rounds=15, warmup_rounds=2, iterations=1)
    # with --benchmark-disable the call runs once, untimed: no stats, so no rates (the error is still checked)
    median = benchmark.stats.stats.median if benchmark.stats is not None else None
    benchmark.extra_info.update(
        backend=backend if side == "bignlp_fast" else "eager", reference=case.ref_name, bytes=case.bytes,
        gbps=case.bytes / median / 1e9 if case.bytes and median else None,
        gflops=case.flops / median / 1e9 if case.flops and median else None,
        peak_extra_mb=peak_extra_mb(run, DEVICE),  # as the CLI's table: one call's memory beyond its inputs
        max_err_vs_float64=max_err(out, case.ref(to_float64(inputs))) if case.check_error else None)
