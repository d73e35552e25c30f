"""One LayerNorm-LSTM layer in one direction, fused: ``layer_norm_lstm_layer`` runs the whole time
loop inside one op, forward and backward (Ba et al., 2016: layer normalisation of the gate
pre-activations and of the cell).

The input side is done before the op, for all steps at once, by the caller:
``xw = ln_ih(x @ W_ih^T)`` (a GEMM and a LayerNorm over 4H; their autograd gives dW_ih, ln_ih's
gradients and dx). The op runs, per step and batch row::

    a     = h @ W_hh^T                                   # [4H], one recurrent GEMM per step
    pre   = xw[t] + gamma_h * norm(a) + beta_h           # ln_hh over all 4 gates of the row
    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of pre  # torch.nn.LSTM's gate order
    c'    = f * c + i * g
    h'    = o * tanh(gamma_c * norm(c') + beta_c)        # ln_c over H

with ``norm(v) = (v - mean(v)) / sqrt(var(v) + eps)`` (biased variance, as torch.nn.LayerNorm).

Kernel contract (every backend; ``layer_norm_lstm_{fwd,bwd}_torch`` below is the specification):
- xw [T, B, 4H] time-major; w_hh [4H, H]; gamma_h, beta_h [4H] or None (scale 1 / shift 0);
  gamma_c, beta_c [H] or None; h0, c0 [B, H]; one dtype; contiguous; lengths: int64 [B] on the
  CPU or None (all T).
- Step t of sequence b is active when t < lengths[b]; inactive steps keep the state and output
  zeros, so h_n is the state after each sequence's own last step. ``reverse`` walks t from T-1 down
  to 0: a sequence's reverse pass starts at its own last step, as torch's packed sequences do.
- Forward returns out [T, B, H], h_n, c_n [B, H] and a float32 workspace the same backend's
  backward reads ([0] from the torch reference, whose backward recomputes, and from any backend
  when ``save_workspace`` is false: inference). Backward returns d_xw, d_w_hh, d_gamma_h,
  d_beta_h, d_gamma_c, d_beta_c ([0] for an absent one), d_h0, d_c0.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bignlp_fast import _backend
from bignlp_fast.ops._common import (acc_dtype, call, check_lengths, check_operands, check_tensor, check_time_major,
                                     contiguous, custom_op, fresh_like, grads_or_zeros, kernel, no_zero_grads,
                                     register_autograd)

OP = _backend.register_op(
    "layer_norm_lstm",
    dtypes={"cpu": (torch.float32, torch.bfloat16)},
    missing={"cuda": "no CUDA kernel for LayerNormLSTM yet", "triton": "no Triton kernel for LayerNormLSTM yet"},
)


# ---- reference backend ------------------------------------------------------------------------
def layer_norm_lstm_math(xw: Tensor, w_hh: Tensor, gamma_h: Optional[Tensor], beta_h: Optional[Tensor],
                         gamma_c: Optional[Tensor], beta_c: Optional[Tensor], h0: Tensor, c0: Tensor, eps: float,
                         reverse: bool, lengths: Optional[Tensor] = None):
    """The layer as a plain differentiable loop over time: (out [T, B, H], h_n, c_n)."""
    hidden = w_hh.shape[1]
    h, c = h0, c0
    outs = [None] * xw.shape[0]
    for t in (range(xw.shape[0] - 1, -1, -1) if reverse else range(xw.shape[0])):
        a = F.layer_norm(h @ w_hh.t(), (4 * hidden,), gamma_h, beta_h, eps)
        i, f, g, o = (xw[t] + a).chunk(4, -1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(F.layer_norm(c_new, (hidden,), gamma_c, beta_c, eps))
        if lengths is None:
            h, c, outs[t] = h_new, c_new, h_new
        else:
            active = (t < lengths.to(xw.device))[:, None]
            h, c = torch.where(active, h_new, h), torch.where(active, c_new, c)
            outs[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    return torch.stack(outs), h, c


def _acc(tensors, dtype):
    return [None if t is None else t.to(dtype) for t in tensors]


def layer_norm_lstm_fwd_torch(xw, w_hh, gamma_h, beta_h, gamma_c, beta_c, h0, c0, lengths, eps, reverse,
                              save_workspace):
    acc = acc_dtype(xw.dtype)
    out, h_n, c_n = layer_norm_lstm_math(*_acc((xw, w_hh, gamma_h, beta_h, gamma_c, beta_c, h0, c0), acc), eps,
                                         reverse, lengths)
    return out.to(xw.dtype), h_n.to(xw.dtype), c_n.to(xw.dtype), xw.new_empty(0, dtype=acc)


def _norm(v: Tensor, eps: float):
    """(v - mean) * rstd over the last dimension, and rstd [.., 1] (biased variance)."""
    centred = v - v.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    return centred * rstd, rstd


def _norm_backward(dy: Tensor, vhat: Tensor, rstd: Tensor) -> Tensor:
    """The gradient of v for y = norm(v), given dy and norm(v)."""
    return rstd * (dy - dy.mean(-1, keepdim=True) - vhat * (dy * vhat).mean(-1, keepdim=True))


def layer_norm_lstm_bwd_torch(grad_out, grad_h_n, grad_c_n, xw, w_hh, gamma_h, beta_h, gamma_c, beta_c, h0, c0,
                              lengths, workspace, eps, reverse):
    """The reference backward through time, written out: recompute every step's activations, then walk
    the steps in reverse, as the fused backends do (da: the gradient of a = h W_hh^T)."""
    acc = acc_dtype(xw.dtype)
    x, w = xw.to(acc), w_hh.to(acc)
    four_h, hidden = w.shape
    ones = lambda n: torch.ones(n, dtype=acc, device=x.device)  # noqa: E731
    gh = gamma_h.to(acc) if gamma_h is not None else ones(four_h)
    bh = beta_h.to(acc) if beta_h is not None else torch.zeros_like(gh)
    gc = gamma_c.to(acc) if gamma_c is not None else ones(hidden)
    bc = beta_c.to(acc) if beta_c is not None else torch.zeros_like(gc)
    steps = list(range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0]))
    batch = x.shape[1]
    active = [((t < lengths) if lengths is not None else torch.ones(batch, dtype=torch.bool))[:, None].to(x.device)
              for t in range(x.shape[0])]
    h, c = h0.to(acc), c0.to(acc)
    saved = {}
    for t in steps:
        ahat, ra = _norm(h @ w.t(), eps)
        i, f, g, o = (x[t] + gh * ahat + bh).chunk(4, -1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        chat, rc = _norm(c_new, eps)
        tn = torch.tanh(gc * chat + bc)
        saved[t] = (h, c, ahat, ra, i, f, g, o, chat, rc, tn)
        h, c = torch.where(active[t], o * tn, h), torch.where(active[t], c_new, c)
    d_x = torch.zeros_like(x)
    d_w, d_gh, d_bh = torch.zeros_like(w), torch.zeros_like(gh), torch.zeros_like(gh)
    d_gc, d_bc = torch.zeros_like(gc), torch.zeros_like(gc)
    dh, dc = grad_h_n.to(acc), grad_c_n.to(acc)
    for t in reversed(steps):
        h_prev, c_prev, ahat, ra, i, f, g, o, chat, rc, tn = saved[t]
        a = active[t]  # an inactive step has no gradient of its own: dh and dc pass through it
        dht = torch.where(a, dh + grad_out[t].to(acc), torch.zeros_like(dh))
        d_o = dht * tn * o * (1 - o)
        dn = dht * o * (1 - tn * tn)  # the gradient of ln_c's output
        d_gc += (dn * chat).sum(0)
        d_bc += dn.sum(0)
        dct = dc + _norm_backward(dn * gc, chat, rc)
        dpre = torch.cat([dct * g * i * (1 - i), dct * c_prev * f * (1 - f), dct * i * (1 - g * g), d_o], -1)
        dpre = torch.where(a, dpre, torch.zeros_like(dpre))
        dc = torch.where(a, dct * f, dc)
        d_x[t] = dpre
        d_gh += (dpre * ahat).sum(0)
        d_bh += dpre.sum(0)
        da = _norm_backward(dpre * gh, ahat, ra)
        d_w += da.t() @ h_prev
        dh = torch.where(a, da @ w, dh)

    def out(grad, like):  # each absent gradient its own tensor: a custom op's outputs may not alias
        return grad.to(like.dtype) if like is not None else xw.new_empty(0)

    return (out(d_x, xw), out(d_w, w_hh), out(d_gh, gamma_h), out(d_bh, beta_h), out(d_gc, gamma_c),
            out(d_bc, beta_c), out(dh, h0), out(dc, c0))


# ---- custom ops -------------------------------------------------------------------------------
@custom_op("layer_norm_lstm_fwd")
def layer_norm_lstm_fwd(xw: Tensor, w_hh: Tensor, gamma_h: Optional[Tensor], beta_h: Optional[Tensor],
                        gamma_c: Optional[Tensor], beta_c: Optional[Tensor], h0: Tensor, c0: Tensor,
                        lengths: Optional[Tensor], eps: float, reverse: bool, save_workspace: bool,
                        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    run = kernel("layer_norm_lstm", "fwd", backend)
    return tuple(run(xw.contiguous(), w_hh.contiguous(), contiguous(gamma_h), contiguous(beta_h),
                     contiguous(gamma_c), contiguous(beta_c), h0.contiguous(), c0.contiguous(), lengths, eps, reverse,
                     save_workspace))


def workspace_width(hidden: int, backend: str) -> int:
    """Floats per (step, batch row) the cpu backend saves for its backward (csrc/cpu/layer_norm_lstm.cpp:
    12 segments of the hidden size rounded up to 16, and two reciprocal deviations); the torch
    reference saves nothing."""
    if backend == "torch":
        return 0
    return 12 * (-(-hidden // 16) * 16) + 2


@layer_norm_lstm_fwd.register_fake
def _(xw, w_hh, gamma_h, beta_h, gamma_c, beta_c, h0, c0, lengths, eps, reverse, save_workspace, backend):
    t, b, _ = xw.shape
    hidden = w_hh.shape[1]
    ws = workspace_width(hidden, backend) if save_workspace else 0
    return (xw.new_empty(t, b, hidden), xw.new_empty(b, hidden), xw.new_empty(b, hidden),
            xw.new_empty((t, b, ws) if ws else (0,), dtype=acc_dtype(xw.dtype)))


@custom_op("layer_norm_lstm_bwd")
def layer_norm_lstm_bwd(grad_out: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, xw: Tensor, w_hh: Tensor,
                        gamma_h: Optional[Tensor], beta_h: Optional[Tensor], gamma_c: Optional[Tensor],
                        beta_c: Optional[Tensor], h0: Tensor, c0: Tensor, lengths: Optional[Tensor],
                        workspace: Tensor, eps: float, reverse: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                              Tensor]:
    run = kernel("layer_norm_lstm", "bwd", backend)
    return tuple(run(grad_out.contiguous(), grad_h_n.contiguous(), grad_c_n.contiguous(), xw.contiguous(),
                     w_hh.contiguous(), contiguous(gamma_h), contiguous(beta_h), contiguous(gamma_c),
                     contiguous(beta_c), h0.contiguous(), c0.contiguous(), lengths, workspace, eps, reverse))


@layer_norm_lstm_bwd.register_fake
def _(grad_out, grad_h_n, grad_c_n, xw, w_hh, gamma_h, beta_h, gamma_c, beta_c, h0, c0, lengths, workspace, eps,
      reverse, backend):
    like = lambda t: fresh_like(t) if t is not None else xw.new_empty(0)  # noqa: E731
    return tuple(like(t) for t in (xw, w_hh, gamma_h, beta_h, gamma_c, beta_c, h0, c0))


def _setup_context(ctx, inputs, output):
    xw, w_hh, gamma_h, beta_h, gamma_c, beta_c, h0, c0, lengths, eps, reverse, _save, backend = inputs
    ctx.save_for_backward(xw, w_hh, gamma_h, beta_h, gamma_c, beta_c, h0, c0, lengths, output[3])
    ctx.args = (eps, reverse, backend)
    ctx.present = tuple(t is not None for t in (gamma_h, beta_h, gamma_c, beta_c))
    no_zero_grads(ctx, output, 3)


def _backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_ws):
    xw, w_hh, gamma_h, beta_h, gamma_c, beta_c, h0, c0, lengths, workspace = ctx.saved_tensors
    eps, reverse, backend = ctx.args
    grad_out, grad_h_n, grad_c_n = grads_or_zeros(ctx, grad_out, grad_h_n, grad_c_n)
    grads = call(layer_norm_lstm_bwd, grad_out, grad_h_n, grad_c_n, xw, w_hh, gamma_h, beta_h, gamma_c, beta_c,
                 h0, c0, lengths, workspace, eps, reverse, backend)
    d_xw, d_w_hh, d_gh, d_bh, d_gc, d_bc, d_h0, d_c0 = grads
    params = [g if present else None for g, present in zip((d_gh, d_bh, d_gc, d_bc), ctx.present)]
    return (d_xw, d_w_hh, *params, d_h0, d_c0, None, None, None, None, None)


register_autograd(layer_norm_lstm_fwd, _backward, _setup_context)


# ---- public op --------------------------------------------------------------------------------
def layer_norm_lstm_layer(xw: Tensor, w_hh: Tensor, gamma_h: Optional[Tensor], beta_h: Optional[Tensor],
                          gamma_c: Optional[Tensor], beta_c: Optional[Tensor], h0: Tensor, c0: Tensor,
                          eps: float = 1e-5, reverse: bool = False, lengths: Optional[Tensor] = None, *,
                          backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The time loop of one LayerNorm-LSTM layer in one direction (see the module docstring).

    Args:
        xw: [T, B, 4H], the normalised input projection of every step, ``ln_ih(x @ W_ih^T)``.
        w_hh: [4H, H]. gamma_h, beta_h: [4H] (ln_hh's weight and bias) or None.
        gamma_c, beta_c: [H] (ln_c's weight and bias) or None. h0, c0: [B, H].
        eps: the LayerNorms' epsilon. reverse: run from the last step to the first.
        lengths: int64 [B] (CPU), each sequence's length; None: all T steps.
    Returns (out [T, B, H], h_n [B, H], c_n [B, H]).
    """
    op = "layer_norm_lstm_layer"
    t, b, gh = check_time_major(op, xw, "4H")
    check_tensor(op, "w_hh", w_hh)
    if w_hh.dim() != 2 or w_hh.shape[0] != gh or gh != 4 * w_hh.shape[1]:
        raise ValueError(f"{op}: w_hh must be [4H, H] with 4H = {gh} (xw's last dimension), got "
                         f"{tuple(w_hh.shape)}")
    hidden = w_hh.shape[1]
    for name, state in (("h0", h0), ("c0", c0)):
        if state is None:
            raise TypeError(f"{op}: {name} is required (zeros for a fresh state)")
    check_operands(op, xw, (("w_hh", w_hh, (gh, hidden)), ("gamma_h", gamma_h, (gh,)), ("beta_h", beta_h, (gh,)),
                            ("gamma_c", gamma_c, (hidden,)), ("beta_c", beta_c, (hidden,)),
                            ("h0", h0, (b, hidden)), ("c0", c0, (b, hidden))))
    if not eps > 0:
        raise ValueError(f"{op}: eps must be positive, got {eps}")
    check_lengths(op, lengths, b, t)
    name = _backend.choose(OP, xw.device, xw.dtype, backend)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (xw, w_hh, gamma_h, beta_h, gamma_c, beta_c, h0, c0))
    out, h_n, c_n, _ws = call(layer_norm_lstm_fwd, xw, w_hh, gamma_h, beta_h, gamma_c, beta_c, h0, c0, lengths,
                                             float(eps), bool(reverse), save, name)
    return out, h_n, c_n
