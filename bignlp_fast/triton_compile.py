"""Compile every Triton kernel for a GPU architecture on a machine without a GPU, and check what the
compiled code needs against what the GPU has.

Under ``TRITON_INTERPRET=1`` the tests run the Triton kernels' logic on the CPU, but the interpreter
never lowers them: a kernel that fails to compile for a real GPU, needs more shared memory than an
SM has, more registers than a block may hold, or spills registers at the tile sizes the launchers
pick for CUDA tensors, passes every CPU test. This module closes that gap without a GPU:

- the launchers in ``bignlp_fast.kernels`` are called with *fake* CUDA tensors
  (``torch._subclasses.FakeTensorMode``: shapes, dtypes and strides, no memory), so they pick the
  tile sizes, warps and stages they would pick on a GPU;
- Triton's driver is replaced by one that only names a target (``GPUTarget("cuda", arch, 32)``),
  and every launch becomes a compile (``JITFunction.run(..., warmup=True)``): Triton lowers the
  kernel through its whole pipeline, ptxas included, to a cubin for that architecture;
- ``cuobjdump --dump-resource-usage`` (shipped with Triton) reads each cubin's registers per
  thread, spilled bytes (local memory) and static shared memory.

``check(arch)`` returns one :class:`Compiled` row per distinct compiled kernel; ``Compiled.problems``
lists what would stop it from launching on that architecture (shared memory over the block limit,
registers x threads over the SM's register file), ``Compiled.spill_bytes`` what would slow it.
``bignlp-fast triton-compile`` prints the table; tests/test_triton_compile.py asserts it.

What this does not check: that the kernels compute the right thing (the interpreter tests do that)
or how fast they run (that needs a GPU: ``.ci/gpu-check``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from typing import Callable, Iterator, Optional

import torch

# Per architecture: the most shared memory one block may use (bytes, opt-in limit) and the SM count
# the launchers size their grids by (they read it from the device; here there is none).
ARCHS = {
    80: dict(name="A100 (sm_80)", max_shared=166912, sms=108),
    86: dict(name="RTX 30xx / A10 (sm_86)", max_shared=101376, sms=84),
    89: dict(name="L4 / RTX 40xx (sm_89)", max_shared=101376, sms=58),
    90: dict(name="H100 / H200 (sm_90)", max_shared=232448, sms=132),
}
REGISTERS_PER_SM = 65536  # 32-bit registers in one SM's file: every thread of a block must fit in it
MAX_REGISTERS_PER_THREAD = 255
MAX_GRID = (2 ** 31 - 1, 65535, 65535)  # programs per grid dimension


@dataclasses.dataclass
class Compiled:
    """One kernel compiled for one architecture at one specialisation."""
    case: str  # the launcher call that compiled it, e.g. "attention fwd bfloat16 D128 causal"
    kernel: str  # the @triton.jit function's name
    arch: int
    num_warps: int
    num_stages: int
    registers: int  # per thread
    spill_bytes: int  # local memory per thread: registers spilled to memory
    shared_bytes: int  # dynamic (Triton's buffers) + static shared memory per block
    grid: tuple = (1, 1, 1)  # the largest launch grid of this kernel in the case, per dimension

    @property
    def problems(self) -> list[str]:
        """Why this kernel would fail to launch on ``arch``; empty when it fits."""
        out = []
        limit = ARCHS[self.arch]["max_shared"]
        if self.shared_bytes > limit:
            out.append(f"needs {self.shared_bytes} B of shared memory per block, sm_{self.arch} has {limit}")
        threads = 32 * self.num_warps
        allocated = -(-self.registers // 8) * 8  # registers are allocated to a warp in groups of 8 per thread
        if self.registers > MAX_REGISTERS_PER_THREAD or allocated * threads > REGISTERS_PER_SM:
            out.append(f"{self.registers} registers x {threads} threads exceed the {REGISTERS_PER_SM}-register file")
        for dim, (n, most) in enumerate(zip(self.grid, MAX_GRID)):
            if n > most:
                out.append(f"grid dimension {dim} has {n} programs, CUDA allows {most}")
        return out


def _cuobjdump() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise RuntimeError(f"triton_compile: {path} not found (this Triton has no NVIDIA backend tools)")
    return path


def _resources(cubin: bytes) -> dict:
    """REG / LOCAL / SHARED of the one function in a cubin, from cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", text)}
    if "REG" not in found:
        raise RuntimeError(f"triton_compile: no resource usage in cuobjdump's output:\n{text}")
    return found


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[list]:
    """Within this context, fake CUDA tensors can be made (``torch.empty(..., device="cuda")``) and
    every Triton launch compiles its kernel for sm_``arch`` instead of running it. Yields the list
    the compiled kernels are appended to, as (triton.jit function name, CompiledKernel, grid)."""
    if arch not in ARCHS:
        raise ValueError(f"triton_compile: arch must be one of {sorted(ARCHS)}, got {arch}")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction, MockTensor

    import bignlp_fast.kernels as kernels
    import bignlp_fast.kernels._common as common
    # every launcher module, so that their imports of common's functions are among the names patched below
    for info in pkgutil.iter_modules(kernels.__path__):
        importlib.import_module(f"bignlp_fast.kernels.{info.name}")
    if not isinstance(sys.modules["bignlp_fast.kernels.attention"]._attn_fwd_kernel, JITFunction):
        raise RuntimeError("triton_compile: this process imported the kernels under TRITON_INTERPRET=1, which "
                           "compiles nothing; compile in a process without it (check() with workers > 1, or "
                           "bignlp-fast triton-compile)")

    class TargetOnly(CudaDriver):
        """A driver that names a target and a device and has no GPU behind it."""

        def __init__(self):  # no CUDA utilities to load
            pass

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    compiled: list = []
    run = JITFunction.run

    def mock(a):  # what the launch binder reads of a tensor: its dtype, and a 16-byte aligned address
        return MockTensor(a.dtype, list(a.shape)) if isinstance(a, torch.Tensor) else a

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *map(mock, args), grid=grid, warmup=True, **{k: mock(v) for k, v in kwargs.items()})
        compiled.append((self.fn.__name__, kernel, tuple(grid) + (1,) * (3 - len(grid))))
        return kernel

    # What the launchers would ask the GPU, answered for this architecture: common's functions and the
    # names the launcher modules imported them under.
    answers = {"sm_count": ARCHS[arch]["sms"], "shared_memory_per_block": ARCHS[arch]["max_shared"]}
    patches = []  # (module, attribute, original)
    for fn_name, value in answers.items():
        original = getattr(common, fn_name)
        fake = functools.lru_cache(maxsize=None)(lambda device, value=value: value)
        for module in [m for name, m in list(sys.modules.items()) if name.startswith("bignlp_fast.kernels")]:
            for attr, obj in list(vars(module).items()):
                if obj is original:
                    patches.append((module, attr, original))
                    setattr(module, attr, fake)
    previous_driver = driver._active
    driver.set_active(TargetOnly())
    JITFunction.run = compile_instead
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield compiled
    finally:
        JITFunction.run = run
        driver._active = previous_driver
        for module, attr, original in patches:
            setattr(module, attr, original)


