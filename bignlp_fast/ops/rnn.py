"""One recurrent layer in one direction, fused: ``rnn_layer`` runs the whole time loop of an LSTM,
GRU or plain RNN (tanh / relu) inside one op, forward and backward.

The input projection for all time steps is one GEMM done before the op (``xw = x @ W_ih^T + b_ih``,
by the caller: F.linear, whose autograd also gives dW_ih and dx). The op runs, per step, the
recurrent GEMM ``h @ W_hh^T + b_hh`` and one fused update of the gates and state; its backward goes
through time the same way and leaves the weight gradients to large GEMMs over all steps at the end.
Multi-layer and bidirectional stacks of this op are :func:`lstm`, :func:`gru` and :func:`rnn` (the
functional forms of torch.nn.LSTM / GRU / RNN, at the end of this file), which the modules of
bignlp_fast.nn run.

Kernel contract (every backend: csrc/cpu/rnn.cpp, csrc/cuda/rnn.cu, kernels/rnn.py;
``rnn_{fwd,bwd}_torch`` below is the specification):
- mode: "lstm" (gates i, f, g, o), "gru" (r, z, n), "rnn_tanh", "rnn_relu": torch.nn's gate order.
- xw [T, B, G*H] (time-major, contiguous); w_hh [G*H, S] where S is the state size (H, or P with an
  LSTM projection); b_hh [G*H] or None; h0 [B, S]; c0 [B, H] (LSTM) or None; w_hr [P, H] (LSTM with
  proj_size) or None; lengths: int64 [B] on the CPU or None (all T).
- Step t of sequence b is active when t < lengths[b]. Inactive steps keep the state and output
  zeros, so h_n is the state after each sequence's own last step. ``reverse`` walks t from T-1 down
  to 0: a sequence's reverse pass starts at its own last step, as torch's packed sequences do.
- LSTM: i, f, o = sigmoid, g = tanh; c' = f c + i g; m = o tanh(c'); h' = m W_hr^T (or m).
  GRU: r, z = sigmoid(xw + h W_hh^T + b_hh) parts; n = tanh(xw_n + r * (h W_hn^T + b_hn));
  h' = (1 - z) n + z h. RNN: h' = act(xw + h W_hh^T + b_hh).
- Forward returns out [T, B, S], h_n [B, S], c_n [B, H] (LSTM; else [0]) and a workspace the same
  backend's backward reads (its size: :func:`workspace_width`; [0] for the torch reference, whose
  backward recomputes, and for any backend when ``save_workspace`` is false: inference). Backward returns d_xw, d_w_hh, d_b_hh ([0] without b_hh), d_h0, d_c0 ([0] without
  c0), d_w_hr ([0] without w_hr).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bignlp_fast import _backend
from bignlp_fast.ops._common import (PLAIN_TENSORS, acc_dtype, autocast_enabled, call, check_choice, check_lengths,
                                     check_operands, check_tensor, check_time_major, contiguous, cpu_lane_open,
                                     custom_op, fresh_like, grads_or_zeros, kernel, no_zero_grads, register_autograd)
from bignlp_fast.ops.linear import _packable, _packed, linear, linear_is_faster, uses_packed_copy

OP = _backend.register_op(
    "rnn",
    dtypes={"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.float16, torch.bfloat16),
            "triton": (torch.float32, torch.float16, torch.bfloat16)},
    # csrc/cuda/rnn.cu (cuBLAS step GEMMs + fused gate kernels) is compile-checked but has not run on a
    # GPU yet: the automatic choice on CUDA tensors stays triton, backend="cuda" runs it
    auto_order={"cuda": ("triton", "cuda")},
)

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def workspace_width(mode: str, hidden: int, state: int, backend: str) -> int:
    """Floats per (step, batch row) the fused backends save for the backward: the post-activation
    gates, the state after the step, and per mode: LSTM the cell (and m with a projection), GRU
    h W_hn^T + b_hn. The torch reference saves nothing (its backward recomputes). An LSTM has a projection
    exactly when state != hidden (rnn_layer refuses w_hr with state >= hidden, as torch.nn.LSTM does)."""
    if backend == "torch":
        return 0
    extra = {"lstm": hidden + (hidden if state != hidden else 0), "gru": hidden, "rnn_tanh": 0, "rnn_relu": 0}
    return GATES[mode] * hidden + state + extra[mode]


# ---- reference backend ------------------------------------------------------------------------
def _cell(mode: str, xw_t: Tensor, h: Tensor, c: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
          w_hr: Optional[Tensor]):
    """One step of every sequence: (new h, new c, the activations the backward needs:
    LSTM (i, f, g, o, c', m), GRU (r, z, n, h W_hn^T + b_hn), RNN (h',))."""
    hw = h @ w_hh.t()
    if b_hh is not None:
        hw = hw + b_hh
    if mode == "lstm":
        i, f, g, o = (xw_t + hw).chunk(4, -1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        m = o * torch.tanh(c_new)
        return (m @ w_hr.t() if w_hr is not None else m), c_new, (i, f, g, o, c_new, m)
    if mode == "gru":
        xr, xz, xn = xw_t.chunk(3, -1)
        hr, hz, hn = hw.chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None, (r, z, n, hn)
    pre = xw_t + hw
    h_new = torch.tanh(pre) if mode == "rnn_tanh" else torch.relu(pre)
    return h_new, None, (h_new,)


def rnn_layer_math(mode: str, xw: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
                   w_hr: Optional[Tensor], lengths: Optional[Tensor], reverse: bool):
    """The layer as a plain differentiable loop over time: (out [T, B, S], h_n, c_n or None)."""
    steps = range(xw.shape[0] - 1, -1, -1) if reverse else range(xw.shape[0])
    h, c = h0, c0
    outs = [None] * xw.shape[0]
    lengths = lengths.to(xw.device) if lengths is not None else None
    for t in steps:
        h_new, c_new, _ = _cell(mode, xw[t], h, c, w_hh, b_hh, w_hr)
        if lengths is None:
            h, c, outs[t] = h_new, c_new, h_new
        else:
            active = (t < lengths)[:, None]
            h = torch.where(active, h_new, h)
            c = torch.where(active, c_new, c) if c is not None else None
            outs[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    return torch.stack(outs), h, c


def _acc(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def rnn_fwd_torch(xw, w_hh, b_hh, h0, c0, w_hr, lengths, mode, reverse, save_workspace):
    acc = acc_dtype(xw.dtype)
    out, h_n, c_n = rnn_layer_math(mode, xw.to(acc), w_hh.to(acc), _acc(b_hh, acc), h0.to(acc), _acc(c0, acc),
                                   _acc(w_hr, acc), lengths, reverse)
    dt = xw.dtype
    return out.to(dt), h_n.to(dt), (c_n.to(dt) if c_n is not None else xw.new_empty(0)), xw.new_empty(0, dtype=acc)


def rnn_bwd_torch(grad_out, grad_h_n, grad_c_n, xw, w_hh, b_hh, h0, c0, w_hr, lengths, workspace, mode, reverse):
    """The reference backward through time, written out: recompute every step's activations, then walk
    the steps in reverse, as the fused backends do (dG: the gradient of h W_hh^T + b_hh)."""
    acc = acc_dtype(xw.dtype)
    x, w, b, wr = xw.to(acc), w_hh.to(acc), _acc(b_hh, acc), _acc(w_hr, acc)
    t_len, batch = x.shape[:2]
    steps = list(range(t_len - 1, -1, -1) if reverse else range(t_len))
    active = [(t < lengths)[:, None] if lengths is not None else torch.ones(batch, 1, dtype=torch.bool)
              for t in range(t_len)]
    active = [a.to(x.device) for a in active]
    # forward, keeping what the backward needs
    h, c = h0.to(acc), _acc(c0, acc)
    saved = {}
    for t in steps:
        h_new, c_new, parts = _cell(mode, x[t], h, c, w, b, wr)
        saved[t] = (h, c, *parts) if mode == "lstm" else (h, *parts)
        h = torch.where(active[t], h_new, h)
        if c is not None:
            c = torch.where(active[t], c_new, c)
    # backward
    d_x, d_g = torch.zeros_like(x), torch.zeros_like(x)
    d_w, d_wr = torch.zeros_like(w), torch.zeros_like(wr) if wr is not None else None
    dh = grad_h_n.to(acc)
    dc = grad_c_n.to(acc) if c0 is not None else None
    for t in reversed(steps):
        a = active[t]
        dht = torch.where(a, dh + grad_out[t].to(acc), torch.zeros_like(dh))  # h_new's gradient
        if mode == "lstm":
            h_prev, c_prev, i, f, g, o, c_new, m = saved[t]
            if wr is not None:
                d_wr += dht.t() @ m
                dm = dht @ wr
            else:
                dm = dht
            tc = torch.tanh(c_new)
            dct = torch.where(a, dc + dm * o * (1 - tc * tc), torch.zeros_like(dc))
            dg_t = torch.cat([dct * g * i * (1 - i), dct * c_prev * f * (1 - f), dct * i * (1 - g * g),
                              dm * tc * o * (1 - o)], -1)
            dg_t = torch.where(a, dg_t, torch.zeros_like(dg_t))
            dc = torch.where(a, dct * f, dc)
            dx_t, dh_direct = dg_t, 0
        elif mode == "gru":
            h_prev, r, z, n, hn = saved[t]
            dn_pre = dht * (1 - z) * (1 - n * n)
            dr_pre = dn_pre * hn * r * (1 - r)
            dz_pre = dht * (h_prev - n) * z * (1 - z)
            dx_t = torch.cat([dr_pre, dz_pre, dn_pre], -1)
            dg_t = torch.cat([dr_pre, dz_pre, dn_pre * r], -1)
            dh_direct = dht * z
        else:
            h_prev, h_new = saved[t]
            dg_t = dht * ((1 - h_new * h_new) if mode == "rnn_tanh" else (h_new > 0).to(acc))
            dx_t, dh_direct = dg_t, 0
        d_x[t], d_g[t] = dx_t, dg_t
        d_w += dg_t.t() @ h_prev
        dh = torch.where(a, dh_direct + dg_t @ w, dh)  # an inactive step passes the gradient through
    def empty():  # each absent gradient its own tensor: a custom op's outputs may not alias
        return xw.new_empty(0)

    return (d_x.to(xw.dtype), d_w.to(w_hh.dtype), d_g.sum((0, 1)).to(b_hh.dtype) if b_hh is not None else empty(),
            dh.to(h0.dtype), dc.to(c0.dtype) if c0 is not None else empty(),
            d_wr.to(w_hr.dtype) if w_hr is not None else empty())


# ---- custom ops -------------------------------------------------------------------------------
@custom_op("rnn_fwd")
def rnn_fwd(xw: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
                  w_hr: Optional[Tensor], lengths: Optional[Tensor], mode: str, reverse: bool, save_workspace: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    run = kernel("rnn", "fwd", backend)
    return tuple(run(xw.contiguous(), w_hh.contiguous(), contiguous(b_hh), h0.contiguous(), contiguous(c0),
                     contiguous(w_hr), lengths, mode, reverse, save_workspace))


@rnn_fwd.register_fake
def _(xw, w_hh, b_hh, h0, c0, w_hr, lengths, mode, reverse, save_workspace, backend):
    t, b, _ = xw.shape
    state, hidden = w_hh.shape[1], w_hh.shape[0] // GATES[mode]
    ws = workspace_width(mode, hidden, state, backend) if save_workspace else 0
    return (xw.new_empty(t, b, state), xw.new_empty(b, state),
            xw.new_empty(b, hidden) if c0 is not None else xw.new_empty(0),
            xw.new_empty((t, b, ws) if ws else (0,), dtype=acc_dtype(xw.dtype)))


@custom_op("rnn_bwd")
def rnn_bwd(grad_out: Tensor, grad_h_n: Tensor, grad_c_n: Optional[Tensor], xw: Tensor, w_hh: Tensor,
                  b_hh: Optional[Tensor], h0: Tensor, c0: Optional[Tensor], w_hr: Optional[Tensor],
                  lengths: Optional[Tensor], workspace: Tensor, mode: str, reverse: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    run = kernel("rnn", "bwd", backend)
    return tuple(run(grad_out.contiguous(), grad_h_n.contiguous(), contiguous(grad_c_n), xw.contiguous(),
                     w_hh.contiguous(), contiguous(b_hh), h0.contiguous(), contiguous(c0), contiguous(w_hr), lengths,
                     workspace, mode, reverse))


@rnn_bwd.register_fake
def _(grad_out, grad_h_n, grad_c_n, xw, w_hh, b_hh, h0, c0, w_hr, lengths, workspace, mode, reverse, backend):
    like = lambda t: fresh_like(t) if t is not None else xw.new_empty(0)  # noqa: E731
    return like(xw), like(w_hh), like(b_hh), like(h0), like(c0), like(w_hr)


def _setup_context(ctx, inputs, output):
    xw, w_hh, b_hh, h0, c0, w_hr, lengths, mode, reverse, _save, backend = inputs
    _out, _h_n, _c_n, workspace = output
    ctx.save_for_backward(xw, w_hh, b_hh, h0, c0, w_hr, lengths, workspace)
    ctx.args = (mode, reverse, backend)
    ctx.has = (b_hh is not None, c0 is not None, w_hr is not None)
    no_zero_grads(ctx, output, 3)


def _backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_ws):
    grad_out, grad_h_n, grad_c_n = grads_or_zeros(ctx, grad_out, grad_h_n, grad_c_n)
    xw, w_hh, b_hh, h0, c0, w_hr, lengths, workspace = ctx.saved_tensors
    mode, reverse, backend = ctx.args
    has_b, has_c, has_r = ctx.has
    d_xw, d_w_hh, d_b_hh, d_h0, d_c0, d_w_hr = call(rnn_bwd,
        grad_out, grad_h_n, grad_c_n if has_c else None, xw, w_hh, b_hh, h0, c0, w_hr, lengths, workspace, mode,
        reverse, backend)
    return (d_xw, d_w_hh, d_b_hh if has_b else None, d_h0, d_c0 if has_c else None, d_w_hr if has_r else None,
            None, None, None, None, None)


register_autograd(rnn_fwd, _backward, _setup_context)


# ---- public op --------------------------------------------------------------------------------
def rnn_layer(mode: str, xw: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, c0: Optional[Tensor] = None,
              w_hr: Optional[Tensor] = None, lengths: Optional[Tensor] = None, reverse: bool = False, *,
              backend: Optional[str] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The time loop of one recurrent layer in one direction (see the module docstring).

    Args:
        mode: "lstm", "gru", "rnn_tanh" or "rnn_relu".
        xw: [T, B, G*H], the input projection of every step (x @ W_ih^T + b_ih).
        w_hh: [G*H, S]; b_hh: [G*H] or None; h0: [B, S]; c0: [B, H] for "lstm", else None;
        w_hr: [P, H] for an LSTM with projection (then S = P), else None.
        lengths: int64 [B] (CPU), each sequence's length; None: all T steps.
        reverse: run from the last step to the first.
    Returns (out [T, B, S], h_n [B, S], c_n [B, H] or None).
    """
    op = "rnn_layer"
    check_choice(op, "mode", mode, tuple(GATES))
    t, b, gh = check_time_major(op, xw)
    gates = GATES[mode]
    if w_hh.dim() != 2 or w_hh.shape[0] != gh or gh % gates:
        raise ValueError(f"{op}: w_hh must be [{gh}, S] for xw's {gh} = {gates} gates x hidden, got "
                         f"{tuple(w_hh.shape)}")
    hidden, state = gh // gates, w_hh.shape[1]
    check_operands(op, xw, (("b_hh", b_hh, (gh,)), ("h0", h0, (b, state)), ("c0", c0, (b, hidden)),
                            ("w_hr", w_hr, (state, hidden))))
    if (c0 is not None) != (mode == "lstm"):
        raise ValueError(f"{op}: c0 is required for mode 'lstm' and not allowed otherwise")
    if w_hr is None and state != hidden:
        raise ValueError(f"{op}: w_hh has state size {state} but the hidden size is {hidden}; a projection "
                         "(w_hr) is needed for that")
    if w_hr is not None and mode != "lstm":
        raise ValueError(f"{op}: w_hr (projection) is only for mode 'lstm'")
    if w_hr is not None and state >= hidden:  # as torch.nn.LSTM's proj_size < hidden_size
        raise ValueError(f"{op}: w_hr projects to {state} but the hidden size is {hidden}; a projection must be "
                         "smaller than the hidden size")
    check_lengths(op, lengths, b, t)
    name = _backend.choose(OP, xw.device, xw.dtype, backend)
    # the workspace feeds the backward; inference does not write it
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xw, w_hh, b_hh, h0, c0, w_hr))
    out, h_n, c_n, _ws = call(rnn_fwd, xw, w_hh, b_hh, h0, c0, w_hr, lengths, mode, bool(reverse), save, name)
    return out, h_n, (c_n if mode == "lstm" else None)


