"""text_cnn_pool: the TextCNN block (Kim, 2014) in one op: convolutions of several widths over token
embeddings, bias, activation, and max over each sequence's valid positions, concatenated.

    out[b, off_i + c] = max_{0 <= p <= len_b - k_i} act(bias_i[c] + sum_{j, e} W_i[c, e, j] x[b, p + j, e])

Eager PyTorch (``text_cnn_pool_eager``) transposes x to [B, E, L], writes each width's [B, C, L-k+1]
map, its activation, a masked copy, then reduces it, computing every padded position too. Fused, each
(sequence, width) is a GEMM over the sequence's own valid positions only (x[b, p:p+k, :] is k*E
contiguous numbers, so the windows need no unfolding), the bias, activation and running max are
applied to each tile of positions while it is in cache, and only [B, C] results (with the position
of each maximum) are written. The backward scatters through those positions: it touches k rows of x
per (sequence, channel), not the maps.

Semantics beyond eager's:
- ``lengths`` [B]: position p counts when p + k <= lengths[b] (the window lies inside the sequence).
- A sequence shorter than a width (no valid window) gives 0 for that width's channels, with zero
  gradients, never -inf.
- Ties between positions take the first (lowest) position.

Kernel contract (every backend; ``text_cnn_pool_{fwd,bwd}_torch`` is the specification):
x [B, L, E] contiguous; weights: list of [C_i, E, k_i] (torch.nn.Conv1d's layout); biases: list of
[C_i] or None (the custom ops take an empty list for none); lengths int64 [B] on x's device or None (all L); activation code (ops/_activation.py).
Forward returns (out [B, sum C_i] in x.dtype, argmax int32 [B, sum C_i] (-1 where no window),
pre float32 [B, sum C_i] (the pre-activation at the maximum)). Backward, given grad_out and those,
returns [grad_x, grad_w_0 .. grad_w_{n-1}, grad_b_0 .. grad_b_{n-1}] (no grad_b without biases).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from bignlp_fast import _backend
from bignlp_fast.ops._activation import activation_grad_torch, activation_torch, check_activation
from bignlp_fast.ops._common import (acc_dtype, autocast_lower, call, check_like, check_tensor, custom_op, fresh_like,
                                     grads_or_zeros, kernel, no_zero_grads, register_autograd, values_readable)

OP = _backend.register_op("text_cnn_pool", dtypes={
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    # csrc/cuda/text_cnn_pool.cu (CUDA-core tiles) passes its tests on the CUDA emulation but has not run
    # on a GPU: the automatic choice on CUDA tensors is triton (tensor cores), backend="cuda" runs it
}, auto_order={"cuda": ("triton", "cuda")})


# ---- reference backend ------------------------------------------------------------------------
def _valid_lengths(lengths: Optional[Tensor], B: int, L: int, device) -> Tensor:
    return lengths.to(device) if lengths is not None else torch.full((B,), L, dtype=torch.int64, device=device)


def text_cnn_pool_fwd_torch(x, weights, biases, lengths, activation: int):
    B, L, E = x.shape
    acc = acc_dtype(x.dtype)
    xt = x.to(acc).transpose(1, 2)  # [B, E, L]
    lens = _valid_lengths(lengths, B, L, x.device)
    outs, idxs, pres = [], [], []
    for i, w in enumerate(weights):
        C, k = w.shape[0], w.shape[2]
        if L < k:  # no window in any sequence
            outs.append(x.new_zeros(B, C, dtype=acc))
            idxs.append(torch.full((B, C), -1, dtype=torch.int32, device=x.device))
            pres.append(torch.zeros(B, C, dtype=torch.float32, device=x.device))
            continue
        P = L - k + 1
        if E:
            pre = F.conv1d(xt, w.to(acc), biases[i].to(acc) if biases is not None else None)  # [B, C, P]
        else:  # an empty sum: the bias (F.conv1d answers [B, 0, P] when E == 0)
            pre = (biases[i].to(acc) if biases is not None else x.new_zeros(C, dtype=acc))[:, None].expand(B, C, P)
        invalid = torch.arange(P, device=x.device)[None, :] > (lens[:, None] - k)  # [B, P]
        y = activation_torch(pre, activation).masked_fill(invalid[:, None, :], float("-inf"))
        best, idx = y.max(-1)  # NaN where a window is NaN, as amax
        # the first maximum (torch.max does not promise which of equal values it returns), or first NaN
        at_best = (y == best[..., None]) | (y.isnan() & best.isnan()[..., None])
        first = torch.where(at_best, torch.arange(P, device=x.device), P).amin(-1)
        empty = lens < k
        outs.append(best.masked_fill(empty[:, None], 0.0))
        idxs.append(first.masked_fill(empty[:, None], -1).to(torch.int32))
        pres.append(pre.gather(-1, first.clamp(max=P - 1)[..., None])[..., 0].masked_fill(empty[:, None], 0.0)
                    .to(torch.float32))
    return torch.cat(outs, 1).to(x.dtype), torch.cat(idxs, 1), torch.cat(pres, 1)


def text_cnn_pool_bwd_torch(grad_out, x, weights, biases, argmax, pre, activation: int):
    """The gradients written out: each output depends on one window x[b, p:p+k, :] and one channel."""
    B, L, E = x.shape
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    gp_all = grad_out.to(acc) * activation_grad_torch(pre.to(acc), activation)
    gp_all = gp_all.masked_fill(argmax < 0, 0.0)
    grad_x = torch.zeros_like(xa)
    if L == 0:  # no window anywhere: only zeros flow back (and there is no position to gather)
        grads = [torch.zeros_like(w) for w in weights] + [torch.zeros_like(b) for b in biases or []]
        return [grad_x.to(x.dtype), *grads]
    grad_ws, grad_bs, off = [], [], 0
    for i, w in enumerate(weights):
        C, k = w.shape[0], w.shape[2]
        gp, idx = gp_all[:, off:off + C], argmax[:, off:off + C].long().clamp(min=0)  # [B, C]
        off += C
        pos = idx[..., None] + torch.arange(k, device=x.device)  # [B, C, k] positions in x
        pos = pos.clamp(max=L - 1)  # only for sequences with no window, whose gp is 0
        window = xa.gather(1, pos.reshape(B, C * k, 1).expand(B, C * k, E)).reshape(B, C, k, E)
        grad_ws.append(torch.einsum("bc,bcke->cek", gp, window).to(w.dtype))
        contrib = gp[..., None, None] * w.to(acc).permute(0, 2, 1)[None]  # [B, C, k, E]
        grad_x.scatter_add_(1, pos.reshape(B, C * k, 1).expand(B, C * k, E), contrib.reshape(B, C * k, E))
        if biases is not None:
            grad_bs.append(gp.sum(0).to(biases[i].dtype))
    return [grad_x.to(x.dtype), *grad_ws, *grad_bs]


# ---- custom ops -------------------------------------------------------------------------------
@custom_op("text_cnn_pool_fwd")
def text_cnn_pool_fwd(x: Tensor, weights: list[Tensor], biases: list[Tensor], lengths: Optional[Tensor],
                      activation: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    run = kernel("text_cnn_pool", "fwd", backend)
    return tuple(run(x.contiguous(), [w.contiguous() for w in weights], [b.contiguous() for b in biases] or None,
                     lengths.contiguous() if lengths is not None else None, activation))


@text_cnn_pool_fwd.register_fake
def _(x, weights, biases, lengths, activation, backend):
    C = sum(w.shape[0] for w in weights)
    B = x.shape[0]
    return (x.new_empty(B, C), x.new_empty(B, C, dtype=torch.int32), x.new_empty(B, C, dtype=torch.float32))


@custom_op("text_cnn_pool_bwd")
def text_cnn_pool_bwd(grad_out: Tensor, x: Tensor, weights: list[Tensor], biases: list[Tensor],
                      argmax: Tensor, pre: Tensor, activation: int, backend: str) -> list[Tensor]:
    run = kernel("text_cnn_pool", "bwd", backend)
    return list(run(grad_out.contiguous(), x.contiguous(), [w.contiguous() for w in weights],
                    [b.contiguous() for b in biases] or None, argmax, pre, activation))


@text_cnn_pool_bwd.register_fake
def _(grad_out, x, weights, biases, argmax, pre, activation, backend):
    grads = [fresh_like(x)] + [fresh_like(w) for w in weights]
    return grads + [fresh_like(b) for b in biases]


def _setup_context(ctx, inputs, output):
    x, weights, biases, lengths, activation, backend = inputs
    _, argmax, pre = output
    ctx.n, ctx.has_bias = len(weights), len(biases) > 0
    ctx.save_for_backward(x, argmax, pre, *weights, *biases)
    ctx.activation, ctx.backend = activation, backend
    no_zero_grads(ctx, output, 1)


def _backward(ctx, grad_out, _g_argmax, _g_pre):
    (grad_out,) = grads_or_zeros(ctx, grad_out)
    x, argmax, pre, *rest = ctx.saved_tensors
    weights, biases = rest[:ctx.n], rest[ctx.n:]
    grads = call(text_cnn_pool_bwd, grad_out, x, weights, biases, argmax, pre, ctx.activation, ctx.backend)
    grad_b = grads[1 + ctx.n:] if ctx.has_bias else []
    return grads[0], grads[1:1 + ctx.n], grad_b, None, None, None


register_autograd(text_cnn_pool_fwd, _backward, _setup_context)


@torch.library.register_vmap("bignlp_fast::text_cnn_pool_fwd")
def _(info, in_dims, x, weights, biases, lengths, activation, backend):
    """torch.func.vmap over x (and lengths): the mapped dimension joins the batch, [N, B, L, E] as
    [N * B, L, E]. torch cannot generate this rule for an op with list arguments. Kernels mapped
    over (per-example weights) are refused: that is a different convolution per example."""
    x_dim, w_dims, b_dims, len_dim = in_dims[:4]
    if any(d is not None for d in (w_dims or [])) or any(d is not None for d in (b_dims or [])):
        raise NotImplementedError("text_cnn_pool: vmap over the weights or biases is not supported; map over x "
                                  "(and lengths) only")
    n = info.batch_size
    if x_dim is None:
        x = x.unsqueeze(0).expand(n, *x.shape)
    x = x.movedim(x_dim or 0, 0)
    B = x.shape[1]
    if lengths is not None:
        lengths = lengths.movedim(len_dim, 0) if len_dim is not None else lengths.unsqueeze(0).expand(n, B)
        lengths = lengths.reshape(n * B)
    outs = text_cnn_pool_fwd(x.reshape(n * B, *x.shape[2:]), weights, biases, lengths, activation, backend)
    return tuple(o.view(n, B, *o.shape[1:]) for o in outs), (0, 0, 0)


# ---- public op --------------------------------------------------------------------------------
def text_cnn_pool(x: Tensor, weights: Sequence[Tensor], biases: Optional[Sequence[Tensor]] = None,
                  activation: Optional[str] = "relu", lengths: Optional[Tensor] = None, *,
                  backend: Optional[str] = None) -> Tensor:
    """Multi-width conv1d over token embeddings + bias + activation + max over valid positions.

    Args:
        x: [B, L, E] token embeddings (batch, length, embedding): no transpose needed.
        weights: conv kernels [C_i, E, k_i] (torch.nn.Conv1d(E, C_i, k_i).weight), e.g. widths 3, 4, 5.
        biases: one [C_i] per weight, or None.
        activation: None, "relu", "gelu", "silu" or "tanh".
        lengths: int32 / int64 [B], each sequence's number of valid tokens (in [0, L]), or None for all
            L. Checked when on the CPU; on a GPU they are not read back (a value past L counts as L).
        backend: "cpu", "triton", "torch" or None for automatic.

    Returns:
        [B, sum C_i]: for each width in order, each channel's maximum over the sequence's windows;
        0 for a sequence shorter than the width.
    """
    op = "text_cnn_pool"
    check_tensor(op, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, L, E], got shape {tuple(x.shape)}")
    B, L, E = x.shape
    x, *weights = autocast_lower(x.device, x, *weights)
    if biases is not None:
        biases = list(autocast_lower(x.device, *biases))
    if not weights:
        raise ValueError(f"{op}: weights must hold at least one conv kernel")
    for i, w in enumerate(weights):
        check_like(op, f"weights[{i}]", w, "x", x, same_shape=False)
        if w.dim() != 3 or w.shape[1] != E or w.shape[2] < 1:
            raise ValueError(f"{op}: weights[{i}] must be [C, E={E}, k] (nn.Conv1d's layout), got {tuple(w.shape)}")
    if biases is not None:
        biases = list(biases)
        if len(biases) != len(weights):
            raise ValueError(f"{op}: biases has {len(biases)} entries but weights has {len(weights)}")
        for i, (b, w) in enumerate(zip(biases, weights)):
            check_like(op, f"biases[{i}]", b, "x", x, same_shape=False)
            if b.shape != w.shape[:1]:
                raise ValueError(f"{op}: biases[{i}] must have shape ({w.shape[0]},), got {tuple(b.shape)}")
    if lengths is not None:
        if not isinstance(lengths, Tensor) or lengths.dtype not in (torch.int32, torch.int64) or lengths.shape != (B,):
            raise ValueError(f"{op}: lengths must be an integer tensor of shape ({B},)")
        # a data-dependent check, made where it costs no wait: on CPU lengths (a GPU tensor's values
        # would wait for the GPU; the GPU kernels count a length past L as L and a negative one as 0),
        # and not while torch.compile traces (the CPU kernel checks again)
        if lengths.device.type == "cpu" and values_readable(lengths) and lengths.numel() and (
                int(lengths.min()) < 0 or int(lengths.max()) > L):
            raise ValueError(f"{op}: lengths must lie in [0, L={L}], got values in "
                             f"[{int(lengths.min())}, {int(lengths.max())}]")
        lengths = lengths.to(device=x.device, dtype=torch.int64)
    code = check_activation(op, activation)
    name = _backend.choose(OP, x.device, x.dtype, backend)
    return call(text_cnn_pool_fwd, x, weights, biases or [], lengths, code, name)[0]


def text_cnn_pool_eager(x: Tensor, weights: Sequence[Tensor], biases: Optional[Sequence[Tensor]] = None,
                        activation: Optional[str] = "relu", lengths: Optional[Tensor] = None) -> Tensor:
    """The eager code a user writes (the benchmark's reference): conv1d + activation + masked max over
    time per width, then cat. A sequence shorter than a width gives -inf there (not 0)."""
    code = check_activation("text_cnn_pool", activation)
    xt = x.transpose(1, 2)
    outs = []
    for i, w in enumerate(weights):
        y = activation_torch(F.conv1d(xt, w, biases[i] if biases is not None else None), code)
        if lengths is not None:
            invalid = torch.arange(y.shape[-1], device=x.device)[None, :] > (lengths[:, None] - w.shape[-1])
            y = y.masked_fill(invalid[:, None, :], float("-inf"))
        outs.append(y.amax(-1))
    return torch.cat(outs, 1)