# ---- the launcher calls: every kernel, at the GPU shapes and the flags that change its code ----------
# Each case is (name, function(dtype)) calling one op's launchers with fake CUDA tensors of that dtype.
# Sizes matter only where the launchers derive tile sizes from them (head dim, hidden size, length).
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="cuda", dtype=dtype)


def _add_layer_norm(hidden: int, affine: bool):
    def call(dt):
        from bignlp_fast.kernels.add_layer_norm import add_layer_norm_bwd_triton, add_layer_norm_fwd_triton
        x, w = _cuda(4096, hidden, dtype=dt), (_cuda(hidden, dtype=dt) if affine else None)
        out, res, mean, rstd = add_layer_norm_fwd_triton(x, x if affine else None, w, w, 1e-5)
        add_layer_norm_bwd_triton(out, out if affine else None, res if affine else x, mean, rstd, w, affine)
    return call


def _attention(d: int, causal: bool = False, bias: bool = False, dropout: bool = False, varlen: bool = False,
               batch: int = 2, heads: int = 8, length: int = 1024):
    def call(dt):
        from bignlp_fast.kernels.attention import attention_bwd_triton, attention_fwd_triton
        B, H, L = (1 if varlen else batch), heads, length
        q, k, v = (_cuda(B, H, L, d, dtype=dt) for _ in range(3))
        mask = _cuda(B, 1, L, L, dtype=dt) if bias else None
        cu = torch.zeros(3, device="cuda", dtype=torch.int32) if varlen else None
        args = (mask, cu, cu, L if varlen else None, L if varlen else None, d ** -0.5, causal,
                0.1 if dropout else 0.0, 1234)
        out, lse = attention_fwd_triton(q, k, v, *args)
        attention_bwd_triton(out, q, k, v, out, lse, *args)
    return call


