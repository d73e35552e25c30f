"""causal_conv1d: depthwise causal convolution over [B, C, L] with kernel widths 2-4, a fused bias and
activation, an optional initial state for streaming decode, forward and backward.

    y[b, c, t] = act(bias[c] + sum_j weight[c, j] * xx[b, c, t + j]),   j = 0 .. W-1,
    xx = cat(initial_state, x) along L       (initial_state [B, C, W-1]; zeros when absent)

The gated/causal conv layers of modern sequence models (Mamba, Hyena, H3) use it; in eager PyTorch it
is a grouped F.conv1d with padding W-1 whose right end is cut off, then a separate activation: three
passes over [B, C, L] and an output twice as long as needed. Fused: read x once, write y once.

Kernel contract (every backend; ``causal_conv1d_{fwd,bwd}_torch`` is the specification):
x [B, C, L], weight [C, W], bias [C] or None, initial_state [B, C, W-1] or None, all contiguous and
of one dtype; activation code as in ops/_activation.py. The cpu kernel also takes an x laid out
[B, L, C] (``x = h.transpose(1, 2)`` of a model's [B, L, C] activation, as Mamba hands it over) as it
is, with grad_y in that layout too, and writes y and grad_x so: no copy of x either way, and
``y.transpose(1, 2)`` is contiguous for what follows; the other backends copy x to contiguous.
Forward returns y [B, C, L]. Backward (given grad_y and the forward's inputs; the pre-activation is
recomputed, not saved) returns (grad_x, grad_weight [C, W], grad_bias [C] or [0], grad_initial_state
or [0]); weight and bias gradients are reduced in a fixed order (deterministic).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bignlp_fast import _backend
from bignlp_fast.ops._activation import activation_grad_torch, activation_torch, check_activation
from bignlp_fast.ops._common import (acc_dtype, autocast_lower, call, check_like, check_tensor, contiguous, custom_op,
                                     fresh_like, kernel, register_autograd, seq_channels_last)

OP = _backend.register_op("causal_conv1d", dtypes={
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
})

WIDTHS = (2, 3, 4)


# ---- reference backend ------------------------------------------------------------------------
def _padded(x: Tensor, weight: Tensor, initial_state: Optional[Tensor]) -> Tensor:
    """xx = cat(initial_state or zeros, x): [B, C, W-1+L] in the accumulation dtype."""
    acc = acc_dtype(x.dtype)
    W = weight.shape[1]
    head = (initial_state.to(acc) if initial_state is not None
            else x.new_zeros(x.shape[0], x.shape[1], W - 1, dtype=acc))
    return torch.cat([head, x.to(acc)], dim=-1)


def _pre(xx: Tensor, weight: Tensor, bias: Optional[Tensor], L: int) -> Tensor:
    w = weight.to(xx.dtype)
    pre = sum(w[:, j, None] * xx[..., j:j + L] for j in range(weight.shape[1]))
    return pre + bias.to(xx.dtype)[:, None] if bias is not None else pre


def causal_conv1d_fwd_torch(x, weight, bias, initial_state, activation: int) -> Tensor:
    pre = _pre(_padded(x, weight, initial_state), weight, bias, x.shape[-1])
    return activation_torch(pre, activation).to(x.dtype)


def causal_conv1d_bwd_torch(grad_y, x, weight, bias, initial_state, activation: int):
    L, W = x.shape[-1], weight.shape[1]
    xx = _padded(x, weight, initial_state)
    pre = _pre(xx, weight, bias, L)
    gp = grad_y.to(pre.dtype) * activation_grad_torch(pre, activation)  # [B, C, L]
    w = weight.to(pre.dtype)
    grad_xx = torch.zeros_like(xx)
    for j in range(W):
        grad_xx[..., j:j + L] += w[:, j, None] * gp
    grad_w = torch.stack([(gp * xx[..., j:j + L]).sum((0, 2)) for j in range(W)], dim=1)
    grad_b = gp.sum((0, 2)).to(bias.dtype) if bias is not None else x.new_empty(0)
    # copies: the two slices of grad_xx must not share storage (custom op outputs may not alias)
    grad_init = grad_xx[..., :W - 1].to(x.dtype, copy=True) if initial_state is not None else x.new_empty(0)
    return grad_xx[..., W - 1:].to(x.dtype, copy=True), grad_w.to(weight.dtype), grad_b, grad_init


# ---- custom ops -------------------------------------------------------------------------------
def _kernel_layout(t: Tensor, x: Tensor, backend: str) -> Tensor:
    """t (x, or grad_y) as the backend's kernel takes it: the CPU kernel reads an x laid out [B, L, C] as
    it is and then wants grad_y so too; everything else is contiguous."""
    if backend == "cpu" and seq_channels_last(x):
        return t if seq_channels_last(t) else t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.contiguous()


def _like_x(x: Tensor, backend: str) -> Tensor:
    """The kernel's y / grad_x for a fake function: x's layout where the CPU kernel kept it, else contiguous."""
    return torch.empty_like(x) if backend == "cpu" and seq_channels_last(x) else fresh_like(x)


@custom_op("causal_conv1d_fwd")
def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
                      activation: int, backend: str) -> Tensor:
    return kernel("causal_conv1d", "fwd", backend)(_kernel_layout(x, x, backend), weight.contiguous(),
                                                   contiguous(bias), contiguous(initial_state), activation)


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, initial_state, activation, backend):
    return _like_x(x, backend)


@custom_op("causal_conv1d_bwd")
def causal_conv1d_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                      initial_state: Optional[Tensor], activation: int,
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    run = kernel("causal_conv1d", "bwd", backend)
    return tuple(run(_kernel_layout(grad_y, x, backend), _kernel_layout(x, x, backend), weight.contiguous(),
                     contiguous(bias), contiguous(initial_state), activation))


@causal_conv1d_bwd.register_fake
def _(grad_y, x, weight, bias, initial_state, activation, backend):
    return (_like_x(x, backend), fresh_like(weight),
            x.new_empty(weight.shape[0] if bias is not None else 0),
            fresh_like(initial_state) if initial_state is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, initial_state, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias, initial_state)
    ctx.activation, ctx.backend = activation, backend


def _backward(ctx, grad_y):
    x, weight, bias, initial_state = ctx.saved_tensors
    gx, gw, gb, gi = call(causal_conv1d_bwd, grad_y, x, weight, bias, initial_state, ctx.activation, ctx.backend)
    return gx, gw, gb if bias is not None else None, gi if initial_state is not None else None, None, None


register_autograd(causal_conv1d_fwd, _backward, _setup_context)


# ---- public op --------------------------------------------------------------------------------
def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None, *,
                  initial_state: Optional[Tensor] = None, return_final_state: bool = False,
                  backend: Optional[str] = None):
    """Depthwise causal conv1d with a fused bias and activation: ``act(conv(x)[..., :L] + bias)`` of a
    grouped F.conv1d(x, weight, padding=W-1, groups=C), in one pass.

    Args:
        x: [B, C, L]: contiguous, or laid out [B, L, C] (``h.transpose(1, 2)``), which the CPU backend
            reads as it is and answers in kind (y laid out [B, L, C] too).
        weight: [C, W] or nn.Conv1d's depthwise [C, 1, W], W in 2..4.
        bias: [C] or None.
        activation: None, "relu", "gelu", "silu" or "tanh".
        initial_state: [B, C, W-1], the W-1 inputs before x[..., 0] (streaming decode: the previous
            call's final state); None means zeros.
        return_final_state: also return the last W-1 inputs (of cat(initial_state, x)), the state to
            pass to the next call; it is [B, C, W-1] even when L < W-1.
        backend: "cpu", "cuda", "triton", "torch" or None for automatic.

    Returns:
        y [B, C, L], or (y, final_state) with return_final_state.
    """
    op = "causal_conv1d"
    check_tensor(op, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, C, L], got shape {tuple(x.shape)}")
    x, weight, bias, initial_state = autocast_lower(x.device, x, weight, bias, initial_state)
    check_like(op, "weight", weight, "x", x, same_shape=False)
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    C = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != C:
        raise ValueError(f"{op}: weight must be [C, W] (or [C, 1, W]) with C = {C} channels of x, got "
                         f"{tuple(weight.shape)}")
    W = weight.shape[1]
    if W not in WIDTHS:
        raise ValueError(f"{op}: kernel width must be one of {WIDTHS}, got {W}")
    if bias is not None:
        check_like(op, "bias", bias, "x", x, same_shape=False)
        if bias.shape != (C,):
            raise ValueError(f"{op}: bias must have shape ({C},), got {tuple(bias.shape)}")
    if initial_state is not None:
        check_like(op, "initial_state", initial_state, "x", x, same_shape=False)
        if initial_state.shape != (x.shape[0], C, W - 1):
            raise ValueError(f"{op}: initial_state must be [B, C, W-1] = {(x.shape[0], C, W - 1)}, got "
                             f"{tuple(initial_state.shape)}")
    code = check_activation(op, activation)
    name = _backend.choose(OP, x.device, x.dtype, backend)
    y = call(causal_conv1d_fwd, x, weight, bias, initial_state, code, name)
    if not return_final_state:
        return y
    L = x.shape[-1]
    if L >= W - 1:  # the last W-1 inputs are all in x: a copy of them (a view would change with x, a
        return y, x[..., L - (W - 1):].clone()  # buffer a decoding loop may reuse for its next input)
    head = initial_state if initial_state is not None else x.new_zeros(x.shape[0], C, W - 1)
    return y, torch.cat([head[..., L:], x], dim=-1)


def causal_conv1d_eager(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        activation: Optional[str] = None) -> Tensor:
    """What a user writes in eager PyTorch (the benchmark's reference): a grouped conv1d padded by
    W-1 on both sides, its right end cut off, then the activation."""
    W = weight.shape[-1]
    y = F.conv1d(x, weight.reshape(weight.shape[0], 1, W), bias, padding=W - 1, groups=x.shape[1])[..., :x.shape[-1]]
    return activation_torch(y, check_activation("causal_conv1d", activation))
