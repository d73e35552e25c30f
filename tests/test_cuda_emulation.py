"""The CPU emulation of CUDA that runs csrc/cuda's kernels where no GPU is (tests/cuda_emu; every test
parametrized with the cuda backend gets a ``cuda-emulated`` case, see conftest.py). A test harness is
trusted only as far as it is shown to catch what it claims to: here kernels with known bugs
(tests/cuda_emu/selftest.cu) must be reported, or give visibly wrong results, and their fixed twins must
give the right ones. Then csrc/cuda's kernels under both thread orders and other SM counts."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_emu
from conftest import SUBPROCESS_CWD, emulated_cuda_marks
from cuda_emu import build

pytestmark = emulated_cuda_marks()


@pytest.fixture(scope="module")
def selftest():
    module = build.load_selftest()
    yield module
    module.configure()


def test_barriers_order_shared_memory(selftest):
    """A thread reads a slot of shared memory another thread writes: right after __syncthreads; before
    the owner wrote it without one, in the order the emulation runs threads (forward misses reads from
    later threads, reversed from earlier ones, so each order catches the other's blind side)."""
    n = 64
    want_next = [float((i + 1) % n) for i in range(n)]
    want_prev = [float((i - 1) % n) for i in range(n)]
    for reverse in (False, True):
        selftest.configure(reverse=reverse)
        assert selftest.exchange(n, 1, True) == want_next
        assert selftest.exchange(n, -1, True) == want_prev
    selftest.configure(reverse=False)
    stale = selftest.exchange(n, 1, False)
    assert all(x != x for x in stale[:-1]), "forward order: reading a later thread's slot must be stale (NaN)"
    selftest.configure(reverse=True)
    stale = selftest.exchange(n, -1, False)
    assert all(x != x for x in stale[1:]), "reverse order: reading an earlier thread's slot must be stale (NaN)"


def test_syncwarp_orders_a_warps_shared_memory(selftest):
    selftest.configure()
    assert selftest.warp_exchange(True) == [float(i ^ 1) for i in range(32)]
    assert any(x != x for x in selftest.warp_exchange(False))


def test_shuffles_indices_and_uninitialized_shared_memory(selftest):
    selftest.configure()
    assert selftest.warp_sum(64) == [496.0] * 64
    assert all(x != x for x in selftest.uninitialized()), "shared memory must start as NaN, not zeros"
    gx, gy, t = 3, 2, 5
    assert selftest.index(gx, gy, t) == [float(bx + 1000 * by) for by in range(gy) for bx in range(gx) for _ in range(t)]


def test_wmma_product(selftest):
    g = random.Random(0)
    a = [float(torch.tensor(g.uniform(-2, 2)).half()) for _ in range(256)]
    b = [float(torch.tensor(g.uniform(-2, 2)).half()) for _ in range(256)]
    want = (torch.tensor(a, dtype=torch.float64).view(16, 16) @ torch.tensor(b, dtype=torch.float64).view(16, 16))
    got = torch.tensor(selftest.wmma(a, b, 16), dtype=torch.float64).view(16, 16)
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("case,message", [
    ("divergent_barrier", "__syncthreads reached at line"),
    ("shuffle_after_exit", "lane 5 of the warp has exited"),
    ("deadlock", "deadlock"),
    ("partial_warp_shuffle", "full-warp masks in full warps only"),
    ("empty_grid", "an empty grid"),
    ("grid_y", "grid dimensions past"),
    ("block_size", "block size"),
    ("shared_without_attribute", "without cudaFuncSetAttribute"),
    ("shared_with_attribute", None),
    ("wmma_misaligned", "32-byte) aligned"),
])
def test_reports_what_a_gpu_would_fail_on(selftest, case, message):
    selftest.configure()
    error = selftest.errors()[case]
    if message is None:
        assert error == ""
    else:
        assert message in error, error


@pytest.mark.parametrize("sms,reverse", [(1, True), (13, False)])
def test_kernels_under_other_orders_and_sm_counts(monkeypatch, sms, reverse):
    """csrc/cuda's kernels with the threads of each block in reverse order (and one SM), or 13 SMs (the
    grids sized from the SM count split their work differently): the same results as the reference.
    (The whole cuda-emulated suite passes with BIGNLP_FAST_CUDA_EMULATION=sms=1,reverse=1 too.)"""
    from bignlp_fast.ops import add_layer_norm, bias_gelu, conv1d, scaled_dot_product_attention, text_cnn_pool
    from bignlp_fast.ops.rnn import rnn_layer

    g = torch.Generator().manual_seed(0)
    rand = lambda *shape, dtype=torch.float32: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    with cuda_emu.active(monkeypatch, sms=sms, reverse=reverse):
        def both(fn, *args, dtype=torch.float32, tol):
            ours = fn(*args, backend="cuda")
            ref = fn(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args],
                     backend="torch")
            for o, r in zip(ours if isinstance(ours, tuple) else (ours,), ref if isinstance(ref, tuple) else (ref,)):
                if isinstance(o, torch.Tensor):
                    assert (o.double() - r).abs().max() < tol

        x, res, w, b = rand(37, 300), rand(37, 300), rand(300), rand(300)
        both(lambda *a, backend: add_layer_norm(*a, eps=1e-5, backend=backend), x, res, w, b, tol=1e-4)
        both(lambda *a, backend: bias_gelu(*a, backend=backend), x, b, tol=1e-5)
        q, k, v = (rand(2, 3, 70, 64, dtype=torch.bfloat16) for _ in range(3))
        both(lambda *a, backend: scaled_dot_product_attention(*a, is_causal=True, backend=backend), q, k, v, tol=3e-2)
        xc, wc = rand(2, 8, 40), rand(16, 8, 3)
        both(lambda *a, backend: conv1d(*a, padding=1, activation="gelu", backend=backend), xc, wc, tol=1e-4)
        xw, whh, h0 = rand(9, 5, 4 * 24), rand(4 * 24, 24) * 0.3, rand(5, 24)
        both(lambda *a, backend: rnn_layer("lstm", a[0], a[1], None, a[2], a[3], backend=backend)[:2],
             xw, whh, h0, h0.clone(), tol=1e-4)
        xt, wt0, wt1, lens = rand(3, 70, 20), rand(70, 20, 3), rand(5, 20, 2), torch.tensor([70, 9, 66])
        both(lambda x, w0, w1, backend: text_cnn_pool(x, [w0, w1], None, "gelu", lens, backend=backend),
             xt, wt0, wt1, tol=1e-4)


