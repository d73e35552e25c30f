"""linear: ``y = x @ weight^T + bias``, torch.nn.functional.linear's signature, on the project's own
packed GEMM on the CPU (csrc/cpu/linear.cpp).

Why a GEMM of our own: on AMD CPUs the MKL sgemm that torch calls does not take its AVX-512 path;
the register-blocked kernel of csrc/cpu/gemm.h runs about twice as fast there. The RNN layers use
it for their input projection (one GEMM over every time step). On other CPUs, measure before
preferring it: the benchmark compares it with F.linear on the same inputs.

Decoding-sized inputs (at most 16 rows of x; 64 for a [N, K] weight where the CPU kernels are an AVX2
build) run on streaming kernels (csrc/cpu/skinny_gemm.h) that read the weight once at memory speed,
where BLAS falls to a fraction of the bandwidth for 2-16 rows, and pack nothing.

For inference, :func:`prepack` marks weights (a model's, or single tensors) to be packed once into
the packed GEMM's layout and kept beside them: the packing, a transpose of the whole weight at every
call otherwise, was 15-40% of a 65-256-row product. The packed copy is made at the weight's first
product outside autograd (torch.no_grad, inference_mode, or a frozen weight) and made again when the
weight changes (in place, or replaced).

Contract (every backend): x [M, K], weight [N, K], bias [N] or None, contiguous, except that the
forward also takes a weight that is the transpose of a contiguous [K, N] tensor (transformers'
Conv1D layout, ``conv1d_weight.t()``) and reads it in place; packed: None, or on the cpu backend the
weight as the extension's linear_pack_cpu packed it (the other backends ignore it); forward returns
y [M, N]; backward returns (grad_x [M, K], grad_weight [N, K], grad_bias [N] or [0]).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from bignlp_fast import _backend
from bignlp_fast.ops._common import (acc_dtype, as_rows, autocast_lower, call, check_like, check_tensor, contiguous,
                                     custom_op, fresh_like, kernel, register_autograd, rows_back)

OP = _backend.register_op(
    "linear",
    dtypes={"cpu": (torch.float32, torch.bfloat16)},
    missing={"cuda": "no CUDA kernel for linear (cuBLAS through torch is the one to use)",
             "triton": "no Triton kernel for linear"},
)


# ---- reference backend ------------------------------------------------------------------------
def linear_fwd_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor], packed: Optional[Tensor] = None) -> Tensor:
    acc = acc_dtype(x.dtype)
    return F.linear(x.to(acc), weight.to(acc), bias.to(acc) if bias is not None else None).to(x.dtype)


def linear_bwd_torch(grad_y: Tensor, x: Tensor, weight: Tensor, has_bias: bool):
    acc = acc_dtype(x.dtype)
    g = grad_y.to(acc)
    grad_bias = g.sum(0).to(weight.dtype) if has_bias else x.new_empty(0)
    return (g @ weight.to(acc)).to(x.dtype), (g.t() @ x.to(acc)).to(weight.dtype), grad_bias


# ---- custom ops -------------------------------------------------------------------------------
@custom_op("linear_fwd")
def linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str,
               packed: Optional[Tensor] = None) -> Tensor:
    w = weight if weight.t().is_contiguous() else weight.contiguous()  # a transposed [K, N] is read in place
    return kernel("linear", "fwd", backend)(x.contiguous(), w, contiguous(bias), packed)


@linear_fwd.register_fake
def _(x, weight, bias, backend, packed=None):
    return x.new_empty(x.shape[0], weight.shape[0])


@custom_op("linear_bwd")
def linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, has_bias: bool,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(kernel("linear", "bwd", backend)(grad_y.contiguous(), x.contiguous(), weight.contiguous(), has_bias))


@linear_bwd.register_fake
def _(grad_y, x, weight, has_bias, backend):
    return fresh_like(x), fresh_like(weight), weight.new_empty(weight.shape[0] if has_bias else 0)


def _setup_context(ctx, inputs, output):
    x, weight, bias, backend, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.backend = bias is not None, backend


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = call(linear_bwd, grad_y, x, weight, ctx.has_bias, ctx.backend)
    return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None


register_autograd(linear_fwd, _backward, _setup_context)


# ---- which GEMM to call -------------------------------------------------------------------------
SKINNY_ROWS = 16  # csrc/cpu/skinny_gemm.h's kSkinnyRows: the most rows the streaming kernels take
# Where the streaming kernels beat F.linear (2-core Zen 5, weights in cache and streamed from memory):
# float32 up to 16 rows (1.3-2.7x from 1 MiB of weight), bfloat16 up to 2 (1.2-2.1x at GPT-2's
# shapes; from 4 rows on torch's bf16 GEMM was the faster, 0.6-0.9x).
SKINNY_ROWS_BF16 = 2
# The fixed cost of a call (argument checks and the call's route: about 15 us forward, ~70 us
# forward + backward with the autograd.Function route of ops/_common.py, ~90 us before it) outweighs
# the faster GEMM on small products: F.linear was the faster at 64x128->128 and 16x256->256 (0.7x
# forward, 0.9x forward + backward) and at a 1-row float32 product with a weight of 1 MiB or less in
# cache (0.4-0.9x); even at ~2M multiply-adds (32x256->256: 0.8x / 1.0x); ops.linear from ~4M on
# (64x256->256 1.0x / 1.2x, 16x512->512 1.3x / 1.3x, 128x256->256 1.3x / 1.4x, 128x768->768 1.9x).
MIN_MACS = 1 << 22  # rows * K * N below this: F.linear
# float32 where the CPU kernels are an AVX2 build: ops.linear's fp32 products run there only on Zen 1 /
# Zen 2 (elsewhere MKL's AVX2 sgemm is the faster: _backend.blas_sgemm_is_fast), and on a 2-core Zen 2
# the packed GEMM, which packs the whole weight every call, beat F.linear only from 160 rows and a
# 1 MiB weight: 1.03-1.19x forward, 1.01-1.18x forward + backward at 256-1024 rows of [512, 512],
# [768, 768] and [2048, 512]; at 160-224 rows 1.01-1.28x / 1.02-1.07x (with the whole number of tasks
# per thread of gemm.h); at 128 rows 0.91-1.11x / 0.92-1.00x; with a [256, 256] weight 0.64-1.06x /
# 0.82-0.97x up to 1024 rows (benchmarks/linear_rule_sweep.py). Up to _backend.linear_streaming_rows()
# rows (64 there) the streaming kernels take the product instead (no packing): see linear_is_faster_for.
MIN_ROWS_AVX2 = 160
MIN_WEIGHT_BYTES_AVX2 = 1 << 20
# ... and a weight packed once already (prepack), from _backend.linear_streaming_rows(prepacked=True)
# rows on (33 there) and 512 KiB of weight: on the Zen 2, no_grad forward, in-process medians, the
# prepacked GEMM ran 1.2-1.9x F.linear at 48-384 rows of [768, 768], [768, 3072] and [3072, 768]
# (where packing per call ran 0.86-1.28x), 1.0-1.8x with MiniLM's [384, 384], [384, 1536], [1536, 384]
# (0.98x once, 512 x 1536 -> 384); with a [256, 256] weight 0.77-1.09x: F.linear.
MIN_WEIGHT_BYTES_PREPACKED_AVX2 = 1 << 19
# ... but only up to 32 rows where autograd will want the backward (packed GEMMs: dx = dy W, dW = dy^T
# x; forward + backward 0.98-1.19x F.linear at 17-32 rows of the weights above, 0.91-1.02x at 64), or
# for a weight stored [K, N] (GPT-2's Conv1D: past 16 rows its products run on the packed GEMM, which
# reads such a weight in place up to 48 rows and packs it beyond; forward 1.3-1.9x at 17 rows,
# 0.92-1.23x at 32, 0.72-0.98x at 64, [768, 768] to [768, 3072]).
SHORT_ROWS_AVX2 = 32
# bfloat16 where torch's bf16 GEMM is at::native's generic loop (_backend.blas_bf16_gemm_is_fast: a
# CPU without AVX-512), on a 2-core Zen 2: F.linear 1.25x / 1.5x slower than ops.linear (forward /
# forward + backward) at 16x128->128 (262k multiply-adds), 2.9x / 3.6x at 64x128->128, 2.8x / 8.6x at
# 64x256->256, 9x / 46x at 1024x768->3072; faster only below (4x64->64: 0.5x / 0.6x).
MIN_MACS_BF16_GENERIC = 1 << 18
MIN_SKINNY_WEIGHT_BYTES = 1 << 20  # a decoding-sized input's weight below this: F.linear
# float32 on an Intel CPU with an AVX-512 build (_backend.blas_sgemm_is_fast there: MKL on its AVX-512
# kernels), whose matrix-vector product beats the streaming kernels at one row: a 2-core Xeon with
# AMX, in-process medians (benchmarks/linear_rule_sweep.py), ops.linear 0.85-0.90x F.linear at 1 row of
# [768, 2304], [768, 3072], [3072, 768] and 0.73-0.88x at [768, 768], either layout; 0.94x at GPT-2's
# lm_head (768 -> 50257, from memory). At 2 rows a [N, K] weight still lost (0.56-0.89x; 0.75x at the
# lm_head), a [K, N] one won (1.27-1.46x), and from 4 rows the streaming kernels won (1.3-1.8x) but at
# [768, 768]. So there F.linear takes up to MKL_GEMV_ROWS rows, and 2 rows of a [N, K] weight.
MKL_GEMV_ROWS = 1
# ... and a weight packed once (prepack) there, past the streaming rows: ops.linear's kernel that reads
# x in place (csrc/cpu/gemm.h's prepacked_rows_gemm, up to _backend.linear_prepacked_direct_rows() rows)
# against F.linear, no_grad, in-process medians of 15 (session 42): 1.02-1.57x at 17-48 rows of weights
# from 1 MiB ([512, 512], [768, 768], [384, 1536] and back, [512, 2048], [768, 2304], [768, 3072] and
# back; mostly 1.1-1.5x); at 64 rows 0.91-1.24x, at 128-256 rows 0.83-1.05x. The kernel alone ran
# 1.2-1.3x MKL at 128 rows: what the call's Python costs after a kernel that swept the caches (~60 us
# there, against a few us in a warm loop) takes the rest. So up to PREPACKED_ROWS rows, from
# MIN_SKINNY_WEIGHT_BYTES of weight.
PREPACKED_ROWS = 48


def linear_is_faster(x: Tensor, weight: Tensor, prepacked: Optional[bool] = None) -> bool:
    """Whether ``linear`` beats F.linear for ``x [..., K] @ weight[N, K]^T`` on this machine (the models
    and nn.Linear ask this before each GEMM):

    - decoding-sized inputs on the CPU (at most SKINNY_ROWS rows in float32, SKINNY_ROWS_BF16 in
      bfloat16) with at least MIN_SKINNY_WEIGHT_BYTES of weight: the streaming kernels read the
      weight once at memory speed, where BLAS falls to a fraction of the bandwidth;
    - float32 on the CPU from MIN_MACS multiply-adds on, unless torch's sgemm is the faster one
      (_backend.blas_sgemm_is_fast: MKL on Intel CPUs, where it takes its AVX-512 path, and on any CPU
      where the CPU kernels were built without AVX-512, but Zen 1 / Zen 2). On an AMD EPYC (Zen 5,
      AVX-512) the packed GEMM ran 1.5-2.1x F.linear at BERT's shapes ([624, 768] x [768, 3072] and the
      like), forward and backward; on a Zen 3 (AVX2) MKL's AVX2 kernels ran 1.00-1.12x the packed GEMM.
      On Zen 1 / Zen 2 (an AVX2 build) the packed GEMM wins only from MIN_ROWS_AVX2 rows and a weight of
      MIN_WEIGHT_BYTES_AVX2; up to linear_streaming_rows() rows a weight of MIN_SKINNY_WEIGHT_BYTES
      takes the streaming kernels (1.05-1.9x F.linear at 17-64 rows on a Zen 2, forward; up to
      SHORT_ROWS_AVX2 rows where autograd records the product or the weight is stored [K, N]). A weight
      packed once (:func:`prepack`) moves those bounds: the streaming kernels up to
      linear_streaming_rows(prepacked=True) rows, the packed GEMM beyond from
      MIN_WEIGHT_BYTES_PREPACKED_AVX2 of weight. Where torch's sgemm is the faster one, a weight packed
      once still takes ops.linear from the streaming rows to PREPACKED_ROWS rows, from
      MIN_SKINNY_WEIGHT_BYTES of weight, where the build has the kernel that reads x in place
      (_backend.linear_prepacked_direct_rows(): Intel CPUs, AVX-512 builds).
    - bfloat16 on the CPU from MIN_MACS_BF16_GENERIC multiply-adds on where torch's bf16 GEMM has no
      vector kernels (_backend.blas_bf16_gemm_is_fast: oneDNN's need AVX-512): 1.25x to 46x F.linear.
    Not: smaller products (see MIN_MACS), bfloat16 beyond 2 rows on a CPU with AVX-512 (torch's GEMM
    runs on oneDNN's kernels there: the CPU's bf16 dot products or AMX where present), CPU autocast,
    other devices, a build without the CPU kernels, or while BIGNLP_FAST_BACKEND names another backend
    than cpu (linear has no triton or cuda kernel: F.linear is what such a run gets; with "torch" the
    reference, F.linear too).

    ``prepacked``: whether this call would use a packed copy of ``weight``; None: ask :func:`prepack`'s
    registry (marked, and the call outside autograd's view of the weight)."""
    if x.dim() == 0:
        return False
    k = x.shape[-1]
    if k == 0:
        return False
    rows = x.numel() // k
    if isinstance(rows, torch.SymInt):  # see linear_is_faster_for
        return False
    avx2 = _backend.cpu_kernels_avx2()  # the one rule that weighs autograd and packed copies (see _shape_rule)
    grad = avx2 and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if prepacked is None:  # (asked only where the answer can matter)
        prepacked = (avx2 or SKINNY_ROWS < rows <= PREPACKED_ROWS) and _packable(weight)
    # linear_is_faster_for's order, inlined: most calls get their answer from the shape, before the
    # device and the process state are looked at (this runs before every product of the models)
    return (_shape_rule(x.dtype, rows, k, weight.shape[0], grad, not weight.is_contiguous(), prepacked)
            and _on_cpu_kernels(x.device))


def linear_is_faster_for(device: torch.device, dtype: torch.dtype, rows: int, k: int, n: int,
                         grad: bool = False, transposed: bool = False, prepacked: bool = False) -> bool:
    """:func:`linear_is_faster` for a product of ``rows`` x k by k x n of this dtype on this device;
    ``grad``: autograd will record it (a backward may follow); ``transposed``: the weight is the
    transpose of a contiguous [K, N] tensor; ``prepacked``: the weight is packed already (:func:`prepack`).

    The rule by shape comes first and the conditions that can only turn a yes into a no after it: most
    calls get their answer (F.linear) from the shape, and the Python spent before a product read from
    memory costs it more than its own time (a 2-core Xeon: 3 us of checks before a 1-row product of
    [768, 2304] made it ~30 us slower, 170 us against 138)."""
    if k == 0 or isinstance(rows, torch.SymInt):  # torch.compile / torch.export with a dynamic size: a
        return False                              # rule by rows would guard the dimension (export refused
    if not _shape_rule(dtype, rows, k, n, grad, transposed, prepacked):  # a range across 32 rows)
        return False
    return _on_cpu_kernels(device)


def _on_cpu_kernels(device: torch.device) -> bool:
    """Whether a product on ``device`` would run ops.linear's CPU kernels now: a CPU tensor, no CPU
    autocast, the cpu backend not overridden (BIGNLP_FAST_BACKEND), the kernels built for this CPU."""
    return (device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and _backend.requested_backend(None) in (None, "cpu") and _backend.unavailable("cpu", device) is None)


def _shape_rule(dtype: torch.dtype, rows: int, k: int, n: int, grad: bool, transposed: bool, prepacked: bool) -> bool:
    """Whether ops.linear's kernels beat F.linear on the CPU for this product (see :func:`linear_is_faster`)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    if rows <= (SKINNY_ROWS if dtype == torch.float32 else SKINNY_ROWS_BF16):
        if dtype == torch.float32 and _backend.blas_sgemm_is_fast() and not _backend.cpu_kernels_avx2() and (
                rows <= MKL_GEMV_ROWS or (rows == 2 and not transposed)):
            return False  # MKL's own matrix-vector kernels on an Intel CPU (see MKL_GEMV_ROWS)
        return k * n * dtype.itemsize >= MIN_SKINNY_WEIGHT_BYTES
    if dtype == torch.float32:
        if _backend.blas_sgemm_is_fast():  # MKL, but for a weight packed once, a few dozen rows (PREPACKED_ROWS)
            return (prepacked and rows <= min(PREPACKED_ROWS, _backend.linear_prepacked_direct_rows())
                    and k * n * dtype.itemsize >= MIN_SKINNY_WEIGHT_BYTES)
        if _backend.cpu_kernels_avx2():  # Zen 1 / Zen 2 (see MIN_ROWS_AVX2)
            weight_bytes = k * n * dtype.itemsize
            if rows <= _backend.linear_streaming_rows(prepacked):
                limit = SHORT_ROWS_AVX2 if grad or transposed else rows
                return rows <= limit and weight_bytes >= MIN_SKINNY_WEIGHT_BYTES
            if prepacked:
                return weight_bytes >= MIN_WEIGHT_BYTES_PREPACKED_AVX2
            return rows >= MIN_ROWS_AVX2 and weight_bytes >= MIN_WEIGHT_BYTES_AVX2
        return rows * k * n >= MIN_MACS
    return rows * k * n >= MIN_MACS_BF16_GENERIC and not _backend.blas_bf16_gemm_is_fast()


def dense(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight^T + bias`` on the faster GEMM for these tensors: :func:`linear` where
    :func:`linear_is_faster` says so, else F.linear. ``weight`` may also be the transpose of a
    contiguous [K, N] tensor (GPT-2's Conv1D layout)."""
    if linear_is_faster(x, weight):
        return _linear(x, weight, bias, None, None)
    return F.linear(x, weight, bias)


# ---- weights packed once (inference) --------------------------------------------------------------
# A marked weight (the base tensor of the views the models pass: W^T of a Conv1D weight, a slice of
# nn.MultiheadAttention's in_proj_weight) -> {(storage offset, shape, strides) of a view:
# (version, data_ptr, dtype, packed)}. Weakly keyed: a weight that goes frees its copies.
_PREPACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def prepack(weights: Union[nn.Module, Tensor, Iterable[Tensor]], enabled: bool = True) -> int:
    """Mark weights to be multiplied, outside autograd, on a copy packed once in the CPU GEMM's layout
    (or, with ``enabled=False``, unmark them and free their copies); returns how many were (un)marked.

    ``weights``: a module (its 2-D floating-point parameters: nn.Linear's, nn.MultiheadAttention's,
    transformers' Conv1D's, the models' own, a tied embedding), a tensor, or tensors. The copy is made
    at a weight's first product that uses it, and made again after the weight changes (an in-place
    update, ``load_state_dict``, ``.to(dtype)``). It is used where :func:`linear` runs on the CPU kernels
    under ``torch.no_grad()`` or ``torch.inference_mode()``, or for a weight that does not require grad;
    a product autograd records for the weight packs per call as before. It costs a second copy of each
    weight used beyond the streaming kernels' rows (float32 for bfloat16 weights on CPUs without
    AVX512_BF16). On the Zen 2 measured, F.linear's products at 33-255 rows become ops.linear's (see
    MIN_WEIGHT_BYTES_PREPACKED_AVX2); where _backend.blas_sgemm_is_fast() holds, float32 products stay
    on F.linear but for 17-48 rows (PREPACKED_ROWS) on Intel CPUs with an AVX-512 build, where a kernel
    that reads x in place ran 1.02-1.57x F.linear. Marked float32 weights of nn.LSTMCell / GRUCell /
    RNNCell and of nn.LSTM / GRU / RNN (W_hh) are read from their copies by those modules' inference
    steps too (see bignlp_fast.ops.rnn.cell_lane and stack_lane).

    A change made in place through ``.data`` (``w.data.mul_(0.5)``, ``w.data.copy_(new)``) is one no
    check can see: ``.data`` has a version counter of its own, and the storage stays where it was; so
    is a storage changed while it was not the weight and then put back (``w.data = t`` again).
    After such a change call ``prepack`` again on the weights: for weights already marked it drops
    their copies, which are made again at their next product."""
    if isinstance(weights, nn.Module):
        weights = [p for p in weights.parameters() if p.dim() == 2 and p.is_floating_point()]
    elif isinstance(weights, Tensor):
        weights = [weights]
    count = 0
    for w in weights:
        if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise TypeError(f"prepack: expected 2-D floating-point weights, got "
                            f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
        base = w if w._base is None else w._base
        if enabled and base in _PREPACKED:
            _PREPACKED[base].clear()  # marked already: its copies go, to be made again from the weight as it is
        elif enabled:
            _PREPACKED[base] = {}
            count += 1
        elif not enabled and base in _PREPACKED:
            del _PREPACKED[base]
            count += 1
    return count


def prepacked_weights() -> int:
    """How many weights :func:`prepack` has marked (and that are still alive)."""
    return len(_PREPACKED)


def prepacked_bytes() -> int:
    """Bytes held by the packed copies of :func:`prepack`'s weights."""
    # (snapshots: other threads may add copies meanwhile)
    return sum(e[-1].numel() * e[-1].element_size() for entries in list(_PREPACKED.values())
               for e in list(entries.values()))


def uses_packed_copy(rows: int, weight: Tensor, packable: Optional[bool] = None) -> bool:
    """Whether ops.linear's cpu kernel, given ``rows`` rows, multiplies by ``weight``'s packed copy
    (past the streaming kernels' rows, for a :func:`_packable` weight; ``packable``: that answer
    already known, None: ask)."""
    return rows > _backend.linear_streaming_rows(True) and (packable if packable is not None else _packable(weight))


def _packable(weight: Tensor) -> bool:
    """Whether a product by ``weight`` would use its packed copy: marked, on the CPU, outside
    autograd's view of the weight, and not while torch.compile or torch.export (whose graphs take the
    weights as they are), torch.jit.trace or a dispatch mode (FakeTensor...) records the call. A trace
    records the packed copy as the empty tensor the kernel allocates, not what fills it: a traced
    prepacked model gave garbage."""
    if (torch.compiler.is_compiling() or not _PREPACKED or weight.device.type != "cpu" or weight.is_inference()
            or torch._C._get_tracing_state() is not None or torch._C._len_torch_dispatch_stack()):
        return False
    if torch.is_grad_enabled() and weight.requires_grad:
        return False
    return (weight if weight._base is None else weight._base) in _PREPACKED


def _packed(weight: Tensor) -> Optional[Tensor]:
    """``weight``'s packed copy (for a :func:`_packable` weight), made now if it is missing or stale;
    None if another thread has unmarked the weight since (the product then packs per call)."""
    entries = _PREPACKED.get(weight if weight._base is None else weight._base)
    if entries is None:
        return None
    key = (weight.storage_offset(), tuple(weight.shape), weight.stride())
    state = (weight._version, weight.data_ptr(), weight.dtype)
    entry = entries.get(key)
    # stale: the weight changed, or the copy's format is not this setting's (bf16_dot(): bf16 pairs or not)
    if entry is None or entry[:3] != state or not _backend.compiled().linear_packed_fits(entry[-1], weight):
        entries.pop(key, None)  # the stale copy goes before the new one is made
        w = weight if weight.is_contiguous() or weight.t().is_contiguous() else weight.contiguous()
        with torch.no_grad():
            entry = entries[key] = (*state, _backend.compiled().linear_pack_cpu(w))
    return entry[-1]


# ---- public op --------------------------------------------------------------------------------
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """``x @ weight^T + bias`` over the last dimension of x ([..., K] -> [..., N]).

    Args:
        x: [..., K]; weight: [N, K]; bias: [N] or None; one dtype (float32 / bfloat16 on the CPU).
        backend: "cpu", "torch" or None for automatic.

    Under autocast the arguments are cast as autocast casts F.linear's (to its dtype, float64 left
    alone), and the product runs in that dtype.
    """
    return _linear(x, weight, bias, backend, None)


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: Optional[str],
            packable: Optional[bool]) -> Tensor:
    """:func:`linear`, told whether ``weight`` is :func:`_packable` (None: ask)."""
    op = "linear"
    check_tensor(op, "x", x, min_dim=1)
    x, weight, bias = autocast_lower(x.device, x, weight, bias)  # as autocast casts F.linear's arguments
    check_like(op, "weight", weight, "x", x, same_shape=False)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: weight must be [N, {x.shape[-1]}] for x's last dimension {x.shape[-1]}, got "
                         f"{tuple(weight.shape)}")
    if bias is not None:
        check_like(op, "bias", bias, "weight", weight, same_shape=False)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), one value per output feature; got "
                             f"{tuple(bias.shape)}")
    name = _backend.choose(OP, x.device, x.dtype, backend)
    packed = None
    if name == "cpu" and x.shape[-1] > 0 and not torch.compiler.is_compiling():  # (compiled: no packed copies)
        rows = math.prod(x.shape[:-1])
        if uses_packed_copy(rows, weight, packable):
            packed = _packed(weight)
    return rows_back(call(linear_fwd, as_rows(x), weight, bias, name, packed), x)
