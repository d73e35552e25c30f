"""The layer_norm_lstm_layer op (one LayerNorm-LSTM layer, one direction, the whole time loop) on
each backend against the torch reference run in float64: outputs, final states and the gradients of
every input; opcheck; and the LayerNormLSTM module on the fused op against the same module on the
reference."""

import copy

import pytest
import torch

import bignlp_fast
from bignlp_fast import nn as bnn
from bignlp_fast.ops.layer_norm_lstm import layer_norm_lstm_layer, layer_norm_lstm_math
from conftest import backend_params
from reference import assert_within_torch_error

BACKENDS = backend_params("cpu", "torch")


def _inputs(t, b, hidden, dtype, params=True, seed=0):
    """xw (already normalised, as ln_ih gives it), w_hh, ln_hh's and ln_c's scale and shift, h0, c0."""
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, scale=1.0, shift=0.0: (torch.randn(*shape, generator=g) * scale + shift).to(dtype)  # noqa: E731
    gh = 4 * hidden
    affine = [make(gh, scale=0.3, shift=1.0), make(gh, scale=0.3), make(hidden, scale=0.3, shift=1.0),
              make(hidden, scale=0.3)] if params else [None] * 4
    return [make(t, b, gh), make(gh, hidden, scale=hidden ** -0.5), *affine, make(b, hidden), make(b, hidden)]


def _run(inputs, reverse, backend, lengths=None):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    outs = list(layer_norm_lstm_layer(*leaves, eps=1e-5, reverse=reverse, lengths=lengths, backend=backend))
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    present = [x for x in leaves if x is not None]
    return outs + list(torch.autograd.grad(outs, present, cotangents))


