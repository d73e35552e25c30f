"""add_layer_norm: ``LayerNorm(x + residual)`` and ``x + residual`` in one pass.

The residual pattern of BERT (post-LN: ``h = LN(x + h)``) and GPT (pre-LN: the sum continues as the
residual stream, its normalisation feeds the next block). Fused, the forward reads x and residual
once and writes both outputs once; the backward reads the two incoming gradients and the saved sum
once and writes one gradient, which is both x's and residual's.

Layers: ``add_layer_norm_{fwd,bwd}_torch`` below is the reference (the specification);
``bignlp_fast::add_layer_norm_fwd/bwd`` are the custom ops that dispatch to a backend;
``add_layer_norm`` is the public function.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bignlp_fast import _backend
from bignlp_fast.ops._common import (PLAIN_TENSORS, acc_dtype, as_rows, autocast_promote, call,
                                     check_like, check_tensor, check_vector, contiguous, cpu_lane_open, custom_op,
                                     fresh_like, grads_or_zeros, kernel, no_zero_grads, real_number,
                                     register_autograd, rows_back)

OP = _backend.register_op("add_layer_norm", dtypes={
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
})


# ---- reference backend ------------------------------------------------------------------------
def add_layer_norm_fwd_torch(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                             bias: Optional[Tensor], eps: float):
    """x, residual: [N, H]. Returns (out [N, H], residual_out [N, H] or [0], mean [N], rstd [N])."""
    acc = acc_dtype(x.dtype)
    if residual is not None:  # added in fp32, rounded to x's dtype: the s the backward will see
        residual_out = (x.to(acc) + residual.to(acc)).to(x.dtype)
        s = residual_out.to(acc)
    else:
        residual_out, s = x.new_empty(0), x.to(acc)  # [N, H]
    mean = s.mean(-1)
    centred = s - mean[:, None]
    rstd = torch.rsqrt(centred.square().mean(-1) + eps)
    out = centred * rstd[:, None]
    if weight is not None:
        out = out * weight.to(acc)
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(x.dtype), residual_out, mean, rstd


def add_layer_norm_bwd_torch(grad_out: Tensor, grad_residual_out: Optional[Tensor], s: Tensor, mean: Tensor,
                             rstd: Tensor, weight: Optional[Tensor], has_bias: bool):
    """Returns (grad_s [N, H], grad_weight [H] or [0], grad_bias [H] or [0])."""
    acc = acc_dtype(s.dtype)
    xhat = (s.to(acc) - mean[:, None]) * rstd[:, None]
    dy = grad_out.to(acc)
    g = dy * weight.to(acc) if weight is not None else dy
    ds = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if grad_residual_out is not None:
        ds = ds + grad_residual_out.to(acc)
    grad_weight = (dy * xhat).sum(0).to(s.dtype) if weight is not None else s.new_empty(0)
    grad_bias = dy.sum(0).to(s.dtype) if has_bias else s.new_empty(0)
    return ds.to(s.dtype), grad_weight, grad_bias


# ---- custom ops -------------------------------------------------------------------------------
@custom_op("add_layer_norm_fwd")
def add_layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                       eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    run = kernel("add_layer_norm", "fwd", backend)
    return tuple(run(x.contiguous(), contiguous(residual), contiguous(weight), contiguous(bias), eps))


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, backend):
    stats = x.new_empty(x.shape[0], dtype=acc_dtype(x.dtype))
    return (fresh_like(x), fresh_like(x) if residual is not None else x.new_empty(0),
            stats, fresh_like(stats))


@custom_op("add_layer_norm_bwd")
def add_layer_norm_bwd(grad_out: Tensor, grad_residual_out: Optional[Tensor], s: Tensor, mean: Tensor,
                       rstd: Tensor, weight: Optional[Tensor], has_bias: bool,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    run = kernel("add_layer_norm", "bwd", backend)
    return tuple(run(grad_out.contiguous(), contiguous(grad_residual_out), s.contiguous(), mean.contiguous(),
                     rstd.contiguous(), contiguous(weight), has_bias))


@add_layer_norm_bwd.register_fake
def _(grad_out, grad_residual_out, s, mean, rstd, weight, has_bias, backend):
    vec = s.new_empty(s.shape[1])
    return fresh_like(s), vec if weight is not None else s.new_empty(0), \
        fresh_like(vec) if has_bias else s.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps, backend = inputs
    _out, residual_out, mean, rstd = output
    ctx.save_for_backward(residual_out if residual is not None else x, mean, rstd, weight)
    ctx.has_residual, ctx.has_bias, ctx.backend = residual is not None, bias is not None, backend
    no_zero_grads(ctx, output, 1)


def _backward(ctx, grad_out, grad_residual_out, _grad_mean, _grad_rstd):
    (grad_out,) = grads_or_zeros(ctx, grad_out)
    # no gradient for the sum (post-LN BERT discards it): None, not a tensor of zeros to add
    s, mean, rstd, weight = ctx.saved_tensors
    grad_s, grad_weight, grad_bias = call(add_layer_norm_bwd,
        grad_out, grad_residual_out if ctx.has_residual else None, s, mean, rstd, weight, ctx.has_bias, ctx.backend)
    return (grad_s, grad_s if ctx.has_residual else None, grad_weight if weight is not None else None,
            grad_bias if ctx.has_bias else None, None, None)


register_autograd(add_layer_norm_fwd, _backward, _setup_context)


# ---- public op --------------------------------------------------------------------------------
def _triton_check(hidden: int, dtype: torch.dtype):
    def check(backend: str) -> Optional[str]:
        if backend != "triton":
            return None
        from bignlp_fast.kernels.add_layer_norm import add_layer_norm_triton_supports
        return add_layer_norm_triton_supports(hidden, dtype)
    return check


def _lane(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps,
          backend: Optional[str]) -> Optional[list]:
    """add_layer_norm's eager lane: the CPU kernel's outputs for a plain inference call, with x as it is;
    None where the call takes the general path.

    Python checks what only it can see (no backend named, plain tensor types rather than subclasses,
    x on the CPU, a number for eps, nothing recording or transforming calls, no autocast, the cpu
    backend chosen); the extension's ``add_layer_norm_lane_cpu`` checks the tensors (float32 / bfloat16,
    dense and contiguous, shapes, no grad to record) and runs the kernel, or returns nothing. Where the
    lane runs, the general path below would pass every check, choose the cpu backend (no fallback to
    record) and run the same kernel directly (call()'s route 0) on x flattened to rows: the same tensors.
    The lane costs ~1 us before the kernel; the general path ~10, where the kernel at one row (GPT-2
    decoding: 25 LayerNorms a token) takes ~2."""
    if (backend is not None or torch.compiler.is_compiling() or type(x) not in PLAIN_TENSORS or not x.is_cpu
            or (residual is not None and type(residual) not in PLAIN_TENSORS)
            or (weight is not None and type(weight) not in PLAIN_TENSORS)
            or (bias is not None and type(bias) not in PLAIN_TENSORS)
            or type(eps) not in (float, int) or not cpu_lane_open()):
        return None
    return kernel("add_layer_norm", "lane", "cpu")(x, residual, weight, bias, float(eps)) or None


def add_layer_norm(x: Tensor, residual: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, *,
                   backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """``(LayerNorm(x + residual), x + residual)`` over the last dimension, fused.

    Args:
        x: [..., H] float32 / bfloat16 (CPU) or float32 / float16 / bfloat16 (CUDA).
        residual: same shape and dtype as x, or None (then the op is a plain LayerNorm and the
            second output is x itself).
        weight, bias: [H] in x's dtype, or None (no scale / no shift).
        eps: added to the variance.
        backend: "cpu", "cuda", "triton", "torch" or None for automatic (see bignlp_fast._backend).

    The sum is added in fp32 and rounded to x's dtype, then normalised in fp32 (as eager PyTorch
    does, and so the backward sees the very sum that was normalised). Under autocast, mixed dtypes
    are promoted as eager ``x + residual`` would be, the parameters cast to that dtype.
    """
    lane = _lane(x, residual, weight, bias, eps, backend)
    if lane is not None:
        return lane[0], (lane[1] if residual is not None else x)
    op = "add_layer_norm"
    check_tensor(op, "x", x, min_dim=1)
    x, residual, weight, bias = autocast_promote(x.device, x, residual, weight, bias)
    hidden = x.shape[-1]
    if hidden == 0:
        raise ValueError(f"{op}: x's last dimension must be at least 1, got shape {tuple(x.shape)}")
    if residual is not None:
        check_like(op, "residual", residual, "x", x)
    check_vector(op, "weight", weight, hidden, "x", x)
    check_vector(op, "bias", bias, hidden, "x", x)
    eps_value = real_number(eps)
    if eps_value is None or not eps_value >= 0:
        raise ValueError(f"{op}: eps must be a non-negative number, got {eps!r}")
    name = _backend.choose(OP, x.device, x.dtype, backend, _triton_check(hidden, x.dtype))
    r2 = as_rows(residual) if residual is not None else None
    out, residual_out, _mean, _rstd = call(add_layer_norm_fwd, as_rows(x), r2, weight, bias, eps_value, name)
    return rows_back(out, x), (rows_back(residual_out, x) if residual is not None else x)