def _bias_gelu(tanh: bool):
    def call(dt):
        from bignlp_fast.kernels.bias_gelu import bias_gelu_bwd_triton, bias_gelu_fwd_triton
        x, b = _cuda(4096, 3072, dtype=dt), _cuda(3072, dtype=dt)
        bias_gelu_bwd_triton(bias_gelu_fwd_triton(x, b, tanh), x, b, tanh)
    return call


def _causal_conv1d(width: int, activation: int, length: int = 2048):
    def call(dt):
        from bignlp_fast.kernels.causal_conv1d import causal_conv1d_bwd_triton, causal_conv1d_fwd_triton
        x, w, b, s = _cuda(4, 256, length, dtype=dt), _cuda(256, width, dtype=dt), _cuda(256, dtype=dt), \
            _cuda(4, 256, width - 1, dtype=dt)
        y = causal_conv1d_fwd_triton(x, w, b, s, activation)
        causal_conv1d_bwd_triton(y, x, w, b, s, activation)
    return call


def _conv(activation: int, length: int = 128):
    def call(dt):
        from bignlp_fast.kernels.conv import conv_bwd_triton, conv_fwd_triton
        x, w, b = _cuda(8, 64, length, dtype=dt), _cuda(128, 64, 3, dtype=dt), _cuda(128, dtype=dt)
        args = ((1,), (1,), (1,), 1, activation)
        out, pre = conv_fwd_triton(x, w, b, None, *args[:4], activation, True)
        conv_fwd_triton(x, w, b, out, *args[:4], activation, False)  # the residual variant
        conv_bwd_triton(out, x, w, pre, b, *args)
    return call