# ---- the multi-layer forms: what bignlp_fast.nn.LSTM / GRU / RNN run -----------------------------
def input_projection(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: Optional[str],
                     defer_bias: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(x W_ih^T + b_ih for every step at once, None), or (x W_ih^T, b_ih) when ``defer_bias`` lets the
    recurrence add b_ih (see below). On float32 and bfloat16 CPU tensors: bignlp_fast.ops.linear, the
    project's packed GEMM, where ops.linear.linear_is_faster says so (the rule nn.Linear and the models
    follow): in fp32 about 2x torch.mm where MKL lacks an AVX-512 path, but not for small products,
    nor where MKL's sgemm is the faster one (Intel CPUs, builds without AVX-512 off Zen 1/2); in bf16
    only on CPUs without AVX-512, where torch's bf16 GEMM has no vector kernels (with them, oneDNN's
    GEMM on the CPU's bf16 dot products or AMX: about 2x ops.linear, which computes in fp32). On other
    devices, under autocast, or when the torch reference is asked for: F.linear. Naming backend="cpu"
    always takes ops.linear.

    F.linear with a bias is addmm, which first copies the bias into every row of its [T*B, G*H]
    output: 3.5 ms of a 22 ms bf16 LSTM forward (B32, T128, H512, Xeon). The recurrence adds b_hh at
    every step anyway, so for LSTM and RNN (``defer_bias``) b_ih is handed back to join it; GRU's b_hn
    sits inside r * (h W_hn^T + b_hn), so there it stays in the projection. On ops.linear too: its
    backward would sum the bias gradient over all [T*B, G*H] gate gradients (1.9 ms of a 326 ms fp32
    LSTM forward + backward, B32 T128 H512), the sum the recurrence already makes for b_hh."""
    named = _backend.requested_backend(backend)
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not autocast_enabled("cpu")
            and (named == "cpu" or (named is None and linear_is_faster(x, weight)))):
        if defer_bias:
            return linear(x, weight, None, backend=backend), bias
        return linear(x, weight, bias, backend=backend), None
    if defer_bias:
        return F.linear(x, weight), bias
    return F.linear(x, weight, bias), None


def cell_lane(mode: str, x: Tensor, hx, lstm: bool, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor]):
    """The cells' eager lane (nn.LSTMCell / GRUCell / RNNCell with no backend named): one step of a plain
    inference call, projection and recurrence in one call of the extension's ``rnn_cell_lane_cpu``;
    (h', c') for an LSTM, h' otherwise, or None where the call takes the general path.

    Python checks what only it can see (plain tensor types rather than subclasses, hx None, a tensor,
    or for an LSTM a tuple of two, nothing recording or transforming calls, no autocast, the cpu
    backend chosen) and makes input_projection's choice of GEMM (ops.linear where linear_is_faster
    says so, else F.linear); the extension checks the tensors (2-d x, one dtype, float32 / bfloat16,
    the cell's shapes, no gradient to record) and runs both products and the step, or returns nothing.
    Where it runs, the general path would run the same kernels on the same tensors: the cell's ~30 us
    of Python (checks, input_projection, rnn_layer) cost 0.81-0.89x torch.nn.LSTMCell in a 16-step
    loop at H = 512, where the kernels alone ran 1.07-1.19x (Xeon, session 40).

    float32 weights that :func:`bignlp_fast.ops.prepack` marked (both of them), with a hidden size that
    is a multiple of the extension's ``rnn_cell_packed_units()`` (32 in an AVX-512 build, 16 in an
    AVX2 one), are multiplied by their packed copies instead: both products of the step in one
    parallel region, each core on a fixed part of the weights, nothing packed per call (B32 I = H =
    512 on a 2-core Xeon: the two products in 119 us where torch's two GEMMs take 262). Other marked
    weights (bfloat16, one of the two) leave the call to the general path, whose projection then uses
    the packed copy, as before."""
    if type(x) not in PLAIN_TENSORS:
        return None
    if hx is None:
        h = c = None
    elif lstm:
        if type(hx) is not tuple or len(hx) != 2:
            return None
        h, c = hx
    else:
        h, c = hx, None
    if ((h is not None and type(h) not in PLAIN_TENSORS) or (c is not None and type(c) not in PLAIN_TENSORS)
            or type(w_ih) not in PLAIN_TENSORS or type(w_hh) not in PLAIN_TENSORS
            or (b_ih is not None and type(b_ih) not in PLAIN_TENSORS)
            or (b_hh is not None and type(b_hh) not in PLAIN_TENSORS) or x.dim() != 2 or not cpu_lane_open()):
        return None
    hidden = w_hh.shape[1] if w_hh.dim() == 2 else -1  # (-1: no copies; the extension refuses the call)
    packed_ih = _step_copy(w_ih, hidden)
    packed_hh = _step_copy(w_hh, hidden) if packed_ih is not None else None
    if packed_ih is None or packed_hh is None:
        packed_ih = packed_hh = None
        ours = linear_is_faster(x, w_ih)
        if ours and uses_packed_copy(x.shape[0], w_ih):
            return None  # (ops.linear would use the weight's packed copy)
    else:
        ours = False  # (not asked: the packed step projects on the packed copy)
    out = kernel("rnn_cell", "lane", "cpu")(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, ours, packed_ih, packed_hh)
    if not out:
        return None
    return (out[0], out[1]) if lstm else out[0]


@functools.cache
def _cell_packed_units() -> int:
    """The extension's rnn_cell_packed_units(), asked once (the cells and layers on packed weights need
    hidden sizes that are multiples of it)."""
    return _backend.compiled().rnn_cell_packed_units()


def _step_copy(weight: Tensor, hidden: int) -> Optional[Tensor]:
    """``weight``'s packed copy (ops.linear.prepack) for the steps of a cell or layer of ``hidden`` units,
    made now if missing or stale, where the step reads one: a marked float32 weight, ``hidden`` a
    multiple of _cell_packed_units(), the call outside autograd's view of the weight; else None (also
    if another thread has just unmarked it)."""
    if weight.dtype != torch.float32 or hidden % _cell_packed_units() != 0 or not _packable(weight):
        return None
    return _packed(weight)


def stack_lane(mode: str, x: Tensor, weights, h0: Tensor, c0: Optional[Tensor], num_layers: int,
               bidirectional: bool) -> Optional[tuple[Tensor, Tensor, Optional[Tensor]]]:
    """The recurrent modules' eager lane (nn.LSTM / GRU / RNN with no backend named): a plain inference
    call of the whole stack, (output [T, B, D*H], h_n [L*D, B, H], c_n or None) as recurrent_stack gives
    them, or None where the call takes the general path. ``x`` is time-major [T, B, F]; ``weights`` in
    torch's _flat_weights order, with or without biases (no projection); h0 / c0 as recurrent_stack's.

    The same kernels on the same tensors as the general path (input_projection's rule, then rnn_fwd_cpu
    per layer and direction, b_ih joining b_hh as there), without its checks and dispatch: those
    (recurrent_stack's weight groups and shapes, rnn_layer's operand checks, the custom op, the backend
    choice) cost ~100-250 us a call, 15% of a B16 H128 T64 LSTM forward (Xeon, session 41: 1.01-1.06x
    torch.nn.LSTM through them, 1.15-1.16x without). Taken when the process is open to lanes
    (cpu_lane_open), nothing would be recorded for autograd, and every tensor is a plain CPU tensor of
    x's dtype (float32 or bfloat16) with the shapes the stack expects; anything else is left to the
    general path, which checks it and says what is wrong. A float32 W_hh that
    :func:`bignlp_fast.ops.prepack` marked, with a hidden size that is a multiple of
    ``rnn_cell_packed_units()``, is multiplied by its packed copy (the same panels forward() would pack
    at every call, so the same numbers); the input projections follow input_projection's rule, which
    uses the packed W_ih where ops.linear takes the product."""
    directions = 2 if bidirectional else 1
    groups = num_layers * directions
    per = len(weights) // groups if groups else 0
    dtype = x.dtype
    if (type(x) not in PLAIN_TENSORS or x.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16)
            or x.dim() != 3 or x.shape[0] == 0 or x.shape[1] == 0 or per not in (2, 4) or per * groups != len(weights)
            or type(h0) not in PLAIN_TENSORS or h0.dtype != dtype or h0.device.type != "cpu" or h0.dim() != 3
            or (c0 is not None) != (mode == "lstm")
            or (c0 is not None and (type(c0) not in PLAIN_TENSORS or c0.dtype != dtype or c0.device.type != "cpu"
                                    or c0.shape != h0.shape))
            or not cpu_lane_open()):
        return None
    hidden = h0.shape[2]
    if h0.shape[0] != groups or h0.shape[1] != x.shape[1]:
        return None
    grad = torch.is_grad_enabled()
    if grad and (x.requires_grad or h0.requires_grad or (c0 is not None and c0.requires_grad)):
        return None
    gh = GATES[mode] * hidden
    for k in range(groups):
        shapes = ((gh, x.shape[2] if k < directions else directions * hidden), (gh, hidden), (gh,), (gh,))
        for t, shape in zip(weights[k * per:(k + 1) * per], shapes):
            if (type(t) not in PLAIN_TENSORS or t.dtype != dtype or t.device.type != "cpu" or t.shape != shape
                    or (grad and t.requires_grad)):
                return None
    run_kernel = kernel("rnn", "fwd", "cpu")
    def run(k: int, layer_input: Tensor, reverse: bool):
        w = weights[k * per:(k + 1) * per]
        xw, b_ih = input_projection(layer_input, w[0], w[2] if per == 4 else None, None, defer_bias=mode != "gru")
        b_hh = (w[3] if per == 4 else None) if b_ih is None else b_ih + w[3]
        packed = _step_copy(w[1], hidden)  # a W_hh ops.prepack marked: read from its copy
        out, h, c, _ws = run_kernel(xw.contiguous(), w[1].contiguous(), contiguous(b_hh), h0[k].contiguous(),
                                    contiguous(c0[k]) if c0 is not None else None, None, None, mode, reverse, False,
                                    packed)
        return out, h, (c if mode == "lstm" else None)

    out, h_n, c_n = stack_layers(x, num_layers, directions, 0.0, False, run)
    return out, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t.to(dtype) if t is not None and t.dtype != dtype else t


def _weight_groups(op: str, mode: str, weights, num_layers: int, directions: int) -> list[dict]:
    """torch's flat weight list (``module._flat_weights``: per layer and direction w_ih, w_hh[, b_ih,
    b_hh][, w_hr]) as one {"weight_ih": ..} dict per (layer, direction)."""
    weights = list(weights)
    groups = num_layers * directions
    size = len(weights) // groups if groups else 0
    names = {2: ("weight_ih", "weight_hh"), 4: ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    if mode == "lstm":
        names.update({3: ("weight_ih", "weight_hh", "weight_hr"),
                      5: ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")})
    if not weights or len(weights) % groups or size not in names:
        raise ValueError(f"{op}: weights must hold, for each of the {num_layers} layer(s) x {directions} "
                         f"direction(s), w_ih, w_hh[, b_ih, b_hh]" + ("[, w_hr]" if mode == "lstm" else "")
                         + f" (torch's _flat_weights order); got {len(weights)} tensors")
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise TypeError(f"{op}: weights[{i}] must be a Tensor, got {type(w).__name__}")
    return [dict(zip(names[size], weights[k * size:(k + 1) * size])) for k in range(groups)]


def _check_weight_shapes(op: str, mode: str, groups: list[dict], features: int, directions: int, hidden: int,
                         state: int) -> None:
    """Each (layer, direction)'s weights have torch.nn's shapes for this input: a list in the wrong
    order, of another layer count or for another input size is named here, not met as a GEMM's error."""
    rows = GATES[mode] * hidden
    for k, w in enumerate(groups):  # the dimensions first: a list out of order shows there
        for name, t in w.items():
            dims = 1 if name.startswith("bias") else 2
            if t.dim() != dims:
                raise ValueError(f"{op}: {name} of layer {k // directions} must be {dims}-D, got shape "
                                 f"{tuple(t.shape)}; weights are torch's _flat_weights order")
    for k, w in enumerate(groups):
        layer, direction = divmod(k, directions)
        expected = {"weight_ih": (rows, features if layer == 0 else directions * state), "weight_hh": (rows, state),
                    "bias_ih": (rows,), "bias_hh": (rows,), "weight_hr": (state, hidden)}
        for name, t in w.items():
            if tuple(t.shape) != expected[name]:
                where = f"layer {layer}" + (" (reverse)" if direction else "")
                raise ValueError(f"{op}: {name} of {where} must have shape {expected[name]} (input size "
                                 f"{features}, hidden size {hidden}" + (f", proj_size {state}" if "weight_hr" in w
                                                                        else "")
                                 + f"), got {tuple(t.shape)}; weights are torch's _flat_weights order")