CASES = [  # (t, b, hidden, reverse, with LayerNorm scales and shifts, lengths)
    (1, 1, 1, False, True, None),
    (5, 3, 7, True, True, None),
    (9, 4, 37, False, True, None),            # hidden not a multiple of the vector width
    (6, 5, 16, True, False, None),            # no scales and shifts (LayerNorm(elementwise_affine=False))
    (4, 9, 40, False, True, None),            # more rows than a register tile
    (9, 4, 37, True, True, [9, 3, 0, 5]),     # lengths in any order, one empty sequence
    (7, 3, 20, False, True, [2, 7, 1]),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_float64(backend, device, case, dtype):
    t, b, hidden, reverse, params, lengths = case
    lengths = torch.tensor(lengths) if lengths is not None else None
    inputs = _inputs(t, b, hidden, dtype, params)
    ours = _run(inputs, reverse, backend, lengths)
    theirs = _run(inputs, reverse, "torch", lengths)  # PyTorch's own error in this dtype
    ref = _run([x.double() if x is not None else None for x in inputs], reverse, "torch", lengths)
    names = ["out", "h_n", "c_n"] + [n for n, x in zip(["d_xw", "d_w_hh", "d_gamma_h", "d_beta_h", "d_gamma_c",
                                                        "d_beta_c", "d_h0", "d_c0"], inputs) if x is not None]
    assert len(names) == len(ours)
    for name, a, c, r in zip(names, ours, theirs, ref):
        assert_within_torch_error(f"{backend} {case} {dtype} {name}", a, c, r, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("hidden", [3, 7, 17, 16])
def test_states_with_a_large_mean_keep_their_variance(backend, device, hidden):
    # c' = c0 (input gate shut, forget gate open): values of mean 100 and spread ~0.01. The CPU kernel
    # counted the zeros padding H to whole vectors and took their mean^2 out afterwards, which cancelled
    # the variance away (H = 3: h' off by 23%); H = 16 fills its vectors
    g = torch.Generator().manual_seed(0)
    xw = torch.cat([torch.full((1, 2, hidden), -30.0), torch.full((1, 2, hidden), 30.0),
                    torch.randn(1, 2, 2 * hidden, generator=g)], dim=-1)
    c0 = 100 + 0.01 * torch.randn(2, hidden, generator=g)
    w_hh = torch.randn(4 * hidden, hidden, generator=g) * 0.1
    inputs = [xw, w_hh, None, None, None, None, torch.zeros(2, hidden), c0]  # (no LayerNorm scales or shifts)
    ours = _run(inputs, False, backend)
    theirs = _run(inputs, False, "torch")
    ref = _run([x.double() if x is not None else None for x in inputs], False, "torch")
    for name, a, c, r in zip(["out", "h_n", "c_n", "d_xw", "d_w_hh", "d_h0", "d_c0"], ours, theirs, ref):
        assert_within_torch_error(f"{backend} H={hidden} {name}", a, c, r, torch.float32)


def test_reference_is_the_written_out_formula():
    """The reference loop against the cell written with torch.nn.LayerNorm modules, in float64."""
    torch.manual_seed(0)
    hidden = 6
    ln_hh, ln_c = torch.nn.LayerNorm(4 * hidden).double(), torch.nn.LayerNorm(hidden).double()
    with torch.no_grad():
        for p in (*ln_hh.parameters(), *ln_c.parameters()):
            p.add_(0.2 * torch.randn_like(p))
    xw, w, h, c = torch.randn(3, 2, 4 * hidden).double(), torch.randn(4 * hidden, hidden).double(), \
        torch.randn(2, hidden).double(), torch.randn(2, hidden).double()
    out, h_n, c_n = layer_norm_lstm_math(xw, w, ln_hh.weight, ln_hh.bias, ln_c.weight, ln_c.bias, h, c, 1e-5, False)
    for t in range(3):
        i, f, g, o = (xw[t] + ln_hh(h @ w.t())).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(ln_c(c))
        torch.testing.assert_close(out[t], h)
    torch.testing.assert_close(h_n, h)
    torch.testing.assert_close(c_n, c)


def test_inference_equals_training_forward():
    inputs = _inputs(7, 3, 21, torch.float32)
    with torch.no_grad():  # no workspace written
        inference = layer_norm_lstm_layer(*inputs, backend="cpu")
    training = layer_norm_lstm_layer(*[x.clone().requires_grad_() for x in inputs], backend="cpu")
    for a, b in zip(inference, training):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradcheck_of_the_reference():
    """The written-out reference backward against finite differences, with lengths."""
    inputs = [x.double().requires_grad_() for x in _inputs(4, 3, 5, torch.float64)]
    lengths = torch.tensor([4, 1, 2])
    assert torch.autograd.gradcheck(
        lambda *a: layer_norm_lstm_layer(*a, reverse=True, lengths=lengths, backend="torch"), inputs)


def test_lengths_equal_each_sequence_alone():
    inputs = _inputs(8, 3, 19, torch.float32)
    lengths = torch.tensor([8, 3, 5])
    for reverse in (False, True):
        out, h_n, c_n = layer_norm_lstm_layer(*inputs, reverse=reverse, lengths=lengths, backend="cpu")
        for b, n in enumerate(lengths.tolist()):
            row = [inputs[0][:n, b:b + 1], *inputs[1:6], inputs[6][b:b + 1], inputs[7][b:b + 1]]
            o, h, c = layer_norm_lstm_layer(*row, reverse=reverse, backend="cpu")
            torch.testing.assert_close(out[:n, b:b + 1], o, rtol=1e-5, atol=1e-6)
            assert (out[n:, b] == 0).all()
            torch.testing.assert_close(h_n[b:b + 1], h, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c_n[b:b + 1], c, rtol=1e-5, atol=1e-6)


def _op_samples(backend):
    fwd, bwd = [], []
    for t, b, hidden, reverse, params, lengths in CASES[:4] + CASES[5:6]:
        inputs = _inputs(t, b, hidden, torch.float32, params)
        lengths = torch.tensor(lengths) if lengths is not None else None
        out, h_n, c_n, ws = torch.ops.bignlp_fast.layer_norm_lstm_fwd(*inputs, lengths, 1e-5, reverse, True, backend)
        fwd.append((*inputs, lengths, 1e-5, reverse, True, backend))
        g = torch.Generator().manual_seed(3)
        grads = [torch.randn(x.shape, generator=g) for x in (out, h_n, c_n)]
        bwd.append((*grads, *inputs, lengths, ws, 1e-5, reverse, backend))
    return fwd, bwd


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck(backend):
    fwd, bwd = _op_samples(backend)
    for args in fwd:
        torch.library.opcheck(torch.ops.bignlp_fast.layer_norm_lstm_fwd.default, args)
    for args in bwd:
        torch.library.opcheck(torch.ops.bignlp_fast.layer_norm_lstm_bwd.default, args)


def test_bad_input_names_the_argument():
    xw, w, gh, bh, gc, bc, h0, c0 = _inputs(4, 2, 3, torch.float32)
    with pytest.raises(ValueError, match=r"xw must be \[T, B, 4H\]"):
        layer_norm_lstm_layer(xw[0], w, gh, bh, gc, bc, h0, c0)
    with pytest.raises(ValueError, match=r"w_hh must be \[4H, H\] with 4H = 12"):
        layer_norm_lstm_layer(xw, w[:8], gh, bh, gc, bc, h0, c0)
    with pytest.raises(ValueError, match=r"gamma_c must have shape \(3,\)"):
        layer_norm_lstm_layer(xw, w, gh, bh, gh, bc, h0, c0)
    with pytest.raises(ValueError, match=r"c0 must have shape \(2, 3\)"):
        layer_norm_lstm_layer(xw, w, gh, bh, gc, bc, h0, c0[:1])
    with pytest.raises(TypeError, match="h0 is torch.float64"):
        layer_norm_lstm_layer(xw, w, gh, bh, gc, bc, h0.double(), c0)
    with pytest.raises(ValueError, match="no time steps"):
        layer_norm_lstm_layer(xw[:0], w, gh, bh, gc, bc, h0, c0)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 4\]"):
        layer_norm_lstm_layer(xw, w, gh, bh, gc, bc, h0, c0, lengths=torch.tensor([5, 1]))
    with pytest.raises(ValueError, match=r"lengths must be an int64 CPU tensor of shape \(2,\)"):
        layer_norm_lstm_layer(xw, w, gh, bh, gc, bc, h0, c0, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(bignlp_fast.BackendError, match="float16"):
        layer_norm_lstm_layer(*[x.half() for x in (xw, w, gh, bh, gc, bc, h0, c0)], backend="cpu")


# ---- the module on the fused op -------------------------------------------------------------------
def _module_pair(**kwargs):
    torch.manual_seed(0)
    fused = bnn.LayerNormLSTM(5, 13, **kwargs)
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.2 * torch.randn_like(p))
    reference = bnn.LayerNormLSTM(5, 13, backend="torch", **kwargs)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


@pytest.mark.parametrize("kwargs", [{}, {"num_layers": 2, "bidirectional": True, "batch_first": True},
                                    {"bias": False}], ids=str)
def test_module_matches_the_reference(kwargs):
    """The module on the fused op and on the reference, in float32, both judged against the reference
    module run in float64 (DESIGN.md, Numerics): outputs, states and every gradient."""
    fused, reference = _module_pair(**kwargs)
    shape = (3, 6, 5) if kwargs.get("batch_first") else (6, 3, 5)
    x = torch.randn(shape)
    states = fused.num_layers * (2 if fused.bidirectional else 1)
    hx = (torch.randn(states, 3, 13), torch.randn(states, 3, 13))

    def run(m, dtype):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (x, *hx)]
        out, (h_n, c_n) = m(leaves[0], tuple(leaves[1:]))
        loss = out.square().sum() + h_n.sum() + 2 * c_n.sum()
        return [out, h_n, c_n, *torch.autograd.grad(loss, [*leaves, *m.parameters()])]

    ours, theirs = run(fused, torch.float32), run(reference, torch.float32)
    assert bignlp_fast.report() == []  # the fused path ran: no fallback recorded
    ref = run(reference.double(), torch.float64)
    names = ["out", "h_n", "c_n", "dx", "dh0", "dc0"] + [n for n, _ in fused.named_parameters()]
    for name, a, c, r in zip(names, ours, theirs, ref):
        assert_within_torch_error(f"LayerNormLSTM {kwargs} {name}", a, c, r, torch.float32)


