"""conv1d / conv2d with a fused epilogue: ``act(conv(x) + bias) + residual`` with torch's arguments.

In general the main loop is the vendor convolution (oneDNN on the CPU, cuDNN on the GPU, called
through ``aten::convolution``) and the point is the whole block: what follows the convolution is one
fused pass. Eager PyTorch runs bias (inside the conv), the activation and the residual add as
separate kernels, each reading and writing the full output; fused, the output is read and written
once, and the backward computes the activation's derivative and the bias gradient in one pass over
grad_out before ``aten::convolution_backward``. Where the project's own main loops measured faster,
the CPU backend runs them with the epilogue inside (csrc/cpu/conv.cpp; ``_C.conv_cpu_path`` names
the path of a call): conv1d's implicit GEMM and Winograd F(2, 3), conv2d 3 x 3's Winograd
F(2x2, 3x3), and depthwise convolutions (groups = C_in = C_out, stride 1), per plane, forward and
backward in one pass each.

Kernel contract (every backend; ``conv_{fwd,bwd}_torch`` is the specification):
- x [B, C_in, *spatial] and weight [C_out, C_in / groups, *kernel] (1 or 2 spatial dims), bias [C_out]
  or None, residual shaped like the output or None; stride/padding/dilation: one int per spatial dim.
- x may be a channels_last 4-D tensor (see ``_memory_format``); then residual, out, pre, grad_out, gp and
  grad_x are channels_last too, and the cpu, triton and torch kernels work in that layout (the cuda
  kernel works in NCHW: its wrapper copies each way, for now). The cpu kernel also takes a conv1d's x
  laid out [B, L, C] (see ``_x_in``); everything else about that call is contiguous.
- Forward returns (out, pre): out = act(v) + residual with v = conv(x, weight) + bias in fp32 (the CPU
  kernels add the bias to the convolution's fp32 sums, as torch's CPU convolution does; the GPU ones to
  cuDNN's output, as torch's cudnn path does); pre is v rounded to x's dtype, returned only when
  ``save_pre`` (a backward will need it), else it is [0] and out may be computed in place of it.
- Backward, given grad_out, x, weight, pre, bias: gp = grad_out * act'(pre) returns
  (grad_x, grad_weight, grad_bias [C_out] or [0]); grad_residual is grad_out itself. The bias
  gradient is reduced in a fixed order (deterministic).
- Why pre holds the bias: rounding v keeps its sign (and rounds it relative to its own size), so the
  backward takes the activation's derivative where the forward took the activation. A 16-bit pre
  without the bias, rounded about the convolution's size, put bf16(conv) + bias on the other side
  of ReLU's kink wherever the bias nearly cancelled the convolution: a conv2d's bf16 gradients were
  off by 100x torch's own error (grad_bias 2.72 for 3.93).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from bignlp_fast import _backend
from bignlp_fast.ops._activation import activation_grad_torch, activation_torch, check_activation
from bignlp_fast.ops._common import (acc_dtype, autocast_lower, call, check_like, check_tensor, contiguous, custom_op,
                                     fresh_like, grads_or_zeros, integer, kernel, no_zero_grads, register_autograd,
                                     seq_channels_last)

OP = _backend.register_op("conv", dtypes={
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
})


# ---- reference backend ------------------------------------------------------------------------
def conv_fwd_torch(x, weight, bias, residual, stride, padding, dilation, groups, activation: int, save_pre: bool):
    # v as eager torch rounds it: with the bias added inside the convolution (on the CPU to its fp32 sums)
    pre = torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)
    v = pre.to(acc_dtype(x.dtype), copy=save_pre)  # (without an activation, y would be pre itself)
    y = activation_torch(v, activation)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return y.to(x.dtype), (pre if save_pre else x.new_empty(0))


def conv_bwd_torch(grad_out, x, weight, pre, bias, stride, padding, dilation, groups, activation: int):
    v = pre.to(acc_dtype(x.dtype))
    gp = (grad_out.to(v.dtype) * activation_grad_torch(v, activation))
    grad_bias = gp.sum([d for d in range(gp.dim()) if d != 1]).to(bias.dtype) if bias is not None else x.new_empty(0)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        gp.to(x.dtype), x, weight, None, stride, padding, dilation, False, [0] * len(stride), groups, [True, True, False])
    return grad_x, grad_w, grad_bias


# ---- custom ops -------------------------------------------------------------------------------
def _memory_format(x: Tensor) -> torch.memory_format:
    """torch.channels_last for a 4-D x laid out so (and not also contiguous, as it is with C = 1 or
    H = W = 1), else torch.contiguous_format: the layout the kernels take x in and write the output in.
    torch's convolution keeps a channels_last input's layout, and so do these."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _kernel_format(x: Tensor, backend: str) -> torch.memory_format:
    """The layout the backend's kernel takes: x's, but NCHW for the CUDA epilogue (a copy each way)."""
    return torch.contiguous_format if backend == "cuda" else _memory_format(x)