def _rnn(mode: str, hidden: int, proj: bool = False, lengths: bool = False):
    def call(dt):
        from bignlp_fast.kernels.rnn import rnn_bwd_triton, rnn_fwd_triton
        from bignlp_fast.ops.rnn import GATES
        T, B, S = 64, 32, (hidden // 2 if proj else hidden)
        xw, w_hh, b_hh = _cuda(T, B, GATES[mode] * hidden, dtype=dt), _cuda(GATES[mode] * hidden, S, dtype=dt), \
            _cuda(GATES[mode] * hidden, dtype=dt)
        h0 = _cuda(B, S, dtype=dt)
        c0 = _cuda(B, hidden, dtype=dt) if mode == "lstm" else None
        w_hr = _cuda(S, hidden, dtype=dt) if proj else None
        lens = torch.full((B,), T, dtype=torch.int64) if lengths else None
        out, h_n, c_n, ws = rnn_fwd_triton(xw, w_hh, b_hh, h0, c0, w_hr, lens, mode, False, True)
        rnn_bwd_triton(out, h_n, c_n if c0 is not None else None, xw, w_hh, b_hh, h0, c0, w_hr, lens, ws, mode, True)
    return call


def _text_cnn_pool(activation: int, lengths: bool):
    def call(dt):
        from bignlp_fast.kernels.text_cnn_pool import text_cnn_pool_bwd_triton, text_cnn_pool_fwd_triton
        x = _cuda(32, 128, 300, dtype=dt)
        ws = [_cuda(100, 300, k, dtype=dt) for k in (3, 4, 5)]
        bs = [_cuda(100, dtype=dt) for _ in ws]
        lens = torch.full((32,), 128, device="cuda", dtype=torch.int64) if lengths else None
        out, argmax, pre = text_cnn_pool_fwd_triton(x, ws, bs, lens, activation)
        text_cnn_pool_bwd_triton(out, x, ws, bs, argmax, pre, activation)
    return call


def cases() -> list[tuple[str, Callable]]:
    """(name, call(dtype)) for every op: the shapes and flags that select each kernel variant."""
    out = []
    for h in (768, 4096, 16384):  # the last is MAX_H: 16 fp32 values of a row per thread, 32 warps
        out.append((f"add_layer_norm H{h}", _add_layer_norm(h, True)))
    out.append(("add_layer_norm H768 no residual/affine", _add_layer_norm(768, False)))
    for d in (64, 128, 256):  # the launch-config buckets of kernels/attention.py
        out.append((f"attention D{d}", _attention(d)))
        out.append((f"attention D{d} causal", _attention(d, causal=True)))
        out.append((f"attention D{d} mask+dropout", _attention(d, bias=True, dropout=True)))
        out.append((f"attention D{d} varlen+causal+dropout", _attention(d, causal=True, dropout=True, varlen=True)))
    out.append(("attention D80 causal", _attention(80, causal=True)))  # padded to 128
    # sizes whose grids pass 65535 programs in a dimension other than the first (fake tensors: no memory)
    out.append(("attention D64 70400 sequence-heads", _attention(64, causal=True, batch=4400, heads=16, length=128)))
    for tanh in (False, True):
        out.append((f"bias_gelu {'tanh' if tanh else 'erf'}", _bias_gelu(tanh)))
    for w in (2, 3, 4):
        out.append((f"causal_conv1d W{w} silu", _causal_conv1d(w, 3)))
    out.append(("causal_conv1d W4 identity L64", _causal_conv1d(4, 0, 64)))
    out.append(("causal_conv1d W4 silu L2^27", _causal_conv1d(4, 3, 2 ** 27)))
    for act in (1, 2):
        out.append((f"conv epilogue act{act}", _conv(act)))
    out.append(("conv epilogue act1 S2^27", _conv(1, 2 ** 27)))
    for mode in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        out.append((f"rnn {mode} H512", _rnn(mode, 512)))
    out.append(("rnn lstm H128 lengths", _rnn("lstm", 128, lengths=True)))
    out.append(("rnn lstm H512 proj", _rnn("lstm", 512, proj=True)))
    for act, lens in ((1, True), (4, False)):
        out.append((f"text_cnn_pool act{act}{' lengths' if lens else ''}", _text_cnn_pool(act, lens)))
    return out


def _compile_case(arch: int, name: str, dtype: torch.dtype) -> list[Compiled]:
    """Compiles one case's kernels for sm_``arch`` in one dtype; one row per distinct kernel."""
    case = f"{name} {str(dtype).replace('torch.', '')}"
    with compile_only(arch) as compiled:
        dict(cases())[name](dtype)
    rows = {}  # id(kernel): its row; the same specialisation launched twice keeps its largest grid
    for fn_name, kernel, grid in compiled:
        if id(kernel) in rows:
            row = rows[id(kernel)]
            row.grid = tuple(map(max, row.grid, grid))
            continue
        res = _resources(kernel.asm["cubin"])
        rows[id(kernel)] = Compiled(case=case, kernel=fn_name, arch=arch, num_warps=kernel.metadata.num_warps,
                                    num_stages=kernel.metadata.num_stages, registers=res["REG"],
                                    spill_bytes=res.get("LOCAL", 0),
                                    shared_bytes=kernel.metadata.shared + res.get("SHARED", 0), grid=grid)
    return list(rows.values())


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are imported: compile, do not interpret


def check(arch: int = 90, dtypes=_DTYPES, name_filter: Optional[str] = None,
          workers: Optional[int] = None) -> list[Compiled]:
    """Compiles every case's kernels (those whose "name dtype" contains ``name_filter``) for sm_``arch``
    in each dtype, on ``workers`` processes (default: one per CPU; 1: in this process). Triton caches
    what it compiled (~/.triton/cache), so a second run takes seconds."""
    jobs = [(name, dt) for name, _ in cases() for dt in dtypes
            if not name_filter or name_filter in f"{name} {str(dt).replace('torch.', '')}"]
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers <= 1:
        return [row for name, dt in jobs for row in _compile_case(arch, name, dt)]
    import concurrent.futures
    import multiprocessing
    # spawn: a fresh interpreter per worker, nothing of this process's Triton or fake-tensor state (the
    # kernels may have been imported here under TRITON_INTERPRET=1, as in the tests)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_worker_init) as pool:
        results = pool.map(_compile_case, [arch] * len(jobs), *zip(*jobs))
        return [row for rows in results for row in rows]


def format_table(rows: list[Compiled]) -> str:
    head = ["case", "kernel", "arch", "warps", "stages", "regs", "spill B", "shared B", "problems"]
    body = [[r.case, r.kernel, f"sm_{r.arch}", str(r.num_warps), str(r.num_stages), str(r.registers),
             str(r.spill_bytes), str(r.shared_bytes), "; ".join(r.problems) or "-"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])
