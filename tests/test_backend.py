"""Backend choice, the fallback record, strict mode, the build and the CLI."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import bignlp_fast
from bignlp_fast import _backend
from bignlp_fast.ops import add_layer_norm, bias_gelu
from conftest import SUBPROCESS_CWD


def test_extension_is_built_and_reports_how():
    info = bignlp_fast.build_info()
    assert "error" not in info, info
    assert info["cpu_capability"] in ("AVX512", "AVX2", "DEFAULT")
    assert "-O3" in info["cpu_flags"]
    assert _backend.unavailable("cpu", torch.device("cpu")) is None


def test_triton_kernels_are_importable_as_a_subpackage():
    import bignlp_fast.kernels.add_layer_norm as k1
    import bignlp_fast.kernels.bias_gelu as k2
    assert callable(k1.add_layer_norm_fwd_triton) and callable(k2.bias_gelu_bwd_triton)


def test_a_non_editable_install_holds_every_module(tmp_path):
    """setup.py's build_py (what `pip install .` copies) takes every module of bignlp_fast/ and
    kernels/, and the package imports from that copy alone (with this build's extension beside it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree, lib = tmp_path / "tree", tmp_path / "lib"
    # the sources alone, as in a fresh clone: an editable install's bignlp_fast.egg-info (SOURCES.txt
    # lists every file) would make build_py copy modules the package list leaves out
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for top in ("bignlp_fast", "kernels", "csrc"):
        shutil.copytree(os.path.join(root, top), tree / top, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(root, name), tree / name)
    # -P: the tree's root is not on sys.path, where kernels/ would hide a package named kernels
    subprocess.run([sys.executable, "-P", "setup.py", "-q", "build_py", "-d", str(lib)], cwd=tree,
                   env=dict(os.environ, BIGNLP_FAST_CUDA="0"), check=True, capture_output=True)
    built = {str(p.relative_to(lib)) for p in lib.rglob("*.py")}
    sources = {os.path.relpath(os.path.join(d, f), root).replace("kernels/", "bignlp_fast/kernels/", 1)
               for top in ("bignlp_fast", "kernels") for d, _, files in os.walk(os.path.join(root, top))
               for f in files if f.endswith(".py")}
    assert sources - built == set()
    so = bignlp_fast._backend.compiled().__file__
    os.symlink(so, lib / "bignlp_fast" / os.path.basename(so))
    code = ("import bignlp_fast, bignlp_fast.models, bignlp_fast.kernels.attention, bignlp_fast.bench; "
            "print(bignlp_fast.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=SUBPROCESS_CWD, check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(lib))).stdout
    assert out.strip() == str(lib / "bignlp_fast" / "__init__.py")


def test_automatic_choice_on_cpu_is_the_cpu_backend():
    assert _backend.choose(_backend.OPS["add_layer_norm"], torch.device("cpu"), torch.float32) == "cpu"
    assert bignlp_fast.report() == []


def test_environment_variable_names_the_backend(monkeypatch):
    monkeypatch.setenv("BIGNLP_FAST_BACKEND", "torch")
    assert _backend.choose(_backend.OPS["bias_gelu"], torch.device("cpu"), torch.float32) == "torch"
    assert _backend.choose(_backend.OPS["bias_gelu"], torch.device("cpu"), torch.float32, "cpu") == "cpu"
    monkeypatch.setenv("BIGNLP_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"unknown backend 'nonsense' \(from BIGNLP_FAST_BACKEND\)"):
        bias_gelu(torch.randn(2, 3))


def test_fallback_is_recorded_never_silent():
    x = torch.randn(4, 8, dtype=torch.float16)
    y = bias_gelu(x)  # float16 has no CPU kernel: the reference runs, and says so
    torch.testing.assert_close(y, torch.nn.functional.gelu(x))
    bias_gelu(x)
    (record,) = bignlp_fast.report()
    assert record["op"] == "bias_gelu" and record["backend"] == "cpu" and record["count"] == 2
    assert "float16" in record["reason"]
    bignlp_fast.reset_report()
    assert bignlp_fast.report() == []


@pytest.mark.parametrize("value", ["1", "true", "Yes", " on "])
def test_strict_mode_turns_a_fallback_into_an_error(monkeypatch, value):
    monkeypatch.setenv("BIGNLP_FAST_STRICT", value)
    with pytest.raises(bignlp_fast.BackendError, match="would fall back to the torch reference.*float16"):
        add_layer_norm(torch.randn(4, 8, dtype=torch.float16))
    add_layer_norm(torch.randn(4, 8))  # a fused path is not affected


@pytest.mark.parametrize("value,rejected", [("0", False), ("off", False), ("", False), ("maybe", True)])
def test_strict_mode_off_values_and_a_value_it_does_not_know(monkeypatch, value, rejected):
    monkeypatch.setenv("BIGNLP_FAST_STRICT", value)
    x = torch.randn(4, 8, dtype=torch.float16)
    if not rejected:
        add_layer_norm(x)  # falls back, recorded
        assert bignlp_fast.report()[0]["op"] == "add_layer_norm"
    else:  # not a silent "no": the fallback this run was meant to catch would pass unseen
        with pytest.raises(ValueError, match="BIGNLP_FAST_STRICT='maybe'"):
            add_layer_norm(x)


def test_fallback_is_recorded_under_compile():
    f = torch.compile(lambda x: bias_gelu(x), fullgraph=True, backend="aot_eager")
    f(torch.randn(4, 8, dtype=torch.float16))
    assert bignlp_fast.report()[0]["op"] == "bias_gelu"


def test_info_lists_every_op_and_backend():
    info = bignlp_fast.info()
    assert set(info["ops"]) >= {"add_layer_norm", "bias_gelu"}
    for op in info["ops"].values():
        assert set(op) == set(_backend.BACKENDS)
        assert op["torch"]["usable"].startswith("yes") and op["cpu"]["usable"].startswith("yes")
        if not torch.cuda.is_available():
            assert op["cuda"]["usable"].startswith("no: ")
    assert info["build"]["cpu_flags"]
    assert info["fp32_projection_gemm"].startswith("torch" if _backend.blas_sgemm_is_fast() else "bignlp_fast")
    assert info["bf16_gemm"].startswith("torch" if _backend.blas_bf16_gemm_is_fast() else "bignlp_fast")
    # the streaming kernels' row limit: 64 where the CPU kernels are an AVX2 build, 16 in an AVX-512 build
    if _backend.compiled() is not None:
        assert info["linear_streaming_rows"] == (64 if _backend.cpu_kernels_avx2() else 16)


def test_bf16_gemm_rule_follows_the_cpu_flags(tmp_path):
    """torch's bf16 GEMM counts as fast exactly where the CPU has oneDNN's AVX-512 subset."""
    flags = "fpu sse avx avx2 fma avx512f avx512dq avx512bw avx512vl"
    with_avx512, avx2_only = tmp_path / "with", tmp_path / "without"
    with_avx512.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    avx2_only.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n")
    needed = ["avx512f", "avx512bw", "avx512vl", "avx512dq"]
    assert _backend.missing_cpu_isa(needed, str(with_avx512)) == []
    assert _backend.missing_cpu_isa(needed, str(avx2_only)) == needed
    assert _backend.blas_bf16_gemm_is_fast() == (_backend.missing_cpu_isa(needed) == [])


@pytest.mark.skipif(_backend.compiled() is None, reason="needs the compiled extension")
def test_blas_sgemm_rule():
    # torch's sgemm for fp32 GEMMs where MKL is present and either the CPU is Intel's (MKL's AVX-512
    # path) or the CPU kernels were built without AVX-512 (MKL's AVX2 kernels beat the packed GEMM),
    # but for AMD's Zen 1 / Zen 2 (family 23), where the packed GEMM beat MKL's AVX2 kernels
    mkl = torch.backends.mkl.is_available()
    intel = _backend.cpu_vendor() == "GenuineIntel"
    zen2_or_older = _backend.cpu_vendor() == "AuthenticAMD" and _backend.cpuinfo("cpu family") == "23"
    avx512_build = _backend.build_info()["cpu_capability"] == "AVX512"
    assert _backend.blas_sgemm_is_fast() == (mkl and (intel or (not avx512_build and not zen2_or_older)))


@pytest.mark.parametrize("args", [["info"], ["info", "--json"]])
def test_cli_info_runs(args):
    out = subprocess.run([sys.executable, "-m", "bignlp_fast", *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300, cwd=SUBPROCESS_CWD)
    assert out.returncode == 0, out.stderr
    if "--json" in args:
        assert "ops" in json.loads(out.stdout)
    else:
        assert "add_layer_norm" in out.stdout and "cpu_flags" in out.stdout


def test_cli_output_into_a_closed_pipe_is_quiet():
    """`bignlp-fast info | head -1`: the reader closes the pipe before the command has written all;
    the command stops without a BrokenPipeError traceback (status 141, a shell's for SIGPIPE)."""
    proc = subprocess.Popen([sys.executable, "-m", "bignlp_fast", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=SUBPROCESS_CWD)
    proc.stdout.close()  # long before its first write (importing torch alone takes seconds): every write fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and "Traceback" not in err, err


def test_cuda_sources_were_compiled_when_asked():
    if os.environ.get("BIGNLP_FAST_CUDA") != "1":
        pytest.skip("BIGNLP_FAST_CUDA=1 not set: the build decided by itself")
    assert bignlp_fast.build_info()["with_cuda"], "BIGNLP_FAST_CUDA=1 but the extension has no CUDA sources"


def test_every_registered_cuda_kernel_is_in_the_extension():
    """An op that registers a cuda backend has its kernels bound in an extension built with CUDA."""
    if not bignlp_fast.build_info().get("with_cuda"):
        pytest.skip("the extension was built without CUDA sources")
    compiled = _backend.compiled()
    for name, op in _backend.OPS.items():
        if "cuda" in op.dtypes and "cuda" not in op.missing:
            assert hasattr(compiled, f"{name}_fwd_cuda"), name
            if hasattr(compiled, f"{name}_bwd_cpu"):
                assert hasattr(compiled, f"{name}_bwd_cuda"), name


def test_an_op_can_rank_its_backends_for_a_device():
    """OpInfo.auto_order replaces AUTO_ORDER for one op (attention keeps triton first on CUDA tensors
    until its CUDA kernel has been measured); a backend named by the caller is unaffected."""
    plain = _backend.OpInfo("probe", {"cpu": (torch.float32,)})
    assert _backend.plan(plain, torch.device("cpu"), torch.float32) == ("cpu", False, [])
    ranked = _backend.OpInfo("probe", {"cpu": (torch.float32,)}, auto_order={"cpu": ("torch",)})
    assert _backend.plan(ranked, torch.device("cpu"), torch.float32) == ("torch", False, [])
    assert _backend.plan(ranked, torch.device("cpu"), torch.float32, backend="cpu") == ("cpu", True, [])


# ---- the eager shortcut past torch's dispatcher (ops/_common.py: call) ----------------------------
@pytest.fixture
def body_calls(monkeypatch):
    """Counts the calls that reach add_layer_norm_fwd's body through the shortcut (a call through the
    dispatcher runs the registered function, not this dictionary entry)."""
    import sys
    from bignlp_fast.ops import _common
    op = sys.modules["bignlp_fast.ops.add_layer_norm"].add_layer_norm_fwd
    real, calls = _common._BODIES[op], []

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setitem(_common._BODIES, op, counted)
    return calls


def _aln_inputs(requires_grad=False):
    x = torch.randn(3, 8, requires_grad=requires_grad)
    return x, torch.randn(3, 8), torch.ones(8), torch.zeros(8)


def test_eager_inference_call_skips_the_dispatcher(body_calls):
    # backend named: not the op's eager lane (tests/test_eager_lanes.py), which skips call() altogether
    x, r, w, b = _aln_inputs()
    out, s = add_layer_norm(x, r, w, b, backend="cpu")
    assert len(body_calls) == 1
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x + r, (8,), w, b))
    with torch.no_grad():  # grad mode off: even inputs that require grad take the shortcut
        add_layer_norm(*_aln_inputs(requires_grad=True), backend="cpu")
    assert len(body_calls) == 2


def test_a_call_autograd_records_runs_the_body_on_an_autograd_function(body_calls):
    """Only autograd must see it: the body, on a torch.autograd.Function with the op's own backward
    (no dispatcher), and the same values and gradients as through the custom op."""
    from torch.overrides import TorchFunctionMode
    x, r, w, b = _aln_inputs(requires_grad=True)
    r.requires_grad_(True)
    out, s = add_layer_norm(x, r, w, b)
    assert len(body_calls) == 1
    node = lambda t: t.grad_fn.next_functions[0][0] if type(t.grad_fn).__name__ == "ViewBackward0" else t.grad_fn  # noqa: E731
    assert type(node(out)).__name__.startswith("add_layer_norm_fwd_eager")
    go = torch.randn_like(out)
    grads = torch.autograd.grad((out * go).sum() + s.square().sum(), (x, r))

    class Through(TorchFunctionMode):  # a mode: the call must take the dispatcher
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Through():
        out2, s2 = add_layer_norm(x, r, w, b)
    assert len(body_calls) == 1 and "bignlp_fast" in type(node(out2)).__name__
    grads2 = torch.autograd.grad((out2 * go).sum() + s2.square().sum(), (x, r))
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2, rtol=0, atol=0)


def test_calls_that_something_must_see_go_through_the_dispatcher(body_calls):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Seen.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen():
        add_layer_norm(*_aln_inputs())
    assert "bignlp_fast.add_layer_norm_fwd.default" in Seen.ops
    with torch.profiler.profile() as prof:
        add_layer_norm(*_aln_inputs())
    assert any(e.name == "bignlp_fast::add_layer_norm_fwd" for e in prof.events())
    assert body_calls == []


# ---- the CPU kernels' scratch memory (csrc/cpu/common.h: LineVector, line_buffer) ------------------
def test_cpu_kernels_keep_their_scratch_on_cache_lines():
    """No CPU kernel holds float / bf16 scratch in a plain std::vector or new[]: glibc aligns those to
    16 bytes, and where they landed varied from process to process, so the same kernel ran 2.5x slower
    in some processes than in others (the bf16 LSTM's AMX operands). cpu::LineVector and
    cpu::line_buffer start on a 64-byte line."""
    import re
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cpu")
    plain = re.compile(r"std::vector<\s*(float|c10::BFloat16|uint32_t|T|AT)\s*>|new\s+(float|c10::BFloat16|uint32_t|T)\s*\[")
    found = []
    for name in sorted(os.listdir(root)):
        if name.endswith((".cpp", ".h")):
            with open(os.path.join(root, name)) as f:
                for number, line in enumerate(f, 1):
                    code = line.split("//", 1)[0]
                    if plain.search(code):
                        found.append(f"csrc/cpu/{name}:{number}: {line.strip()}")
    assert found == [], "scratch off a cache line (use cpu::LineVector / cpu::line_buffer):\n" + "\n".join(found)


# ---- the cache of CPU output buffers (csrc/cpu/buffer_cache.h) -------------------------------------
def test_large_outputs_come_back_from_the_buffer_cache_and_never_alias():
    from bignlp_fast.ops import linear
    x, w = torch.randn(2048, 256), torch.randn(1024, 256)  # an 8 MiB output: large enough to be cached
    expected = x @ w.t()
    _backend.clear_buffer_cache()
    before = _backend.buffer_cache()
    y1 = linear(x, w, backend="cpu")
    ptr = y1.data_ptr()
    y2 = linear(x, w, backend="cpu")  # y1 is alive: y2 must have memory of its own
    assert y2.data_ptr() != ptr
    torch.testing.assert_close(y1, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y2, expected, rtol=1e-5, atol=1e-4)
    del y1
    assert _backend.buffer_cache()["cached_bytes"] >= 8 << 20
    y3 = linear(x + 1, w, backend="cpu")  # the same size: y1's buffer, taken from the cache
    after = _backend.buffer_cache()
    assert y3.data_ptr() == ptr and after["hits"] > before["hits"]
    torch.testing.assert_close(y3, (x + 1) @ w.t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y2, expected, rtol=1e-5, atol=1e-4)  # untouched by y3's call
    y2.resize_(4096, 1024)  # storage like at::empty's: growing it takes torch's allocator, y2's buffer goes back
    y2.fill_(1.0)
    del y2, y3
    assert _backend.clear_buffer_cache() >= 16 << 20
    assert _backend.buffer_cache()["cached_bytes"] == 0


def test_buffer_cache_size_comes_from_the_environment():
    code = ("import torch, bignlp_fast; from bignlp_fast import _backend, ops; "
            "y = ops.linear(torch.randn(2048, 256), torch.randn(1024, 256), backend='cpu'); del y; "
            "print(_backend.buffer_cache()['limit_bytes'], _backend.buffer_cache()['cached_bytes'])")
    # not a whole number of MiB in [0, 1 TiB]: said, and the default kept (2G once read as 2 MiB,
    # -1 and 2^63 - 1 as off or as a negative limit)
    for mb, limit in (("0", 0), ("64", 64 << 20), ("2G", 512 << 20), ("1.5", 512 << 20), ("-1", 512 << 20),
                      ("9223372036854775807", 512 << 20)):
        env = dict(os.environ, BIGNLP_FAST_CPU_CACHE_MB=mb)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                             cwd=SUBPROCESS_CWD)
        got_limit, cached = map(int, out.stdout.split())
        assert got_limit == limit
        assert (cached == 0) == (limit == 0)
        assert ("is not a whole number of MiB" in out.stderr) == (mb not in ("0", "64"))


def test_cpu_backend_refuses_a_cpu_without_an_extension_it_was_built_for(tmp_path, monkeypatch):
    """The at::vec level (AVX-512) is not all -march=native builds for: a Zen 4 build has AVX512_BF16
    dot products that an AVX-512 Cascade Lake lacks. The cpu backend is refused there, with the reason."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx avx2 avx512f avx512bw\n\nprocessor\t: 1\n")
    assert _backend.missing_cpu_isa(["avx2", "avx512f", "avx512_bf16"], str(cpuinfo)) == ["avx512_bf16"]
    assert _backend.missing_cpu_isa(["avx512_bf16"], str(tmp_path / "absent")) == []  # unknown: not refused
    assert set(bignlp_fast.build_info()["cpu_isa"]) <= set(open("/proc/cpuinfo").read().split())  # built here
    monkeypatch.setitem(_backend._BUILD_INFO, "cpu_isa", ["avx2", "no_such_extension"])
    reason = _backend._cpu_reason()
    assert "no_such_extension" in reason and "rebuild" in reason


def test_mid_sized_outputs_are_reused_from_the_cache_by_best_fit():
    """Outputs from 128 KiB up come from the cache (a plain process otherwise page-faults them afresh
    on every call); a request takes a freed buffer of its size or up to 1/8 larger, never a live one."""
    x, r = torch.randn(1024, 768), torch.randn(1024, 768)  # 3 MiB outputs
    _backend.clear_buffer_cache()
    out, s = add_layer_norm(x, r, backend="cpu")
    ptrs = {out.data_ptr(), s.data_ptr()}
    expected = torch.nn.functional.layer_norm(x + r, (768,))
    del out, s
    before = _backend.buffer_cache()
    assert before["cached_buffers"] >= 2
    out, s = add_layer_norm(x[:1000], r[:1000], backend="cpu")  # 2.3% smaller: the same buffers
    assert {out.data_ptr(), s.data_ptr()} == ptrs
    assert _backend.buffer_cache()["hits"] >= before["hits"] + 2
    torch.testing.assert_close(out, expected[:1000], rtol=1e-5, atol=1e-5)
    out2, _ = add_layer_norm(x[:512], r[:512], backend="cpu")  # half the size: not a 2x larger buffer
    assert out2.data_ptr() not in ptrs
    torch.testing.assert_close(out2, expected[:512], rtol=1e-5, atol=1e-5)
    small, _ = add_layer_norm(x[:8], r[:8], backend="cpu")  # 24 KiB: plain at::empty, not counted
    torch.testing.assert_close(small, expected[:8], rtol=1e-5, atol=1e-5)


def test_torch_func_grad_says_it_is_unsupported_and_vmap_works():
    """torch's custom ops with their own backward cannot run under torch.func.grad / jacrev / jvp (its
    error is about an autograd.Function's setup_context); ours says what it is and what works."""
    x, w = torch.randn(3, 16), torch.randn(16)
    with pytest.raises(RuntimeError, match="do not support torch.func's grad"):
        torch.func.grad(lambda w: add_layer_norm(x, None, w, None)[0].square().sum())(w)
    xs = torch.randn(4, 3, 16)
    torch.testing.assert_close(torch.func.vmap(lambda x: bias_gelu(x, w))(xs), torch.stack([bias_gelu(x, w) for x in xs]))


def test_scalar_arguments_of_numpy_and_zero_d_tensor_types():
    """Numbers as torch's functions take them: numpy scalars and 0-d tensors for scale, dropout_p and
    eps, numpy integers for a convolution's stride, padding and groups; a float for an int stays an error."""
    import numpy as np
    import torch.nn.functional as F
    from bignlp_fast import ops
    q = torch.randn(1, 2, 5, 8)
    want = F.scaled_dot_product_attention(q, q, q, scale=0.5)
    for scale in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        torch.testing.assert_close(ops.scaled_dot_product_attention(q, q, q, scale=scale, dropout_p=np.float32(0.0)),
                                   want)
    x = torch.randn(4, 16)
    want, _ = add_layer_norm(x, eps=1e-3)
    for eps in (np.float32(1e-3), torch.tensor(1e-3)):
        torch.testing.assert_close(add_layer_norm(x, eps=eps)[0], want)
    x, w = torch.randn(2, 4, 11), torch.randn(6, 2, 3)
    torch.testing.assert_close(ops.conv1d(x, w, stride=np.int64(2), padding=np.int64(1), groups=np.int64(2)),
                               F.conv1d(x, w, stride=2, padding=1, groups=2))
    with pytest.raises(ValueError, match="stride must be an int"):
        ops.conv1d(x, w, stride=2.0, groups=2)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ops.scaled_dot_product_attention(q, q, q, scale="0.5")


@pytest.mark.parametrize("module", ["LayerNorm", "GELU", "Conv1d", "Linear", "GRU"])
def test_forward_mode_ad_and_double_backward_say_they_are_unsupported(module):
    """No op has a forward-mode derivative or a second derivative. torch.func.jvp had returned zero
    tangents and forward_ad none, silently; a double backward had torch's "no autograd formula"."""
    import torch.autograd.forward_ad as fwAD
    make = {"LayerNorm": lambda: bignlp_fast.nn.LayerNorm(64, backend="cpu"), "GELU": lambda: bignlp_fast.nn.GELU(),
            "Conv1d": lambda: bignlp_fast.nn.Conv1d(8, 4, 3), "GRU": lambda: bignlp_fast.nn.GRU(64, 8),
            "Linear": lambda: bignlp_fast.nn.Linear(64, 8, backend="cpu")}
    m = make[module]()
    x, t = torch.randn(8, 64), torch.randn(8, 64)
    first = lambda y: y[0] if isinstance(y, tuple) else y  # noqa: E731
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jvp(lambda x: first(m(x)), (x,), (t,))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        m(fwAD.make_dual(x, t))
    with fwAD.dual_level(), torch.no_grad():
        torch.testing.assert_close(first(m(x)), first(m(x)))  # tensors without a tangent: as always
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(first(m(xr)).square().sum(), xr, create_graph=True)  # keeping the graph works
    (plain,) = torch.autograd.grad(first(m(xr)).square().sum(), xr)
    torch.testing.assert_close(g.detach(), plain)
    with pytest.raises(RuntimeError, match="has no second derivative"):
        g.square().sum().backward()


def test_triton_kernels_launch_on_their_tensors_device(monkeypatch):
    """Triton launches on torch's current CUDA device: the triton backend makes the first CUDA
    argument's device current for the call (checked here with stand-ins for the tensors and for
    torch.cuda's device switch; the GPU tests run it for real)."""
    from types import SimpleNamespace

    from bignlp_fast.ops._common import on_tensors_device
    switched = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            switched.append(self.device)

        def __exit__(self, *exc):
            switched.append("back")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    run = on_tensors_device(lambda *args: list(switched))
    on = lambda d: SimpleNamespace(device=torch.device(d))  # noqa: E731
    assert run(on("cpu"), on("cuda:0"), 3) == [] and switched == []  # already current: no switch
    assert run(None, on("cuda:1"), on("cuda:0")) == [torch.device("cuda:1")] and switched[-1] == "back"
    run(on("cpu"))  # CPU tensors (the Triton interpreter): no switch
    assert len(switched) == 2