def _in_format(t: Optional[Tensor], fmt: torch.memory_format) -> Optional[Tensor]:
    return None if t is None else t.contiguous(memory_format=fmt)


def _x_in(x: Tensor, fmt: torch.memory_format, backend: str) -> Tensor:
    """x as the backend's kernel takes it: in ``fmt``, but the CPU kernel takes a conv1d's x laid out
    [B, L, C] (a sequence model's activation transposed to [B, C, L]) as it is: its depthwise kernels read
    that layout, a copy fewer (the copy alone took longer than the convolution), and its other paths
    make it contiguous. Outputs and gradients are contiguous, as torch's are."""
    if backend == "cpu" and seq_channels_last(x):
        return x
    return _in_format(x, fmt)


def _out_shape(x, weight, stride, padding, dilation):
    spatial = [(n + 2 * p - d * (k - 1) - 1) // s + 1
               for n, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
    return (x.shape[0], weight.shape[0], *spatial)


@custom_op("conv_fwd")
def conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], stride: list[int],
             padding: list[int], dilation: list[int], groups: int, activation: int, save_pre: bool,
             backend: str) -> tuple[Tensor, Tensor]:
    fmt, kfmt = _memory_format(x), _kernel_format(x, backend)
    out, pre = kernel("conv", "fwd", backend)(_x_in(x, kfmt, backend), weight.contiguous(), contiguous(bias),
                                              _in_format(residual, kfmt), stride, padding, dilation, groups,
                                              activation, save_pre)
    # x's layout: a no-op where the kernel kept it (the reference's elementwise tail may pick either)
    return out.contiguous(memory_format=fmt), (pre.contiguous(memory_format=fmt) if save_pre else pre)


@conv_fwd.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, activation, save_pre, backend):
    shape = _out_shape(x, weight, stride, padding, dilation)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    return out, (torch.empty_like(out) if save_pre else x.new_empty(0))


