"""The Triton kernels compile for real GPUs and fit them: bignlp_fast.triton_compile lowers every
kernel, at the tile sizes its launcher picks for CUDA tensors, to a cubin for sm_80 / sm_86 / sm_90
(no GPU needed) and reads its registers, spills and shared memory. The interpreter tests check what
the kernels compute; these check what the interpreter never does: that they compile, would launch
(shared memory, registers and grid within the GPU's limits: the cases include fake tensors whose
grids would pass 65535 programs in dimension 1) and do not spill registers.

The compiles run in spawned worker processes without TRITON_INTERPRET (this process imported the
kernels under the interpreter). Cold, the matrix below takes about 5 minutes on 2 cores; Triton's
cache (~/.triton/cache) makes a second run take seconds."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

from bignlp_fast import triton_compile  # noqa: E402


def _nvidia_tools() -> bool:
    try:
        triton_compile._cuobjdump()
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _nvidia_tools(), reason="this Triton has no NVIDIA backend (ptxas, cuobjdump)")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (arch, case-name filter, dtypes): every kernel for H100/H200; the tile-heavy ones (tl.dot) for A100;
# attention, whose configs depend on the shared memory per block, for the 99 KiB GPUs (sm_86, sm_89).
MATRIX = [
    (90, None, (F32, F16, BF16)),
    (80, "attention", (F32, BF16)),
    (80, "rnn", (F32, BF16)),
    (80, "text_cnn_pool", (F32, BF16)),
    (86, "attention", (F32, BF16)),
]


@pytest.fixture(scope="module")
def compiled():
    cache = {}

    def get(arch, name_filter, dtypes):
        key = (arch, name_filter, dtypes)
        if key not in cache:
            cache[key] = triton_compile.check(arch, dtypes, name_filter, workers=2)
        return cache[key]
    return get


def _table(rows):
    return "\n" + triton_compile.format_table(rows)


@pytest.mark.parametrize("arch,name_filter,dtypes", MATRIX, ids=[f"sm_{a}-{f or 'all'}" for a, f, _ in MATRIX])
def test_kernels_fit_the_gpu(compiled, arch, name_filter, dtypes):
    rows = compiled(arch, name_filter, dtypes)
    expected_cases = [n for n, _ in triton_compile.cases() if not name_filter or name_filter in n]
    assert {r.case for r in rows} == {f"{n} {str(d).replace('torch.', '')}" for n in expected_cases for d in dtypes}
    assert all(r.arch == arch and r.registers > 0 for r in rows)
    cannot_launch = [r for r in rows if r.problems]
    assert not cannot_launch, f"kernels that would not launch on sm_{arch}:" + _table(cannot_launch)
    spilling = [r for r in rows if r.spill_bytes]
    assert not spilling, f"kernels that spill registers on sm_{arch} (retune their configs):" + _table(spilling)


def test_every_launched_kernel_is_checked(compiled):
    """A kernel added to kernels/ without a case in triton_compile.cases() fails here."""
    import importlib
    import pathlib
    import pkgutil

    import bignlp_fast.kernels as kernels_pkg
    launched = set()
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"bignlp_fast.kernels.{info.name}")
        source = pathlib.Path(module.__file__).read_text()
        launched |= {name for name in vars(module) if name.endswith("_kernel") and f"{name}[" in source}
    assert len(launched) >= 15
    checked = {r.kernel for r in compiled(*MATRIX[0])}
    assert launched - checked == set()


def test_problems_are_found():
    """The limits themselves: a block's registers and shared memory against the SM's."""
    row = triton_compile.Compiled(case="x", kernel="k", arch=86, num_warps=32, num_stages=1, registers=64,
                                  spill_bytes=0, shared_bytes=101376)
    assert row.problems == []  # 64 registers x 1024 threads fill the 65536-register file exactly
    row.registers = 65
    assert "registers" in " ".join(row.problems)  # allocated in groups of 8: 72 x 1024 > 65536
    row.registers, row.shared_bytes = 64, 101377
    assert "shared memory" in " ".join(row.problems)
    row.arch = 90
    assert row.problems == []
    row.grid = (2 ** 20, 65536, 1)  # CUDA: 65535 programs at most in grid dimensions 1 and 2
    assert row.problems == ["grid dimension 1 has 65536 programs, CUDA allows 65535"]


def test_finds_the_shared_memory_overflow_it_was_written_for():
    """At 3 stages (its configuration for A100 and H100), the 16-bit attention forward with a mask at
    head dim 128 needs more shared memory than an sm_86 GPU has: kernels/attention.py runs it in 2
    stages there. With that rule switched off, the check reports the kernel."""
    code = textwrap.dedent("""
        import torch
        import bignlp_fast.kernels.attention as attention
        from bignlp_fast import triton_compile
        attention._FULL_STAGES_SHARED_MEMORY = 0  # every GPU gets the 3-stage forward
        rows = triton_compile.check(86, (torch.bfloat16,), "attention D128 mask+dropout", workers=1)
        print([(r.kernel, r.num_stages, r.problems) for r in rows if r.kernel == "_attn_fwd_kernel"])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (kernel, stages, problems), = eval(out.stdout.strip().splitlines()[-1])
    assert stages == 3
    assert problems and "shared memory" in problems[0] and "sm_86" in problems[0]


def test_refuses_interpreted_kernels():
    """In this process the kernels were imported under TRITON_INTERPRET=1: compiling here must say so,
    not report the interpreter's functions as compiled."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels are compiled in this process (TRITON_INTERPRET is not set)")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_compile.check(90, (torch.float32,), "bias_gelu erf", workers=1)