def stack_layers(x: Tensor, num_layers: int, directions: int, dropout: float, training: bool, run):
    """Layers x directions over time-major x. ``run(k, layer_input, reverse)`` runs the k-th (layer,
    direction) and returns (out, h, c). Bidirectional outputs are concatenated [forward, backward];
    dropout (training only) follows every layer but the last. Returns (output, [h...], [c...])."""
    h_n, c_n = [], []
    layer_input = x
    for layer in range(num_layers):
        outs = []
        for direction in range(directions):
            out, h, c = run(layer * directions + direction, layer_input, direction == 1)
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = outs[0] if directions == 1 else torch.cat(outs, -1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    return layer_input, h_n, c_n


def recurrent_stack(mode: str, x: Tensor, weights, h0: Tensor, c0: Optional[Tensor], lengths: Optional[Tensor],
                    num_layers: int, bidirectional: bool, dropout: float, training: bool,
                    backend: Optional[str]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Layers x directions over time-major x [T, B, F]: per (layer, direction) one input projection
    and one ``rnn_layer``; bidirectional outputs concatenated [forward, backward]; dropout (training)
    after every layer but the last. h0 [L*D, B, S], c0 [L*D, B, H] (LSTM) or None. Returns
    (output [T, B, D*S], h_n [L*D, B, S], c_n [L*D, B, H] or None). Under autocast the recurrence
    runs in the dtype autocast gave the projection, with the weights and states cast to it."""
    directions = 2 if bidirectional else 1
    groups = _weight_groups("rnn", mode, weights, num_layers, directions)

    def run(k: int, layer_input: Tensor, reverse: bool):
        w = groups[k]
        xw, b_ih = input_projection(layer_input, w["weight_ih"], w.get("bias_ih"), backend,
                                    defer_bias=mode != "gru")  # [T, B, G*H]
        h, c = h0[k], c0[k] if c0 is not None else None
        if autocast_enabled(xw.device.type):  # the recurrence runs in the dtype autocast gave the projection
            w = {n: _cast(t, xw.dtype) for n, t in w.items()}
            h, c, b_ih = _cast(h, xw.dtype), _cast(c, xw.dtype), _cast(b_ih, xw.dtype)
        b_hh = w.get("bias_hh") if b_ih is None else b_ih + w["bias_hh"]
        return rnn_layer(mode, xw, w["weight_hh"], b_hh, h, c, w.get("weight_hr"), lengths, reverse=reverse,
                         backend=backend)

    out, h_n, c_n = stack_layers(x, num_layers, directions, dropout, training, run)
    return out, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)


def _functional(mode: str, input: Tensor, weights, hx, num_layers: int, bidirectional: bool, batch_first: bool,
                dropout: float, training: bool, lengths, backend: Optional[str]):
    op = {"lstm": "lstm", "gru": "gru"}.get(mode, "rnn")
    check_tensor(op, "input", input)
    if input.dim() != 3:
        raise ValueError(f"{op}: input must be [T, B, F] ([B, T, F] with batch_first), got shape {tuple(input.shape)}")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{op}: num_layers must be a positive int, got {num_layers!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        raise ValueError(f"{op}: dropout must be a probability in [0, 1], got {dropout!r}")
    directions = 2 if bidirectional else 1
    groups = _weight_groups(op, mode, weights, num_layers, directions)
    x = input.transpose(0, 1) if batch_first else input  # [T, B, F]
    batch, hidden = x.shape[1], groups[0]["weight_hh"].shape[0] // GATES[mode]
    state = groups[0]["weight_hr"].shape[0] if "weight_hr" in groups[0] else hidden
    _check_weight_shapes(op, mode, groups, x.shape[2], directions, hidden, state)
    if hx is None:
        h0 = x.new_zeros(num_layers * directions, batch, state)
        c0 = x.new_zeros(num_layers * directions, batch, hidden) if mode == "lstm" else None
    elif mode == "lstm":
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"{op}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    for name, t, size in (("h_0", h0, state), ("c_0", c0, hidden)):
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != (num_layers * directions, batch, size)):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be [num_layers * directions, B, {size}] = "
                             f"{(num_layers * directions, batch, size)}, got {got}")
    if lengths is not None:
        if isinstance(lengths, (list, tuple)):
            lengths = torch.tensor(lengths, dtype=torch.int64)
        if not isinstance(lengths, Tensor) or lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: lengths must be an int32 / int64 tensor or a list of ints")
        lengths = lengths.to(device="cpu", dtype=torch.int64)
    out, h_n, c_n = recurrent_stack(mode, x, weights, h0, c0, lengths, num_layers, bidirectional, dropout, training,
                                    backend)
    return (out.transpose(0, 1) if batch_first else out), h_n, c_n


def lstm(input: Tensor, weights, hx: Optional[tuple[Tensor, Tensor]] = None, *, num_layers: int = 1,
         bidirectional: bool = False, batch_first: bool = False, dropout: float = 0.0, training: bool = False,
         lengths=None, backend: Optional[str] = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """torch.nn.LSTM's computation as a function: what ``bignlp_fast.nn.LSTM`` runs.

    Args:
        input: [T, B, F] ([B, T, F] with ``batch_first``).
        weights: per layer and direction w_ih [4H, F], w_hh [4H, S][, b_ih [4H], b_hh [4H]][, w_hr [P, H]],
            in the order of torch.nn.LSTM's ``_flat_weights`` (S = P with a projection, else H).
        hx: (h_0 [L*D, B, S], c_0 [L*D, B, H]) or None (zeros).
        dropout, training: dropout on every layer's output but the last, when training.
        lengths: [B] ints (each sequence runs over its first lengths[b] steps, as if packed; zeros past
            them in the output) or None.
    Returns (output [T, B, D*S] ([B, T, D*S] with batch_first), (h_n, c_n)).
    """
    out, h_n, c_n = _functional("lstm", input, weights, hx, num_layers, bidirectional, batch_first, dropout, training,
                                lengths, backend)
    return out, (h_n, c_n)


def gru(input: Tensor, weights, hx: Optional[Tensor] = None, *, num_layers: int = 1, bidirectional: bool = False,
        batch_first: bool = False, dropout: float = 0.0, training: bool = False, lengths=None,
        backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """torch.nn.GRU's computation as a function (see :func:`lstm`; weights w_ih [3H, F], w_hh [3H, H][, b_ih,
    b_hh]; hx h_0 [L*D, B, H] or None). Returns (output, h_n)."""
    out, h_n, _ = _functional("gru", input, weights, hx, num_layers, bidirectional, batch_first, dropout, training,
                              lengths, backend)
    return out, h_n


def rnn(input: Tensor, weights, hx: Optional[Tensor] = None, *, nonlinearity: str = "tanh", num_layers: int = 1,
        bidirectional: bool = False, batch_first: bool = False, dropout: float = 0.0, training: bool = False,
        lengths=None, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """torch.nn.RNN's computation as a function (see :func:`gru`; ``nonlinearity`` "tanh" or "relu")."""
    check_choice("rnn", "nonlinearity", nonlinearity, ("tanh", "relu"))
    out, h_n, _ = _functional(f"rnn_{nonlinearity}", input, weights, hx, num_layers, bidirectional, batch_first,
                              dropout, training, lengths, backend)
    return out, h_n