@custom_op("conv_bwd")
def conv_bwd(grad_out: Tensor, x: Tensor, weight: Tensor, pre: Tensor, bias: Optional[Tensor], stride: list[int],
             padding: list[int], dilation: list[int], groups: int, activation: int,
             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    kfmt = _kernel_format(x, backend)
    grad_x, grad_w, grad_b = kernel("conv", "bwd", backend)(
        _in_format(grad_out, kfmt), _x_in(x, kfmt, backend), weight.contiguous(), _in_format(pre, kfmt),
        contiguous(bias),
        stride, padding, dilation, groups, activation)
    return grad_x.contiguous(memory_format=_memory_format(x)), grad_w.contiguous(), grad_b


@conv_bwd.register_fake
def _(grad_out, x, weight, pre, bias, stride, padding, dilation, groups, activation, backend):
    return (torch.empty_like(x, memory_format=_memory_format(x)), fresh_like(weight),
            x.new_empty(weight.shape[0] if bias is not None else 0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, activation, save_pre, backend = inputs
    ctx.save_for_backward(x, weight, output[1], bias)
    ctx.args = (stride, padding, dilation, groups, activation)
    ctx.has_residual, ctx.backend = residual is not None, backend
    no_zero_grads(ctx, output, 1)


def _backward(ctx, grad_out, _grad_pre):
    (grad_out,) = grads_or_zeros(ctx, grad_out)
    x, weight, pre, bias = ctx.saved_tensors
    if pre.numel() == 0 and grad_out.numel() > 0:
        raise RuntimeError("conv: backward needs the pre-activation, which this forward did not save "
                           "(save_pre=False); call the public conv1d/conv2d, which saves it when a gradient is needed")
    grad_x, grad_w, grad_b = call(conv_bwd, grad_out, x, weight, pre, bias, *ctx.args, ctx.backend)
    return (grad_x, grad_w, grad_b if bias is not None else None, grad_out if ctx.has_residual else None,
            None, None, None, None, None, None, None)


register_autograd(conv_fwd, _backward, _setup_context)


# ---- public ops -------------------------------------------------------------------------------
IntOrTuple = Union[int, Sequence[int]]


def _tuple(op: str, name: str, value: IntOrTuple, n: int, minimum: int) -> list[int]:
    one = integer(value)  # an int, or a numpy / 0-d tensor integer, as torch's convolutions take them
    vals = [one] * n if one is not None else [integer(v) for v in value] if isinstance(value, (list, tuple)) else []
    if len(vals) != n or not all(v is not None and v >= minimum for v in vals):
        raise ValueError(f"{op}: {name} must be an int >= {minimum} or {n} of them, got {value!r}")
    return vals


def _conv_nd(op: str, nd: int, x, weight, bias, stride, padding, dilation, groups, activation, residual, backend):
    check_tensor(op, "x", x)
    x, weight, bias, residual = autocast_lower(x.device, x, weight, bias, residual)
    unbatched = x.dim() == nd + 1
    channels_last = _memory_format(x) == torch.channels_last
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != nd + 2:
        raise ValueError(f"{op}: x must be [B, C_in, {'L' if nd == 1 else 'H, W'}] (or unbatched), got shape "
                         f"{tuple(x.shape)}")
    check_like(op, "weight", weight, "x", x, same_shape=False)
    if weight.dim() != nd + 2:
        raise ValueError(f"{op}: weight must have {nd + 2} dims [C_out, C_in / groups, *kernel], got "
                         f"{tuple(weight.shape)}")
    g = integer(groups)
    if g is None or g < 1 or x.shape[1] % g or weight.shape[0] % g:
        raise ValueError(f"{op}: groups={groups!r} must be an int >= 1 dividing C_in={x.shape[1]} and "
                         f"C_out={weight.shape[0]}")
    groups = g
    if x.shape[1] == 0:  # torch answers [B, 0, ...], not the bias an empty sum would give: no common answer
        raise ValueError(f"{op}: x has no input channels (C_in = 0, shape {tuple(x.shape)})")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"{op}: weight expects C_in = {weight.shape[1] * groups} input channels "
                         f"(weight.shape[1] * groups) but x has {x.shape[1]}")
    if bias is not None:
        check_like(op, "bias", bias, "x", x, same_shape=False)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    stride = _tuple(op, "stride", stride, nd, 1)
    dilation = _tuple(op, "dilation", dilation, nd, 1)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"{op}: padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
        if padding == "same" and stride != [1] * nd:
            raise ValueError(f"{op}: padding='same' needs stride 1, got stride {tuple(stride)}")
        total = [0 if padding == "valid" else d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        padding = [t // 2 for t in total]
        extra = [t - 2 * p for t, p in zip(total, padding)]  # odd totals: one more on the right, as torch
        if any(extra):
            pads = []
            for e in reversed(extra):
                pads += [0, e]
            x = F.pad(x, pads)
    else:
        padding = _tuple(op, "padding", padding, nd, 0)
    code = check_activation(op, activation)
    out_shape = _out_shape(x, weight, stride, padding, dilation)
    if any(s <= 0 for s in out_shape[2:]):
        raise ValueError(f"{op}: the input {tuple(x.shape[2:])} (padded by {tuple(padding)}) is smaller than the "
                         f"dilated kernel {tuple(d * (k - 1) + 1 for d, k in zip(dilation, weight.shape[2:]))}")
    if residual is not None:
        check_like(op, "residual", residual, "x", x, same_shape=False)
        if unbatched:
            residual = residual.unsqueeze(0)
        if residual.shape != out_shape:
            raise ValueError(f"{op}: residual must have the output's shape {out_shape}, got {tuple(residual.shape)}")
    name = _backend.choose(OP, x.device, x.dtype, backend)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual))
    out, _ = call(conv_fwd, x, weight, bias, residual, stride, padding, dilation, groups, code, needs_grad, name)
    if channels_last:  # the kernels keep x's layout; padding="same" with an even total pads x into NCHW
        out = out.contiguous(memory_format=torch.channels_last)
    return out.squeeze(0) if unbatched else out


def conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrTuple = 1,
           padding: Union[IntOrTuple, str] = 0, dilation: IntOrTuple = 1, groups: int = 1,
           activation: Optional[str] = None, *, residual: Optional[Tensor] = None,
           backend: Optional[str] = None) -> Tensor:
    """``act(F.conv1d(x, weight, bias, stride, padding, dilation, groups)) + residual``, the epilogue fused.

    Args:
        x: [B, C_in, L] or [C_in, L]; weight: [C_out, C_in / groups, K]; bias: [C_out] or None.
        stride, padding (int, tuple, "same" or "valid"), dilation, groups: as torch.nn.functional.conv1d.
        activation: None, "relu", "gelu", "silu" or "tanh", applied after the bias.
        residual: a tensor shaped like the output, added after the activation, or None.
        backend: "cpu", "cuda", "triton", "torch" or None for automatic.
    """
    return _conv_nd("conv1d", 1, x, weight, bias, stride, padding, dilation, groups, activation, residual, backend)


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrTuple = 1,
           padding: Union[IntOrTuple, str] = 0, dilation: IntOrTuple = 1, groups: int = 1,
           activation: Optional[str] = None, *, residual: Optional[Tensor] = None,
           backend: Optional[str] = None) -> Tensor:
    """``act(F.conv2d(x, weight, bias, stride, padding, dilation, groups)) + residual``, the epilogue fused.

    Args as :func:`conv1d`, with x [B, C_in, H, W] (or [C_in, H, W]) and weight [C_out, C_in / groups, KH, KW].
    A channels_last x gives a channels_last output, as torch's: on the CPU (oneDNN's convolution, then the
    epilogue over [positions, C_out]) and in Triton without a copy; the CUDA backend copies to NCHW and back.
    """
    return _conv_nd("conv2d", 2, x, weight, bias, stride, padding, dilation, groups, activation, residual, backend)