def test_module_compiles_without_graph_breaks():
    fused, _ = _module_pair(num_layers=2)
    x = torch.randn(6, 3, 5)
    expected = fused(x)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True)
    out, (h_n, c_n) = compiled(x)
    torch.testing.assert_close(out, expected[0])
    torch.testing.assert_close(c_n, expected[1][1])


def test_module_bf16_within_torch_error():
    fused, reference = _module_pair(bidirectional=True)
    x = torch.randn(6, 3, 5)
    ref = reference.double()(x.double())[0]
    ours = fused.to(torch.bfloat16)(x.bfloat16())[0]
    theirs = reference.to(torch.bfloat16)(x.bfloat16())[0]
    assert_within_torch_error("LayerNormLSTM bf16 output", ours, theirs, ref, torch.bfloat16)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_module_packed_and_lengths_equal_each_sequence_alone(backend):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    fused, reference = _module_pair(num_layers=2, bidirectional=True, batch_first=True)
    fused.backend = backend
    ref64 = copy.deepcopy(reference).double()
    x = torch.randn(4, 7, 5)
    lengths = torch.tensor([3, 7, 1, 5])  # any order
    hx = (torch.randn(4, 4, 13), torch.randn(4, 4, 13))
    out, (h_n, c_n) = fused(x, hx, lengths=lengths)
    packed_out, (hp, cp) = fused(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), hx)
    padded, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=7)
    torch.testing.assert_close(padded, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hp, h_n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cp, c_n, rtol=1e-5, atol=1e-6)
    # each sequence of the batch against that sequence run alone, in float64 (DESIGN.md, Numerics): the
    # batched and the single run sum in different orders, and the LayerNorms magnify the difference
    for b, n in enumerate(lengths.tolist()):
        xb, hb = x[b:b + 1, :n], (hx[0][:, b:b + 1].contiguous(), hx[1][:, b:b + 1].contiguous())
        o64, (h64, c64) = ref64(xb.double(), (hb[0].double(), hb[1].double()))
        o32, (h32, c32) = reference(xb, hb)
        assert_within_torch_error(f"sequence {b} output", out[b:b + 1, :n], o32, o64, torch.float32)
        assert (out[b, n:] == 0).all()
        assert_within_torch_error(f"sequence {b} h_n", h_n[:, b:b + 1], h32, h64, torch.float32)
        assert_within_torch_error(f"sequence {b} c_n", c_n[:, b:b + 1], c32, c64, torch.float32)
    (padded.square().sum() + hp.sum()).backward()  # the packed path trains
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused.parameters())
