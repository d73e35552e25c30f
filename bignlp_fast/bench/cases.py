"""Benchmark cases: inputs, the PyTorch code a user would otherwise run, and the bytes or FLOPs of
each call. ``bignlp-fast bench`` and ``pytest benchmarks/`` both read them from here."""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bignlp_fast.ops import (add_layer_norm, bias_gelu, causal_conv1d, conv1d, conv2d, distillation_loss, linear,
                             scaled_dot_product_attention, text_cnn_pool)
from bignlp_fast.ops.causal_conv1d import causal_conv1d_eager
from bignlp_fast.ops.linear import SKINNY_ROWS
from bignlp_fast.ops.text_cnn_pool import text_cnn_pool_eager


@dataclasses.dataclass
class Case:
    """One benchmark: ``ours(inputs, backend)`` against ``ref(inputs)`` on the same inputs.

    Both return the tensors to compare (outputs, then gradients for a fwd+bwd case); errors are
    measured against ``ref`` run on a float64 copy of the inputs. ``bytes`` is the least memory a
    call must move (memory-bound ops), ``flops`` the arithmetic (compute-bound ops) of the plain
    algorithm: where ours needs fewer multiplies (conv1d k=3 on the CPU: Winograd's F(2, 3), 2/3 of
    them) the GFLOP/s column is an effective rate and can pass the machine's FMA peak.
    """

    op: str
    mode: str  # "fwd" or "fwd+bwd"
    shape: tuple
    dtype: torch.dtype
    make: Callable[[torch.device, torch.dtype], dict]
    ours: Callable[[dict, Optional[str]], list]
    ref: Callable[[dict], list]
    ref_name: str
    bytes: int = 0
    flops: int = 0
    suites: tuple = ("quick", "full")
    variant: str = ""  # e.g. "causal": a flavour of the op shown beside its name
    # False where the float64 reference would not fit (the GPU suite's long sequences: the unfused
    # float64 attention holds Lq x Lk scores); the row then shows no error, and the tests check accuracy
    check_error: bool = True

    @property
    def name(self) -> str:
        return f"{self.op} ({self.variant})" if self.variant else self.op

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        variant = "-" + self.variant.replace(", ", "-").replace(" ", "-") if self.variant else ""
        return f"{self.op}{variant}-{self.mode}-{'x'.join(map(str, self.shape))}-{dt}"


def _randn(shape, device, dtype, grad, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)


def _grads(outputs: list, inputs: list, grad_outputs: list) -> list:
    leaves = [t for t in inputs if t is not None]
    return [*outputs, *torch.autograd.grad(outputs, leaves, grad_outputs)]


def _module(tensors: dict, which: int) -> torch.nn.Module:
    """Module ``which`` (0: ours, 1: torch's) of a module case, whose inputs hold ``modules={dtype:
    (ours, torch's)}``, in the dtype of ``tensors["x"]``; for the float64 reference run, a float64 copy
    of torch's module, made once (to_float64 shares the dict)."""
    dt = tensors["x"].dtype
    if dt not in tensors["modules"]:
        _, ref = next(iter(tensors["modules"].values()))
        tensors["modules"][dt] = (None, copy.deepcopy(ref).to(dt))
    return tensors["modules"][dt][which]


# ---- add_layer_norm ---------------------------------------------------------------------------
def _add_layer_norm_cases(rows, hidden, dtype, suites):
    nbytes = rows * hidden * torch.tensor([], dtype=dtype).element_size()

    def make(device, dt, grad):
        x, r = _randn((rows, hidden), device, dt, grad, 0), _randn((rows, hidden), device, dt, grad, 1)
        w, b = _randn(hidden, device, dt, grad, 2), _randn(hidden, device, dt, grad, 3)
        go, gs = _randn((rows, hidden), device, dt, False, 4), _randn((rows, hidden), device, dt, False, 5)
        return dict(x=x, r=r, w=w, b=b, go=go, gs=gs)

    def eager(t):
        s = t["x"] + t["r"]
        return [F.layer_norm(s, (hidden,), t["w"], t["b"]), s]

    def fused(t, backend):
        return list(add_layer_norm(t["x"], t["r"], t["w"], t["b"], backend=backend))

    inputs = lambda t: [t["x"], t["r"], t["w"], t["b"]]  # noqa: E731
    common = dict(op="add_layer_norm", shape=(rows, hidden), dtype=dtype, suites=suites,
                  ref_name="eager x + r, F.layer_norm")
    return [
        # forward: read x, residual; write out, sum
        Case(mode="fwd", make=lambda d, dt: make(d, dt, False), ours=fused, ref=eager, bytes=4 * nbytes, **common),
        # + backward: read grad_out, grad_sum, sum; write grad (x's and residual's)
        Case(mode="fwd+bwd", make=lambda d, dt: make(d, dt, True),
             ours=lambda t, be: _grads(fused(t, be), inputs(t), [t["go"], t["gs"]]),
             ref=lambda t: _grads(eager(t), inputs(t), [t["go"], t["gs"]]), bytes=8 * nbytes, **common),
    ]


# ---- bias_gelu --------------------------------------------------------------------------------
def _bias_gelu_cases(rows, hidden, dtype, suites):
    nbytes = rows * hidden * torch.tensor([], dtype=dtype).element_size()

    def make(device, dt, grad):
        return dict(x=_randn((rows, hidden), device, dt, grad, 0), b=_randn(hidden, device, dt, grad, 1),
                    gy=_randn((rows, hidden), device, dt, False, 2))

    eager = lambda t: [F.gelu(t["x"] + t["b"])]  # noqa: E731
    fused = lambda t, be: [bias_gelu(t["x"], t["b"], backend=be)]  # noqa: E731
    common = dict(op="bias_gelu", shape=(rows, hidden), dtype=dtype, suites=suites, ref_name="eager F.gelu(x + b)")
    return [
        # forward: read x, write y
        Case(mode="fwd", make=lambda d, dt: make(d, dt, False), ours=fused, ref=eager, bytes=2 * nbytes, **common),
        # + backward: read grad_y, x; write grad_x
        Case(mode="fwd+bwd", make=lambda d, dt: make(d, dt, True),
             ours=lambda t, be: _grads(fused(t, be), [t["x"], t["b"]], [t["gy"]]),
             ref=lambda t: _grads(eager(t), [t["x"], t["b"]], [t["gy"]]), bytes=5 * nbytes, **common),
    ]


