"""Shared test setup. Without a CUDA GPU, Triton kernels run through the interpreter on CPU tensors:
TRITON_INTERPRET must be set before triton is first imported, so it is set here."""

import atexit
import contextlib
import hashlib
import os
import pathlib
import platform
import shutil
import tempfile


def _inductor_cache_for_these_sources() -> str:
    """An inductor cache directory of its own for this version of the Python sources. Inductor's
    on-disk graph cache does not key on a custom op's fake function, so after a fake changes a run
    would load code compiled for the old one (it checks outputs against the old strides: a fixed
    fake kept failing until the cache was cleared)."""
    root = pathlib.Path(__file__).resolve().parent.parent
    digest = hashlib.sha1()
    for path in sorted([*root.glob("bignlp_fast/**/*.py"), *root.glob("kernels/*.py")]):
        digest.update(path.read_bytes())
    return os.path.join(tempfile.gettempdir(), f"torchinductor_bignlp_fast_{digest.hexdigest()[:12]}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_for_these_sources())  # before torch reads it

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpreter_rounds_bf16_to_nearest():
    """The Triton interpreter (triton 3.x) casts fp32 -> bf16 by truncation, while the GPU's
    cvt.rn.bf16.f32 rounds to nearest even: bf16 outputs would be off by one ulp where the compiled
    kernel is off by half. Make the interpreter round as the GPU does, so the tests judge the
    kernels and not the interpreter."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    cast = getattr(builder, "cast_impl", None)
    if cast is None:
        return

    def cast_rounding_to_nearest(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(src.data.copy()).to(torch.bfloat16).view(torch.int16).numpy().view("uint16")
            return interpreter.TensorHandle(bits, tl.bfloat16)
        return cast(self, src, dst_type)

    builder.cast_impl = cast_rounding_to_nearest


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_rounds_bf16_to_nearest()

import bignlp_fast  # noqa: E402
from bignlp_fast import _backend  # noqa: E402

# The working directory of the tests' Python subprocesses: an empty folder of their own. Started in
# the clone's root, Python puts the root first on its path, and the root's kernels/ folder (our Triton
# kernels, installed as bignlp_fast.kernels) then shadows the Hugging Face `kernels` package that
# transformers (5.25 on) imports: "cannot import name 'CUDAProperties' from 'kernels'". Nor the
# system's temporary folder: any stray nt.py or pathlib.py there shadows the standard library's
# (a /tmp/nt.py broke `import pathlib` in the AddressSanitizer builds' subprocesses).
SUBPROCESS_CWD = tempfile.mkdtemp(prefix="bignlp_fast_tests_")
atexit.register(shutil.rmtree, SUBPROCESS_CWD, True)

HAS_CUDA = torch.cuda.is_available()


def backend_params(*names):
    """pytest params (backend, device) for each backend, skipped with the reason it cannot run here."""
    params = []
    for name in names:
        device = torch.device("cuda" if name == "cuda" or (name == "triton" and HAS_CUDA) else "cpu")
        reason = _backend.unavailable(name, device)
        if name == "cuda" and not HAS_CUDA:
            reason = "no CUDA GPU on this machine"
        marks = [pytest.mark.skip(reason=f"{name} backend: {reason}")] if reason else []
        if name == "triton":
            marks.append(pytest.mark.triton)
        if name == "cuda":
            marks.append(pytest.mark.cuda)
        params.append(pytest.param(name, device, id=name, marks=marks))
        if name == "cuda" and not HAS_CUDA:
            params.append(emulated_cuda_param())
    return params


def emulated_cuda_marks() -> list:
    """The marks of a test case that runs the cuda backend on the emulation (tests/cuda_emu), activated
    for the test by :func:`_cuda_emulation`: skipped, with the reason, off x86-64."""
    marks = [pytest.mark.cuda_emulated]
    if platform.machine() not in ("x86_64", "AMD64"):  # its fiber switch is x86-64 assembly
        marks.append(pytest.mark.skip(reason=f"the CUDA emulation runs on x86-64, this is {platform.machine()}"))
    return marks


def emulated_cuda_param():
    """(backend "cuda", device cpu): csrc/cuda's kernels on CPU tensors through the emulation, where no
    GPU is present. The emulation compiles csrc/cuda with the host compiler, so it runs whether or not
    the extension was built with its CUDA sources."""
    marks = emulated_cuda_marks()
    return pytest.param("cuda", torch.device("cpu"), id="cuda-emulated", marks=marks)


def tile_paths(backend, dtype):
    """(name, context) for each tile path of a backend's kernels in ``dtype``. The CPU's bf16 kernels
    multiply on AMX where the CPU has it (csrc/cpu/amx.h), else on AVX512_BF16 dot products where the
    build targets them (gemm.h's small_gemm_bf16), else on fp32 FMA tiles; a machine runs a check once
    per path it has, the fp32 one always."""
    if backend != "cpu" or dtype != torch.bfloat16:
        return [("", contextlib.nullcontext)]

    def path(amx, dot):
        @contextlib.contextmanager
        def context():
            with _backend.use_amx_bf16(amx), _backend.use_bf16_dot(dot):
                yield
        return context

    paths = []
    if _backend.compiled() is not None and _backend.compiled().amx_bf16_available():
        paths.append(("amx", path(True, True)))
    if _backend.compiled() is not None and _backend.compiled().bf16_dot_available():
        paths.append(("avx512_bf16", path(False, True)))
    return paths + [("fp32", path(False, False))]


@pytest.fixture(autouse=True)
def _cuda_emulation(request, monkeypatch):
    """Runs the test's cuda backend on the emulated kernels when it is the ``cuda-emulated`` case."""
    if request.node.get_closest_marker("cuda_emulated") is None:
        yield
        return
    import cuda_emu

    # at::empty fills its memory with NaN in deterministic mode: an output element a kernel forgets to
    # write shows up (on a GPU it would hold whatever the allocator's block held before)
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with cuda_emu.active(monkeypatch, **cuda_emu.options_from_environment()):
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture(autouse=True)
def _clean_backend_state(monkeypatch):
    """Each test starts with no forced backend, no strict mode and an empty fallback record."""
    monkeypatch.delenv("BIGNLP_FAST_BACKEND", raising=False)
    monkeypatch.delenv("BIGNLP_FAST_STRICT", raising=False)
    bignlp_fast.reset_report()
    yield


# ---- Hugging Face attention tests (test_hf.py, test_optimize.py) ---------------------------------------
@pytest.fixture
def calls(monkeypatch):
    """Counts the HF hook's calls of our ops, so a test knows the model did not quietly run another path:
    "n" all of them, "dense" scaled_dot_product_attention's, "varlen" varlen_attention's (padding-free
    and unpadded batches)."""
    import bignlp_fast.hf

    counter = {"n": 0, "dense": 0, "varlen": 0}

    def counted(kind, op):
        def counting(*args, **kwargs):
            counter["n"] += 1
            counter[kind] += 1
            return op(*args, **kwargs)
        return counting

    monkeypatch.setattr(bignlp_fast.hf, "scaled_dot_product_attention",
                        counted("dense", bignlp_fast.hf.scaled_dot_product_attention))
    monkeypatch.setattr(bignlp_fast.hf, "varlen_attention", counted("varlen", bignlp_fast.hf.varlen_attention))
    return counter


def padded_batch(lengths, total, left, low=1):
    """Token ids in [low, 101) and a mask [len(lengths), total], padded on the left or the right
    (padding ids are 0)."""
    torch.manual_seed(1)
    ids = torch.randint(low, 101, (len(lengths), total))
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        if left:
            mask[row, total - n:] = 1
        else:
            mask[row, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask
