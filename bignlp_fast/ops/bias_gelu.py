"""bias_gelu: ``gelu(x + bias)``, the feed-forward activation of BERT and GPT, in one pass.

Eager PyTorch writes ``x + bias`` out, reads it back for the GELU, and in the backward reads it
again and writes two more [N, H] tensors before summing the bias gradient. Fused, the forward reads
x and writes y; the backward reads grad_y and x, writes grad_x, and sums the bias gradient on the way.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from bignlp_fast import _backend
from bignlp_fast.ops._activation import ACTIVATIONS, activation_grad_torch
from bignlp_fast.ops._common import (acc_dtype, as_rows, autocast_promote, call, check_choice, check_tensor, check_vector,
                                     contiguous, custom_op, fresh_like, kernel, register_autograd, rows_back)

OP = _backend.register_op("bias_gelu", dtypes={
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
})

APPROXIMATE = ("none", "tanh")


# ---- reference backend ------------------------------------------------------------------------
def bias_gelu_fwd_torch(x: Tensor, bias: Optional[Tensor], tanh_approx: bool) -> Tensor:
    """x: [N, H], bias: [H] or None. Returns gelu(x + bias) [N, H]."""
    v = x.to(acc_dtype(x.dtype))
    if bias is not None:
        v = v + bias.to(v.dtype)
    return torch.nn.functional.gelu(v, approximate="tanh" if tanh_approx else "none").to(x.dtype)


def bias_gelu_bwd_torch(grad_y: Tensor, x: Tensor, bias: Optional[Tensor], tanh_approx: bool):
    """Returns (grad_x [N, H], grad_bias [H] or [0]); the derivative written out as the specification."""
    v = x.to(acc_dtype(x.dtype))
    if bias is not None:
        v = v + bias.to(v.dtype)
    if tanh_approx:
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (v + 0.044715 * v**3))
        dgelu = 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * k * (1 + 3 * 0.044715 * v * v)
    else:
        dgelu = activation_grad_torch(v, ACTIVATIONS["gelu"])
    grad_x = grad_y.to(v.dtype) * dgelu
    grad_bias = grad_x.sum(0).to(x.dtype) if bias is not None else x.new_empty(0)
    return grad_x.to(x.dtype), grad_bias


# ---- custom ops -------------------------------------------------------------------------------
@custom_op("bias_gelu_fwd")
def bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str, backend: str) -> Tensor:
    return kernel("bias_gelu", "fwd", backend)(x.contiguous(), contiguous(bias), approximate == "tanh")


@bias_gelu_fwd.register_fake
def _(x, bias, approximate, backend):
    return fresh_like(x)


@custom_op("bias_gelu_bwd")
def bias_gelu_bwd(grad_y: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str,
                  backend: str) -> tuple[Tensor, Tensor]:
    run = kernel("bias_gelu", "bwd", backend)
    return tuple(run(grad_y.contiguous(), x.contiguous(), contiguous(bias), approximate == "tanh"))


@bias_gelu_bwd.register_fake
def _(grad_y, x, bias, approximate, backend):
    return fresh_like(x), x.new_empty(x.shape[1]) if bias is not None else x.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, bias, approximate, backend = inputs
    if x.is_inference():  # x from inference mode, a bias that needs grad: gelu(x + bias) saves x + bias, so copy x
        x = x.clone()
    ctx.save_for_backward(x, bias)
    ctx.approximate, ctx.backend = approximate, backend


def _backward(ctx, grad_y):
    x, bias = ctx.saved_tensors
    grad_x, grad_bias = call(bias_gelu_bwd, grad_y, x, bias, ctx.approximate, ctx.backend)
    return grad_x, grad_bias if bias is not None else None, None, None


register_autograd(bias_gelu_fwd, _backward, _setup_context)


# ---- public op --------------------------------------------------------------------------------
def bias_gelu(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none", *,
              backend: Optional[str] = None) -> Tensor:
    """``torch.nn.functional.gelu(x + bias, approximate=approximate)``, fused.

    Args:
        x: [..., H] float32 / bfloat16 (CPU) or float32 / float16 / bfloat16 (CUDA).
        bias: [H] in x's dtype, or None.
        approximate: "none" (erf form) or "tanh", as in torch.nn.functional.gelu.
        backend: "cpu", "cuda", "triton", "torch" or None for automatic (see bignlp_fast._backend).
    """
    op = "bias_gelu"
    check_tensor(op, "x", x, min_dim=1)
    x, _, bias = autocast_promote(x.device, x, None, bias)  # autocast: the bias in x's dtype, as F.linear's
    hidden = x.shape[-1]
    check_vector(op, "bias", bias, hidden, "x", x)
    check_choice(op, "approximate", approximate, APPROXIMATE)
    name = _backend.choose(OP, x.device, x.dtype, backend)
    return rows_back(call(bias_gelu_fwd, as_rows(x), bias, approximate, name), x)
