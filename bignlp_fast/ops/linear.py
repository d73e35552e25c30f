"""linear: ``y = x @ weight^T + bias``, torch.nn.functional.linear's signature, on the project's own
packed GEMM on the CPU (csrc/cpu/linear.cpp).

Why a GEMM of our own: on AMD CPUs the MKL sgemm that torch calls does not take its AVX-512 path;
the register-blocked kernel of csrc/cpu/gemm.h runs about twice as fast there. The RNN layers use
it for their input projection (one GEMM over every time step). On other CPUs, measure before
preferring it: the benchmark compares it with F.linear on the same inputs.

Decoding-sized inputs (at most 16 rows of x) run on streaming kernels (csrc/cpu/skinny_gemm.h) that
read the weight once at memory speed, where BLAS falls to a fraction of the bandwidth for 2-16 rows.

Contract (every backend): x [M, K], weight [N, K], bias [N] or None, contiguous, except that the
forward also takes a weight that is the transpose of a contiguous [K, N] tensor (transformers'
Conv1D layout, ``conv1d_weight.t()``) and reads it in place; forward returns y [M, N]; backward
returns (grad_x [M, K], grad_weight [N, K], grad_bias [N] or [0]).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bignlp_fast import _backend
from bignlp_fast.ops._common import acc_dtype, call, check_like, check_tensor, contiguous, custom_op, kernel

OP = _backend.register_op(
    "linear",
    dtypes={"cpu": (torch.float32, torch.bfloat16)},
    missing={"cuda": "no CUDA kernel for linear (cuBLAS through torch is the one to use)",
             "triton": "no Triton kernel for linear"},
)


# ---- reference backend ------------------------------------------------------------------------
def linear_fwd_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    acc = acc_dtype(x.dtype)
    return F.linear(x.to(acc), weight.to(acc), bias.to(acc) if bias is not None else None).to(x.dtype)


def linear_bwd_torch(grad_y: Tensor, x: Tensor, weight: Tensor, has_bias: bool):
    acc = acc_dtype(x.dtype)
    g = grad_y.to(acc)
    grad_bias = g.sum(0).to(weight.dtype) if has_bias else x.new_empty(0)
    return (g @ weight.to(acc)).to(x.dtype), (g.t() @ x.to(acc)).to(weight.dtype), grad_bias


# ---- custom ops -------------------------------------------------------------------------------
@custom_op("linear_fwd")
def linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    w = weight if weight.t().is_contiguous() else weight.contiguous()  # a transposed [K, N] is read in place
    return kernel("linear", "fwd", backend)(x.contiguous(), w, contiguous(bias))


@linear_fwd.register_fake
def _(x, weight, bias, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@custom_op("linear_bwd")
def linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, has_bias: bool,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(kernel("linear", "bwd", backend)(grad_y.contiguous(), x.contiguous(), weight.contiguous(), has_bias))


@linear_bwd.register_fake
def _(grad_y, x, weight, has_bias, backend):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0] if has_bias else 0)


def _setup_context(ctx, inputs, output):
    x, weight, bias, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.backend = bias is not None, backend


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = call(linear_bwd, grad_y, x, weight, ctx.has_bias, ctx.backend)
    return grad_x, grad_w, grad_b if ctx.has_bias else None, None


linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- which GEMM to call -------------------------------------------------------------------------
SKINNY_ROWS = 16  # csrc/cpu/skinny_gemm.h's kSkinnyRows: up to this many rows the streaming kernels win


def linear_is_faster(x: Tensor) -> bool:
    """Whether ``linear`` beats F.linear for an input like ``x`` on this machine (the models and
    nn.Linear ask this before each GEMM):

    - decoding-sized inputs (at most SKINNY_ROWS rows) on the CPU, float32 or bfloat16: the streaming
      kernels read the weight once at memory speed, where BLAS falls to a fraction of the bandwidth;
    - float32 on the CPU, unless torch's sgemm is the faster one (MKL on Intel CPUs, where it takes
      its AVX-512 path: _backend.blas_sgemm_is_fast). On an AMD EPYC (Zen 5) the packed GEMM ran
      1.5-2.1x F.linear at BERT's shapes ([624, 768] x [768, 3072] and the like), forward and backward.
    Not: bfloat16 beyond decoding sizes (torch's GEMM runs on the CPU's bf16 dot products or AMX,
    about twice the packed GEMM's fp32 arithmetic), CPU autocast, other devices, or a build without
    the CPU kernels."""
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or x.dim() == 0 or x.shape[-1] == 0:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or _backend.unavailable("cpu", x.device) is not None:
        return False
    rows = x.numel() // x.shape[-1]
    return rows <= SKINNY_ROWS or (x.dtype == torch.float32 and not _backend.blas_sgemm_is_fast())


def dense(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight^T + bias`` on the faster GEMM for these tensors: :func:`linear` where
    :func:`linear_is_faster` says so, else F.linear. ``weight`` may also be the transpose of a
    contiguous [K, N] tensor (GPT-2's Conv1D layout)."""
    return linear(x, weight, bias) if linear_is_faster(x) else F.linear(x, weight, bias)


# ---- public op --------------------------------------------------------------------------------
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """``x @ weight^T + bias`` over the last dimension of x ([..., K] -> [..., N]).

    Args:
        x: [..., K]; weight: [N, K]; bias: [N] or None; one dtype (float32 / bfloat16 on the CPU).
        backend: "cpu", "torch" or None for automatic.
    """
    op = "linear"
    check_tensor(op, "x", x, min_dim=1)
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
    y = call(linear_fwd, x.reshape(-1, x.shape[-1]), weight, bias, name)
    return y.view(*x.shape[:-1], weight.shape[0])