# ---- attention --------------------------------------------------------------------------------
def _attention_cases(b, h, lq, lk, d, dtype, causal, modes, suites, ref_backend=None, check_error=True,
                     padding=False):
    """``ref_backend``: None for what F.scaled_dot_product_attention picks (its fused CPU/GPU
    kernels), or "math" for the unfused path, the baseline of the memory comparison. ``padding``: a
    bool mask [B, 1, Lq, Lk] of right-padded keys (lengths uniform in [0.3 Lk, Lk], one full),
    materialised as transformers hands it to SDPA for a padded batch."""

    def make(device, dt, grad):
        g = torch.Generator().manual_seed(4)
        lengths = torch.randint(max(1, int(0.3 * lk)), lk + 1, (b,), generator=g)
        lengths[0] = lk
        keep = torch.arange(lk)[None, :] < lengths[:, None]
        mask = keep[:, None, None, :].expand(b, 1, lq, lk).contiguous().to(device) if padding else None
        return dict(q=_randn((b, h, lq, d), device, dt, grad, 0), k=_randn((b, h, lk, d), device, dt, grad, 1),
                    v=_randn((b, h, lk, d), device, dt, grad, 2), go=_randn((b, h, lq, d), device, dt, False, 3),
                    mask=mask)

    def eager(t):
        if ref_backend == "math":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.MATH):
                return [F.scaled_dot_product_attention(t["q"], t["k"], t["v"], t["mask"], is_causal=causal)]
        return [F.scaled_dot_product_attention(t["q"], t["k"], t["v"], t["mask"], is_causal=causal)]

    fused = lambda t, be: [scaled_dot_product_attention(t["q"], t["k"], t["v"], t["mask"], is_causal=causal,  # noqa
                                                        backend=be)]
    qkv = lambda t: [t["q"], t["k"], t["v"]]  # noqa: E731
    # FLOPs: 4 * B * H * Lq * Lk * D forward (two GEMMs), half when causal; backward 2.5x that
    flops = 4 * b * h * lq * lk * d // (2 if causal else 1)
    ref_name = "F.scaled_dot_product_attention" + (" (math backend)" if ref_backend else "")
    common = dict(op="attention", shape=(b, h, lq, lk, d) if lq != lk else (b, h, lq, d), dtype=dtype,
                  suites=suites, ref_name=ref_name, check_error=check_error,
                  variant=", ".join(["causal"] * causal + ["padding mask [B, 1, Lq, Lk]"] * padding))
    out = []
    if "fwd" in modes:
        out.append(Case(mode="fwd", make=lambda dev, dt: make(dev, dt, False), ours=fused, ref=eager, flops=flops,
                        **common))
    if "fwd+bwd" in modes:
        out.append(Case(mode="fwd+bwd", make=lambda dev, dt: make(dev, dt, True),
                        ours=lambda t, be: _grads(fused(t, be), qkv(t), [t["go"]]),
                        ref=lambda t: _grads(eager(t), qkv(t), [t["go"]]), flops=flops * 7 // 2, **common))
    return out


def _multihead_attention_cases(b, l, e, heads, dtype, modes, suites):
    """bignlp_fast.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights:
    self-attention over [B, L, E] (batch_first), need_weights=False (the call that takes the fused
    path on our side and torch's fast path on its side)."""
    import bignlp_fast.nn as bnn

    def make(device, dt, grad):
        torch.manual_seed(0)
        ref = torch.nn.MultiheadAttention(e, heads, batch_first=True).to(device, dt)
        ours = bnn.MultiheadAttention(e, heads, batch_first=True).to(device, dt)
        ours.load_state_dict(ref.state_dict())
        return dict(x=_randn((b, l, e), device, dt, grad, 0), gy=_randn((b, l, e), device, dt, False, 1),
                    modules={dt: (ours, ref)})

    def fused(t, be):
        m = _module(t, 0)
        m.backend = be  # the attention op's backend (the projections take the GEMM rule)
        return [m(t["x"], t["x"], t["x"], need_weights=False)[0]]

    eager = lambda t: [_module(t, 1)(t["x"], t["x"], t["x"], need_weights=False)[0]]  # noqa: E731
    leaves = lambda t, which: [t["x"], *_module(t, which).parameters()]  # noqa: E731
    # FLOPs: the q/k/v and out projections (4 GEMMs of B*L x E x E) and the attention's two GEMMs
    flops = 8 * b * l * e * e + 4 * b * l * l * e
    common = dict(op="attention", variant="nn.MultiheadAttention, self", shape=(b, l, e, heads), dtype=dtype,
                  suites=suites, ref_name="torch.nn.MultiheadAttention")
    out = []
    if "fwd" in modes:
        out.append(Case(mode="fwd", make=lambda d, dt: make(d, dt, False), ours=_no_grad(fused), ref=_no_grad(eager),
                        flops=flops, **common))
    if "fwd+bwd" in modes:
        out.append(Case(mode="fwd+bwd", make=lambda d, dt: make(d, dt, True),
                        ours=lambda t, be: _grads(fused(t, be), leaves(t, 0), [t["gy"]]),
                        ref=lambda t: _grads(eager(t), leaves(t, 1), [t["gy"]]), flops=3 * flops, **common))
    return out


# ---- linear -----------------------------------------------------------------------------------
def _linear_cases(m, k, n, dtype, modes, suites, variant=None):
    def make(device, dt, grad):
        return dict(x=_randn((m, k), device, dt, grad, 0), w=_randn((n, k), device, dt, grad, 1),
                    b=_randn(n, device, dt, grad, 2), gy=_randn((m, n), device, dt, False, 3))

    eager = lambda t: [F.linear(t["x"], t["w"], t["b"])]  # noqa: E731
    fused = lambda t, be: [linear(t["x"], t["w"], t["b"], backend=be)]  # noqa: E731
    leaves = lambda t: [t["x"], t["w"], t["b"]]  # noqa: E731
    common = dict(op="linear", shape=(m, k, n), dtype=dtype, suites=suites, ref_name="F.linear")
    if variant:
        common["variant"] = variant
    out = []
    if "fwd" in modes:
        # a decoding-sized product (few rows) is bound by reading the weight: its rate in GB/s
        rate = dict(flops=2 * m * k * n) if m > SKINNY_ROWS else dict(bytes=n * k * dtype.itemsize)
        out.append(Case(mode="fwd", make=lambda d, dt: make(d, dt, False), ours=fused, ref=eager, **rate, **common))
    if "fwd+bwd" in modes:
        out.append(Case(mode="fwd+bwd", make=lambda d, dt: make(d, dt, True),
                        ours=lambda t, be: _grads(fused(t, be), leaves(t), [t["gy"]]),
                        ref=lambda t: _grads(eager(t), leaves(t), [t["gy"]]), flops=6 * m * k * n, **common))
    return out


# ---- recurrent layers -------------------------------------------------------------------------
_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _rnn_cases(kind, b, i, h, t, dtype, modes, suites, layers=1, bidirectional=False, prepack=False):
    """bignlp_fast.nn.<kind> against torch.nn.<kind> with the same weights, time-major input [T, B, I].
    ``prepack``: ours with its weights marked by ops.prepack (inference: packed once, at the first call)."""
    import bignlp_fast.nn as bnn
    from bignlp_fast.ops import prepack as prepack_weights
    dirs = 2 if bidirectional else 1

    def make(device, dt, grad):
        torch.manual_seed(0)
        ref = getattr(torch.nn, kind)(i, h, num_layers=layers, bidirectional=bidirectional).to(device, dt)
        ours = getattr(bnn, kind)(i, h, num_layers=layers, bidirectional=bidirectional).to(device, dt)
        ours.load_state_dict(ref.state_dict())
        if prepack:
            prepack_weights(ours)
        return dict(x=_randn((t, b, i), device, dt, grad, 0), go=_randn((t, b, dirs * h), device, dt, False, 1),
                    modules={dt: (ours, ref)})

    def params(tensors, which):
        return list(_module(tensors, which).parameters())

    ours_fwd = lambda tn, be: [_module(tn, 0)(tn["x"])[0]]  # noqa: E731
    ref_fwd = lambda tn: [_module(tn, 1)(tn["x"])[0]]  # noqa: E731
    # FLOPs: input projection and recurrent GEMMs, 2 * T * B * G*H * (I_layer + H) per layer and direction
    flops = sum(2 * t * b * _RNN_GATES[kind] * h * ((i if layer == 0 else dirs * h) + h) * dirs
                for layer in range(layers))
    variant = (kind + f", {layers} layers" * (layers > 1) + (" bidirectional" if bidirectional else "")
               + (", prepacked" if prepack else ""))
    common = dict(op="rnn", shape=(b, i, h, t), dtype=dtype, suites=suites, variant=variant,
                  ref_name=f"torch.nn.{kind}")
    out = []
    if "fwd" in modes:  # inference: no autograd graph on either side
        def no_grad(fn):
            def run(*args):
                with torch.no_grad():
                    return fn(*args)
            return run
        out.append(Case(mode="fwd", make=lambda dev, dt: make(dev, dt, False), ours=no_grad(ours_fwd),
                        ref=no_grad(ref_fwd), flops=flops, **common))
    if "fwd+bwd" in modes:
        out.append(Case(mode="fwd+bwd", make=lambda dev, dt: make(dev, dt, True),
                        ours=lambda tn, be: _grads(ours_fwd(tn, be), [tn["x"], *params(tn, 0)], [tn["go"]]),
                        ref=lambda tn: _grads(ref_fwd(tn), [tn["x"], *params(tn, 1)], [tn["go"]]),
                        flops=3 * flops, **common))
    return out


def _rnn_cell_cases(kind, b, i, h, steps, dtype, suites, prepack=False):
    """bignlp_fast.nn.<kind> (LSTMCell, GRUCell, RNNCell) against torch.nn.<kind> with the same weights: an
    inference loop of ``steps`` calls, each fed the state the last one returned (a user's decoder).
    ``prepack``: ours with its weights marked by ops.prepack (packed once, at the first step)."""
    import bignlp_fast.nn as bnn
    from bignlp_fast.ops import prepack as prepack_weights

    def make(device, dt):
        torch.manual_seed(0)
        ref = getattr(torch.nn, kind)(i, h).to(device, dt)
        ours = getattr(bnn, kind)(i, h).to(device, dt)
        ours.load_state_dict(ref.state_dict())
        if prepack:
            prepack_weights(ours)
        return dict(x=_randn((steps, b, i), device, dt, False, 0), modules={dt: (ours, ref)})

    def loop(cell, x):
        state, outs = None, []
        for x_t in x:
            state = cell(x_t, state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return [torch.stack(outs)]

    flops = 2 * steps * b * _RNN_GATES[kind.replace("Cell", "")] * h * (i + h)
    return [Case(op="rnn", mode="fwd", shape=(b, i, h, steps), dtype=dtype, make=make,
                 ours=_no_grad(lambda t, be: loop(_module(t, 0), t["x"])),
                 ref=_no_grad(lambda t: loop(_module(t, 1), t["x"])), flops=flops, suites=suites,
                 variant=f"{kind}, {steps} steps" + (", prepacked" if prepack else ""), ref_name=f"torch.nn.{kind}")]


def _layer_norm_lstm_cases(b, i, h, t, dtype, modes, suites, layers=1, bidirectional=False):
    """bignlp_fast.nn.LayerNormLSTM against the same layers written in eager PyTorch (F.linear,
    F.layer_norm and a Python loop over the steps: what torch offers for a LayerNorm LSTM), with the
    same weights, time-major input [T, B, I]."""
    import bignlp_fast.nn as bnn
    from bignlp_fast.ops.layer_norm_lstm import layer_norm_lstm_math
    dirs = 2 if bidirectional else 1

    def make(device, dt, grad):
        torch.manual_seed(0)
        ours = bnn.LayerNormLSTM(i, h, num_layers=layers, bidirectional=bidirectional).to(device, dt)
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if name.startswith("ln_"):
                    p.add_(0.1 * torch.randn_like(p))  # LayerNorms away from scale 1, shift 0
        params = [p.detach().clone().requires_grad_(grad) for p in ours.parameters()]
        return dict(x=_randn((t, b, i), device, dt, grad, 0), go=_randn((t, b, dirs * h), device, dt, False, 1),
                    module=ours, names=[n for n, _ in ours.named_parameters()], params=params)

    def eager(tn):
        p = dict(zip(tn["names"], tn["params"]))
        layer_input = tn["x"]
        for layer in range(layers):
            outs = []
            for direction in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                xw = F.layer_norm(F.linear(layer_input, p["weight_ih" + sfx]), (4 * h,), p[f"ln_ih{sfx}.weight"],
                                  p[f"ln_ih{sfx}.bias"])
                zeros = layer_input.new_zeros(b, h)
                outs.append(layer_norm_lstm_math(xw, p["weight_hh" + sfx], p[f"ln_hh{sfx}.weight"],
                                                 p[f"ln_hh{sfx}.bias"], p[f"ln_c{sfx}.weight"], p[f"ln_c{sfx}.bias"],
                                                 zeros, zeros, 1e-5, direction == 1)[0])
            layer_input = torch.cat(outs, -1)
        return [layer_input]

    ours_fwd = lambda tn, be: [tn["module"](tn["x"])[0]]  # noqa: E731
    flops = sum(2 * t * b * 4 * h * ((i if layer == 0 else dirs * h) + h) * dirs for layer in range(layers))
    variant = "LayerNormLSTM" + f", {layers} layers" * (layers > 1) + (" bidirectional" if bidirectional else "")
    common = dict(op="rnn", shape=(b, i, h, t), dtype=dtype, suites=suites, variant=variant,
                  ref_name="eager LayerNorm-LSTM loop")
    out = []
    if "fwd" in modes:  # inference: no autograd graph on either side
        out.append(Case(mode="fwd", make=lambda dev, dt: make(dev, dt, False), ours=_no_grad(ours_fwd),
                        ref=_no_grad(eager), flops=flops, **common))
    if "fwd+bwd" in modes:
        out.append(Case(mode="fwd+bwd", make=lambda dev, dt: make(dev, dt, True),
                        ours=lambda tn, be: _grads(ours_fwd(tn, be), [tn["x"], *tn["module"].parameters()], [tn["go"]]),
                        ref=lambda tn: _grads(eager(tn), [tn["x"], *tn["params"]], [tn["go"]]),
                        flops=3 * flops, **common))
    return out


# ---- convolutions -----------------------------------------------------------------------------
def _no_grad(fn):
    def run(*args):
        with torch.no_grad():
            return fn(*args)
    return run


def _fwd_and_bwd(modes, make, fused, eager, leaves, cost: dict, **common) -> list[Case]:
    """The "fwd" (inference: no autograd graph) and "fwd+bwd" cases of one op and shape. ``cost`` is the
    forward's {"flops": n} (tripled for fwd+bwd) or {"bytes": (fwd, fwd+bwd)}."""
    out = []
    if "fwd" in modes:
        fwd_cost = {"flops": cost["flops"]} if "flops" in cost else {"bytes": cost["bytes"][0]}
        out.append(Case(mode="fwd", make=lambda d, dt: make(d, dt, False), ours=_no_grad(fused), ref=_no_grad(eager),
                        **fwd_cost, **common))
    if "fwd+bwd" in modes:
        bwd_cost = {"flops": 3 * cost["flops"]} if "flops" in cost else {"bytes": cost["bytes"][1]}
        out.append(Case(mode="fwd+bwd", make=lambda d, dt: make(d, dt, True),
                        ours=lambda t, be: _grads(fused(t, be), leaves(t), [t["gy"]]),
                        ref=lambda t: _grads(eager(t), leaves(t), [t["gy"]]), **bwd_cost, **common))
    return out


def _text_cnn_cases(b, l, e, filters, widths, dtype, modes, suites, full_length=False):
    """The TextCNN block against the eager code a user writes (conv1d + relu + masked max + cat), lengths
    uniform in [L/3, L] (or all L). FLOPs: the convolutions over every position, as eager computes them."""
    g = torch.Generator().manual_seed(7)
    lengths = torch.full((b,), l) if full_length else torch.randint(l // 3, l + 1, (b,), generator=g)

    def make(device, dt, grad):
        ws = [_randn((filters, e, k), device, dt, grad, 10 + k) * (e * k) ** -0.5 for k in widths]
        ws = [w.detach().requires_grad_(grad) for w in ws]
        return dict(x=_randn((b, l, e), device, dt, grad, 0), ws=ws,
                    bs=[_randn(filters, device, dt, grad, 20 + k) for k in widths],
                    gy=_randn((b, filters * len(widths)), device, dt, False, 1), lengths=lengths.to(device))

    fused = lambda t, be: [text_cnn_pool(t["x"], t["ws"], t["bs"], "relu", t["lengths"], backend=be)]  # noqa: E731
    eager = lambda t: [text_cnn_pool_eager(t["x"], t["ws"], t["bs"], "relu", t["lengths"])]  # noqa: E731
    leaves = lambda t: [t["x"], *t["ws"], *t["bs"]]  # noqa: E731
    flops = sum(2 * b * (l - k + 1) * k * e * filters for k in widths)
    common = dict(op="text_cnn_pool", shape=(b, l, e, filters), dtype=dtype, suites=suites,
                  variant="all lengths L" if full_length else "lengths in [L/3, L]",
                  ref_name="eager conv1d + relu + masked max + cat")
    return _fwd_and_bwd(modes, make, fused, eager, leaves, {"flops": flops}, **common)


def _conv_cases(x_shape, cout, k, activation, residual, dtype, modes, suites, *, stride=1, groups=1,
                channels_last=False):
    """conv1d / conv2d + bias + activation (+ residual), fused epilogue, against eager F.conv + act + add.
    ``groups`` = C_in = C_out is a depthwise convolution; ``channels_last`` gives x (and the residual)
    in that memory format, as a channels_last network would hand them over, and a conv1d's x laid out
    [B, L, C] (a sequence model's hidden states transposed to [B, C, L]; the rest contiguous)."""
    nd = len(x_shape) - 2
    conv, fused_conv = (F.conv1d, conv1d) if nd == 1 else (F.conv2d, conv2d)
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation]
    cin, spatial = x_shape[1], x_shape[2:]
    spatial = [(n + 2 * (k // 2) - k) // stride + 1 for n in spatial]
    out_shape = (x_shape[0], cout, *spatial)
    fmt = torch.channels_last if channels_last and nd == 2 else torch.contiguous_format

    def make(device, dt, grad):
        w = (_randn((cout, cin // groups, *([k] * nd)), device, dt, False, 1) * (cin // groups * k ** nd) ** -0.5)
        if channels_last and nd == 1:
            x = _randn((x_shape[0], x_shape[2], x_shape[1]), device, dt, False, 0).transpose(1, 2)
        else:
            x = _randn(x_shape, device, dt, False, 0).contiguous(memory_format=fmt)
        x = x.requires_grad_(grad)
        r = _randn(out_shape, device, dt, False, 3).contiguous(memory_format=fmt).requires_grad_(grad)
        return dict(x=x, w=w.requires_grad_(grad), b=_randn(cout, device, dt, grad, 2), r=r if residual else None,
                    gy=_randn(out_shape, device, dt, False, 4).contiguous(memory_format=fmt))

    def eager(t):
        y = act(conv(t["x"], t["w"], t["b"], stride=stride, padding=k // 2, groups=groups))
        return [y + t["r"] if residual else y]

    fused = lambda t, be: [fused_conv(t["x"], t["w"], t["b"], stride=stride, padding=k // 2,  # noqa: E731
                                      groups=groups, activation=activation, residual=t["r"], backend=be)]
    leaves = lambda t: [t["x"], t["w"], t["b"]] + ([t["r"]] if residual else [])  # noqa: E731
    flops = 2 * out_shape[0] * cout * (cin // groups) * k ** nd * int(torch.tensor(spatial).prod())
    kind = ("depthwise " if groups == cin == cout and groups > 1 else f"groups={groups} " if groups > 1 else "")
    variant = (f"{kind}conv{nd}d k={k}" + (f" stride {stride}" if stride > 1 else "")
               + ((" channels_last" if nd == 2 else " x as [B, L, C]") if channels_last else "")
               + f", bias + {activation}"
               + (" + residual" if residual else ""))
    common = dict(op="conv", shape=(*x_shape, cout), dtype=dtype, suites=suites, variant=variant,
                  ref_name=f"eager F.conv{nd}d + F.{activation}" + (" + add" if residual else ""))
    return _fwd_and_bwd(modes, make, fused, eager, leaves, {"flops": flops}, **common)


def _causal_conv1d_cases(b, c, l, width, dtype, modes, suites, blc=False):
    """Depthwise causal conv + SiLU against eager (grouped F.conv1d, cut, F.silu). The op is
    memory-bound: its "% of copy" column is the distance to a plain copy of the same bytes. ``blc``: x
    (and grad_y) laid out [B, L, C], a sequence model's activation transposed, as Mamba hands it over."""
    nbytes = b * c * l * torch.tensor([], dtype=dtype).element_size()

    def seq(seed, device, dt):
        return (_randn((b, l, c), device, dt, False, seed).transpose(1, 2) if blc
                else _randn((b, c, l), device, dt, False, seed))

    def make(device, dt, grad):
        return dict(x=seq(0, device, dt).requires_grad_(grad),
                    w=(_randn((c, width), device, dt, False, 1) * 0.5).requires_grad_(grad),
                    b=_randn(c, device, dt, grad, 2), gy=seq(3, device, dt))

    fused = lambda t, be: [causal_conv1d(t["x"], t["w"], t["b"], "silu", backend=be)]  # noqa: E731
    eager = lambda t: [causal_conv1d_eager(t["x"], t["w"], t["b"], "silu")]  # noqa: E731
    leaves = lambda t: [t["x"], t["w"], t["b"]]  # noqa: E731
    common = dict(op="causal_conv1d", shape=(b, c, l), dtype=dtype, suites=suites,
                  variant=f"width {width} + silu" + (", x as [B, L, C]" if blc else ""),
                  ref_name="eager grouped F.conv1d + F.silu")
    # forward: read x, write y; + backward: read grad_y and x, write grad_x
    return _fwd_and_bwd(modes, make, fused, eager, leaves, {"bytes": (2 * nbytes, 5 * nbytes)}, **common)


# ---- distillation loss ------------------------------------------------------------------------
def _distillation_cases(n, v, dtype, modes, suites):
    """The fused KD loss against the eager code users write: F.kl_div on log-softmaxes (batchmean,
    times T^2) plus F.cross_entropy. Memory-bound: the least it must move is reading both logit
    tensors (forward) and writing the student's gradient (backward)."""
    nbytes = n * v * torch.tensor([], dtype=dtype).element_size()
    T, alpha = 2.0, 0.5

    def make(device, dt, grad):
        g = torch.Generator().manual_seed(3)
        return dict(s=_randn((n, v), device, dt, grad, 0) * 1.0, t=_randn((n, v), device, dt, False, 1),
                    y=torch.randint(0, v, (n,), generator=g).to(device), gy=torch.ones((), device=device))

    def eager(t):
        kl = F.kl_div(F.log_softmax(t["s"] / T, -1), F.log_softmax(t["t"] / T, -1), reduction="batchmean",
                      log_target=True)
        loss = alpha * kl * T * T + (1 - alpha) * F.cross_entropy(t["s"], t["y"])
        return [loss.to(torch.promote_types(loss.dtype, torch.float32))]  # ours returns fp32 (fp64 for fp64)

    fused = lambda t, be: [distillation_loss(t["s"], t["t"], t["y"], T, alpha, backend=be)]  # noqa: E731
    leaves = lambda t: [t["s"]]  # noqa: E731
    common = dict(op="distillation_loss", shape=(n, v), dtype=dtype, suites=suites, variant="T=2, alpha=0.5",
                  ref_name="eager F.kl_div(log_softmax) * T^2 + F.cross_entropy")

    def make_leaf(d, dt, grad):  # the student must be a leaf to receive its gradient
        t = make(d, dt, grad)
        t["s"] = t["s"].detach().requires_grad_(grad)
        return t

    return _fwd_and_bwd(modes, make_leaf, fused, eager, leaves, {"bytes": (2 * nbytes, 3 * nbytes)}, **common)


# ---- classifiers: a training step (forward + backward), or inference ---------------------------
def _classifier_cases(kind, b, l, vocab, dtype, suites, cell="lstm", mode="fwd+bwd"):
    """bignlp_fast.models' TextCNN / RNN classifier against the same model written with torch.nn
    (same weights; dropout 0), lengths uniform in [L/3, L]: loss and its gradients (one training
    step without the optimizer; mode "fwd+bwd"), or the logits under torch.no_grad (mode "fwd").
    FLOPs: the convolutions / recurrent layers, as eager computes them."""
    from bignlp_fast.models import RNNClassifier, RNNClassifierConfig, TextCNNClassifier, TextCNNConfig
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(l // 3, l + 1, (b,), generator=g)
    ids = torch.randint(1, vocab, (b, l), generator=g)
    labels = torch.randint(0, 2, (b,), generator=g)
    if kind == "textcnn":
        cfg = TextCNNConfig(vocab_size=vocab, embed_dim=300, num_filters=100, widths=(3, 4, 5), dropout=0.0)
        flops = sum(2 * b * (l - k + 1) * k * 300 * 100 for k in cfg.widths)
    else:
        cfg = RNNClassifierConfig(vocab_size=vocab, embed_dim=256, hidden_size=256, cell=cell, dropout=0.0)
        flops = 2 * b * l * (4 if cell == "lstm" else 3) * 256 * (256 + 256) * 2
    if mode == "fwd+bwd":
        flops *= 3

    def torch_model(ours):
        """The same model in plain torch.nn, sharing ours' weights (a user's hand-written version)."""
        if kind == "textcnn":
            def fwd(ids, lengths):
                x = ours.embedding(ids).transpose(1, 2)
                outs = []
                for conv in ours.text_cnn.convs:
                    y = F.relu(F.conv1d(x, conv.weight, conv.bias))
                    invalid = torch.arange(y.shape[-1])[None, :] > (lengths[:, None] - conv.kernel_size[0])
                    outs.append(y.masked_fill(invalid[:, None, :], float("-inf")).amax(-1))
                return ours.classifier(torch.cat(outs, 1))
            fwd.params = [p for conv in ours.text_cnn.convs for p in conv.parameters()]
            return fwd
        rnn = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(256, 256, batch_first=True, bidirectional=True)
        rnn = rnn.to(ours.classifier.weight.dtype)
        rnn.load_state_dict(ours.rnn.state_dict())

        def fwd(ids, lengths):
            packed = torch.nn.utils.rnn.pack_padded_sequence(ours.embedding(ids), lengths, batch_first=True,
                                                             enforce_sorted=False)
            _, state = rnn(packed)
            h_n = state[0] if cell == "lstm" else state
            return ours.classifier(torch.cat([h_n[-2], h_n[-1]], -1))
        fwd.params = list(rnn.parameters())
        return fwd

    def make(device, dt):
        torch.manual_seed(0)
        ours = (TextCNNClassifier(cfg) if kind == "textcnn" else RNNClassifier(cfg)).to(device, dt)
        return dict(ids=ids.to(device), lengths=lengths, labels=labels.to(device), gy=torch.ones((), device=device, dtype=dt),
                    models={dt: (ours, torch_model(ours))})

    def models(t):
        dt = t["gy"].dtype
        if dt not in t["models"]:  # the float64 reference: a float64 copy of the torch.nn model
            ours, _ = next(iter(t["models"].values()))
            copy = (TextCNNClassifier(cfg) if kind == "textcnn" else RNNClassifier(cfg)).to(dt)
            copy.load_state_dict(ours.state_dict())
            t["models"][dt] = (copy, torch_model(copy))
        return t["models"][dt]

    def step(logits, t, params):
        loss = F.cross_entropy(logits, t["labels"]).to(t["gy"].dtype)
        return _grads([loss], params, [t["gy"]])

    # A training step computes the gradient of every parameter (conv / RNN weights included), in the
    # same order on both sides: the torch.nn RNN holds its own copy of ours' weights (fwd.params).
    def ours_step(t, be):
        model, _ = models(t)
        return step(model(t["ids"], t["lengths"]).logits, t, list(model.parameters()))

    def ref_step(t):
        model, fwd = models(t)
        params = [model.embedding.weight, *fwd.params, *model.classifier.parameters()]
        return step(fwd(t["ids"], t["lengths"]), t, params)

    def ours_logits(t, be):
        model, _ = models(t)
        with torch.no_grad():
            return [model(t["ids"], t["lengths"]).logits]

    def ref_logits(t):
        _, fwd = models(t)
        with torch.no_grad():
            return [fwd(t["ids"], t["lengths"])]

    variant = "TextCNN" if kind == "textcnn" else f"{cell.upper()} bidirectional"
    op = "text_cnn_pool" if kind == "textcnn" else "rnn"
    train = mode == "fwd+bwd"
    return [Case(op=op, mode=mode, shape=(b, l), dtype=dtype, make=make, ours=ours_step if train else ours_logits,
                 ref=ref_step if train else ref_logits, ref_name="the same model written with torch.nn", flops=flops,
                 suites=suites, variant=f"{variant} classifier {'training step' if train else 'inference'}")]


def all_cases() -> list[Case]:
    from bignlp_fast.bench.models import model_cases
    cases = model_cases()  # end to end first: BERT, GPT-2 against transformers
    # convolutions: the TextCNN block (B 64, L 256, E 300, 100 filters of widths 3, 4, 5),
    # conv1d 256 -> 256 channels over 512 positions, a small conv2d layer, the causal conv of gated models
    both = ("fwd", "fwd+bwd")
    cases += _text_cnn_cases(64, 256, 300, 100, (3, 4, 5), torch.float32, both, ("quick", "full"))
    cases += _text_cnn_cases(64, 256, 300, 100, (3, 4, 5), torch.float32, ("fwd",), ("quick", "full"), full_length=True)
    cases += _text_cnn_cases(64, 256, 300, 100, (3, 4, 5), torch.bfloat16, ("fwd",), ("full",))
    cases += _conv_cases((32, 256, 512), 256, 3, "relu", False, torch.float32, ("fwd",), ("quick", "full"))
    cases += _conv_cases((32, 256, 512), 256, 3, "gelu", True, torch.float32, both, ("quick", "full"))
    cases += _conv_cases((16, 64, 32, 32), 64, 3, "gelu", True, torch.float32, both, ("full",))
    # a wider conv2d layer (on AVX2 builds Winograd's F(2x2, 3x3) runs from 128 input channels)
    cases += _conv_cases((4, 128, 32, 32), 128, 3, "gelu", True, torch.float32, both, ("full",))
    # depthwise convolutions, on the CPU backend's own per-plane kernels: 3x3 (MobileNet / ConvNeXt-style
    # blocks) in float32 and bfloat16, and a depthwise conv1d of width 7 over a sequence's hidden states
    cases += _conv_cases((16, 128, 56, 56), 128, 3, "silu", False, torch.float32, both, ("full",), groups=128)
    cases += _conv_cases((16, 128, 56, 56), 128, 3, "silu", False, torch.bfloat16, both, ("full",), groups=128)
    cases += _conv_cases((32, 512, 512), 512, 7, "gelu", False, torch.float32, both, ("full",), groups=512)
    # the same with x as a sequence model holds it, [B, L, C] transposed to [B, C, L] (Conformer-style blocks)
    cases += _conv_cases((32, 512, 512), 512, 7, "gelu", False, torch.float32, both, ("full",), groups=512,
                         channels_last=True)
    # the shapes that run on ATen's convolution with our epilogue after it (see ops/conv.py): 1x1 (pointwise),
    # stride 2, bfloat16, channels_last
    cases += _conv_cases((32, 256, 512), 1024, 1, "gelu", False, torch.float32, both, ("full",))
    cases += _conv_cases((16, 64, 64, 64), 128, 3, "relu", False, torch.float32, both, ("full",), stride=2)
    cases += _conv_cases((32, 256, 512), 256, 3, "gelu", True, torch.bfloat16, both, ("full", "gpu"))
    cases += _conv_cases((16, 64, 32, 32), 64, 3, "gelu", True, torch.float32, both, ("full",), channels_last=True)
    cases += _causal_conv1d_cases(8, 1024, 2048, 4, torch.float32, both, ("quick", "full"))
    cases += _causal_conv1d_cases(8, 1024, 2048, 4, torch.bfloat16, both, ("full",))
    cases += _causal_conv1d_cases(8, 1024, 2048, 4, torch.float32, both, ("full",), blc=True)
    cases += _causal_conv1d_cases(8, 1024, 2048, 4, torch.bfloat16, both, ("full",), blc=True)
    # classifiers: a training step of the models against the same models written with torch.nn
    cases += _classifier_cases("textcnn", 64, 256, 20000, torch.float32, ("quick", "full"))
    cases += _classifier_cases("rnn", 32, 128, 20000, torch.float32, ("full",), cell="gru")
    cases += _classifier_cases("rnn", 32, 128, 20000, torch.float32, ("full",), cell="lstm")
    for dtype in (torch.float32, torch.bfloat16):  # inference, float32 beside bfloat16
        cases += _classifier_cases("textcnn", 64, 256, 20000, dtype, ("full",), mode="fwd")
        cases += _classifier_cases("rnn", 32, 128, 20000, dtype, ("full",), cell="gru", mode="fwd")
        cases += _classifier_cases("rnn", 32, 128, 20000, dtype, ("full",), cell="lstm", mode="fwd")
    # distillation loss: 512 tokens over a BERT-sized vocabulary
    cases += _distillation_cases(512, 30522, torch.float32, both, ("quick", "full"))
    cases += _distillation_cases(512, 30522, torch.bfloat16, both, ("full",))
    # linear: an RNN's input projection (T*B = 4096 rows, I = 512 -> 4H = 2048), BERT-base's FFN
    cases += _linear_cases(4096, 512, 2048, torch.float32, ("fwd", "fwd+bwd"), ("quick", "full"))
    cases += _linear_cases(1024, 768, 3072, torch.float32, ("fwd",), ("full",))
    cases += _linear_cases(1024, 768, 3072, torch.bfloat16, ("fwd",), ("full",))
    # decoding-sized products against GPT-2's lm_head (154 MB: read from memory at every call)
    for rows in (1, 2, 8):
        cases += _linear_cases(rows, 768, 50257, torch.float32, ("fwd",), ("full",), variant="GPT-2 lm_head, decoding")
    # recurrent layers: the shapes (I = H = 512, B 32 and 4, T 128; H 128, B 16, T 64)
    both = ("fwd", "fwd+bwd")
    for kind in ("LSTM", "GRU"):
        cases += _rnn_cases(kind, 32, 512, 512, 128, torch.float32, both, ("quick", "full"))
        cases += _rnn_cases(kind, 4, 512, 512, 128, torch.float32, both, ("full",))
        cases += _rnn_cases(kind, 16, 128, 128, 64, torch.float32, both, ("full",))
        cases += _rnn_cases(kind, 32, 512, 512, 128, torch.float32, both, ("full",), layers=2, bidirectional=True)
        cases += _rnn_cases(kind, 32, 512, 512, 128, torch.bfloat16, ("fwd",), ("full",))
    # inference of a short sequence, and of B4 T128, with the weights packed once (ops.prepack)
    cases += _rnn_cases("LSTM", 1, 512, 512, 16, torch.float32, ("fwd",), ("full",))
    for b, t in ((1, 16), (4, 128)):
        cases += _rnn_cases("LSTM", b, 512, 512, t, torch.float32, ("fwd",), ("full",), prepack=True)
    # the cells, stepped by a Python loop as a decoder would (I = H = 512, 16 steps, B 4 and 32)
    for b in (4, 32):
        cases += _rnn_cell_cases("LSTMCell", b, 512, 512, 16, torch.float32, ("full",))
    cases += _rnn_cell_cases("LSTMCell", 32, 512, 512, 16, torch.bfloat16, ("full",))
    for kind in ("GRUCell", "RNNCell"):
        cases += _rnn_cell_cases(kind, 32, 512, 512, 16, torch.float32, ("full",))
    # ... with their weights packed once (ops.prepack): both products of a step in one parallel region
    for b in (1, 4, 32):
        cases += _rnn_cell_cases("LSTMCell", b, 512, 512, 16, torch.float32, ("full",), prepack=True)
    for kind in ("GRUCell", "RNNCell"):
        cases += _rnn_cell_cases(kind, 32, 512, 512, 16, torch.float32, ("full",), prepack=True)
    # LayerNormLSTM against the eager loop a user would write (torch has no such layer)
    cases += _layer_norm_lstm_cases(32, 512, 512, 128, torch.float32, both, ("quick", "full"))
    cases += _layer_norm_lstm_cases(4, 512, 512, 128, torch.float32, both, ("full",))
    cases += _layer_norm_lstm_cases(32, 512, 512, 128, torch.bfloat16, ("fwd",), ("full",))
    # attention: the CPU shape, BERT-base heads at 512 tokens; a long sequence against the
    # unfused path (peak memory); GPU-sized cases where a GPU runs them
    both = ("fwd", "fwd+bwd")
    for causal in (False, True):
        cases += _attention_cases(8, 12, 512, 512, 64, torch.float32, causal, both, ("quick", "full"))
    cases += _attention_cases(8, 12, 512, 512, 64, torch.bfloat16, False, ("fwd",), ("quick", "full"))
    cases += _attention_cases(8, 12, 512, 512, 64, torch.bfloat16, True, both, ("full",))
    cases += _attention_cases(1, 4, 4096, 4096, 64, torch.float32, True, ("fwd+bwd",), ("full",), ref_backend="math")
    # a padded batch's mask as transformers hands it: BERT-base heads at 128 tokens, and a decoding step
    # (one query against 64 cached keys) of left-padded prompts
    cases += _attention_cases(8, 12, 128, 128, 64, torch.float32, False, ("fwd",), ("full",), padding=True)
    cases += _attention_cases(8, 12, 1, 64, 64, torch.float32, False, ("fwd",), ("full",), padding=True)
    # MultiheadAttention (BERT-base's self-attention, B8 L128): the projections' GEMMs and the fused op
    cases += _multihead_attention_cases(8, 128, 768, 12, torch.float32, both, ("full",))
    cases += _multihead_attention_cases(8, 128, 768, 12, torch.bfloat16, ("fwd",), ("full",))
    # the GPU suite (bignlp-fast bench --gpu): the GPU shapes, bf16, D = 128, 16 heads (hidden
    # 2048), L from 512 to 16k at B * L = 16k tokens, against torch's best SDPA backend
    for length in (512, 2048, 8192, 16384):
        for causal in (False, True):
            cases += _attention_cases(16384 // length, 16, length, length, 128, torch.bfloat16, causal, both,
                                      ("gpu",), check_error=length <= 2048)
    # the GPU suite, the other ops against torch on CUDA (cuDNN for the RNN layers and convolutions):
    # the recurrent layers at batch 4 to 64, the convolution blocks at their CPU shapes in bf16
    for kind in ("LSTM", "GRU"):
        for b in (4, 16, 64):
            cases += _rnn_cases(kind, b, 512, 512, 128, torch.float32, both, ("gpu",))
        cases += _rnn_cases(kind, 64, 512, 512, 128, torch.bfloat16, both, ("gpu",))
    cases += _text_cnn_cases(64, 256, 300, 100, (3, 4, 5), torch.bfloat16, both, ("gpu",))
    cases += _conv_cases((16, 64, 32, 32), 64, 3, "gelu", True, torch.bfloat16, both, ("gpu",))
    cases += _causal_conv1d_cases(8, 1024, 2048, 4, torch.bfloat16, both, ("gpu",))
    for dtype in (torch.float32, torch.bfloat16):
        # (8192, 768): the target shape, 8192 tokens of a BERT-base-sized model
        cases += _add_layer_norm_cases(8192, 768, dtype, ("quick", "full"))
        cases += _bias_gelu_cases(8192, 768, dtype, ("quick", "full"))
        # in-cache sizes (BERT-base, batch 8 x 128 tokens) and the FFN's intermediate width
        cases += _add_layer_norm_cases(1024, 768, dtype, ("full",))
        cases += _bias_gelu_cases(1024, 3072, dtype, ("full",))
        cases += _bias_gelu_cases(8192, 3072, dtype, ("full",))
    return cases


def cases(suite: str = "quick") -> list[Case]:
    return [c for c in all_cases() if suite in c.suites]


def tiny_cases() -> list[Case]:
    """Small versions of every op's cases, for testing the benchmark machinery itself."""
    out = []
    for dtype in (torch.float32,):
        out += _add_layer_norm_cases(16, 40, dtype, ("tiny",)) + _bias_gelu_cases(16, 40, dtype, ("tiny",))
        out += _attention_cases(1, 2, 9, 9, 8, dtype, True, ("fwd", "fwd+bwd"), ("tiny",))
        out += _attention_cases(2, 2, 9, 9, 8, dtype, False, ("fwd", "fwd+bwd"), ("tiny",), padding=True)
        out += _linear_cases(9, 5, 7, dtype, ("fwd", "fwd+bwd"), ("tiny",))
        out += _multihead_attention_cases(2, 5, 8, 2, dtype, ("fwd", "fwd+bwd"), ("tiny",))
        out += _rnn_cases("LSTM", 2, 5, 7, 3, dtype, ("fwd", "fwd+bwd"), ("tiny",), layers=2, bidirectional=True)
        out += _layer_norm_lstm_cases(2, 5, 7, 3, dtype, ("fwd", "fwd+bwd"), ("tiny",), layers=2, bidirectional=True)
        out += _rnn_cell_cases("GRUCell", 2, 5, 7, 3, dtype, ("tiny",))
        out += _text_cnn_cases(3, 11, 6, 4, (2, 3), dtype, ("fwd", "fwd+bwd"), ("tiny",))
        out += _conv_cases((2, 4, 9), 5, 3, "gelu", True, dtype, ("fwd", "fwd+bwd"), ("tiny",))
        out += _conv_cases((2, 3, 5, 6), 4, 3, "relu", False, dtype, ("fwd",), ("tiny",))
        out += _causal_conv1d_cases(2, 3, 17, 4, dtype, ("fwd", "fwd+bwd"), ("tiny",))
        out += _distillation_cases(3, 50, dtype, ("fwd", "fwd+bwd"), ("tiny",))
        out += _classifier_cases("textcnn", 3, 12, 30, dtype, ("tiny",))
        out += _classifier_cases("rnn", 3, 6, 30, dtype, ("tiny",), cell="gru")
    from bignlp_fast.bench.models import tiny_model_cases
    return out + tiny_model_cases()


def to_float64(inputs: dict) -> dict:
    """A float64 copy of a case's inputs, leaves requiring grad where the originals do."""
    def f64(v):
        if isinstance(v, Tensor) and v.is_floating_point():
            return v.detach().double().requires_grad_(v.requires_grad)
        if isinstance(v, list):
            return [f64(u) for u in v]
        return v

    return {k: f64(v) for k, v in inputs.items()}