def test_kernels_on_shapes_that_cut_rows_into_chunks(monkeypatch):
    """The paths that the float64 tests' shapes do not reach, forward and backward against the float64
    reference: add_layer_norm's backward cutting rows into chunks (hidden past 2048 on its scalar path,
    past 8192 on its vectorised one), conv1d's forward stepping through more vectors than its grid
    holds and its backward cutting rows into chunks, causal_conv1d with several chunks a row (L > 1024)."""
    from bignlp_fast.ops import add_layer_norm, causal_conv1d, conv1d

    g = torch.Generator().manual_seed(0)

    def check(fn, shapes, tol):
        leaves = [torch.randn(*s, generator=g).requires_grad_() for s in shapes]
        grad_out = None
        results = []
        for backend, dtype in (("cuda", torch.float32), ("torch", torch.float64)):
            args = [t.detach().to(dtype).requires_grad_() for t in leaves]
            out = fn(*args, backend=backend)
            if grad_out is None:
                grad_out = torch.randn(out.shape, generator=g)
            grads = torch.autograd.grad(out, args, grad_out.to(dtype))
            results.append((out, *grads))
        for ours, ref in zip(*results):
            assert (ours.double() - ref).abs().max() < tol * max(1.0, ref.abs().max().item())

    with cuda_emu.active(monkeypatch, sms=1):
        for hidden in (2051, 12288):  # odd: the scalar path; a multiple of the vector width: the vectorised one
            check(lambda x, r, w, b, backend: add_layer_norm(x, r, w, b, backend=backend)[0],
                  [(3, hidden), (3, hidden), (hidden,), (hidden,)], tol=1e-4)
        check(lambda x, w, b, backend: conv1d(x, w, b, padding=1, activation="gelu", backend=backend),
              [(1, 2, 8200), (2, 2, 3), (2,)], tol=1e-4)
        check(lambda x, w, b, backend: causal_conv1d(x, w, b, "silu", backend=backend),
              [(1, 2, 2500), (2, 4), (2,)], tol=1e-4)


def _asan_python(args, env_extra=None, timeout=900):
    """Runs ``python args`` with AddressSanitizer's runtime preloaded (tests/ on the path)."""
    try:
        preload = build.asan_runtime()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"no AddressSanitizer runtime: {e}")
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0",
               PYTHONPATH=os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]), **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=SUBPROCESS_CWD, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _asan_build(function: str) -> None:
    """Builds an ``asan=True`` module first, so that the compiler's output is not part of the check (in
    a subprocess too: a process without the runtime preloaded cannot load the module)."""
    built = _asan_python(["-c", f"from cuda_emu import build; build.{function}(asan=True)"], timeout=1800)
    assert built.returncode == 0, built.stderr[-3000:]


def test_address_sanitizer_reports_reads_past_a_buffer():
    """Built with AddressSanitizer, a kernel reading past the end of its input is reported (a GPU would
    read whatever lies there, silently); the same kernel within bounds is not."""
    _asan_build("load_selftest")
    code = "import sys; from cuda_emu import build; m = build.load_selftest(asan=True); print(sum(m.copy({}, 32)))"
    ok = _asan_python(["-c", code.format(32)])
    assert ok.returncode == 0 and ok.stdout.strip().endswith("32.0"), ok.stderr[-3000:]
    bad = _asan_python(["-c", code.format(31)])
    assert bad.returncode != 0 and "heap-buffer-overflow" in bad.stderr, bad.stderr[-3000:]
    assert "copy_kernel" in bad.stderr  # the report names the kernel


def test_kernels_within_their_tensors():
    """csrc/cuda's kernels under AddressSanitizer: the cuda-emulated cases of each op's test against
    float64 (every shape, mask, length and dtype there; attention's varlen and dropout tests too) run
    with the instrumented build in a subprocess. Tensors are CPU memory there, so a read or write past a
    tensor, or past a fiber's stack, is reported instead of read or written silently as on a GPU."""
    _asan_build("load")
    tests = Path(__file__).resolve().parent
    files = [str(tests / f) for f in ("test_attention.py", "test_rnn_layer.py", "test_conv.py",
                                      "test_causal_conv1d.py", "test_add_layer_norm.py", "test_bias_gelu.py",
                                      "test_text_cnn_pool.py")]
    run = _asan_python(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k",
                        "cuda-emulated and (matches_float64 or varlen or dropout_same_mask or cuda_tiles)", *files],
                       env_extra={"BIGNLP_FAST_CUDA_EMULATION": "asan=1"}, timeout=1800)
    assert run.returncode == 0 and "AddressSanitizer" not in run.stdout + run.stderr, \
        (run.stdout[-3000:] + run.stderr[-3000:])
    assert " passed" in run.stdout
