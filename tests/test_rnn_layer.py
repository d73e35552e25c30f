"""The rnn_layer op (one layer, one direction, the whole time loop) on each backend against the
torch reference run in float64: outputs, final states and the gradients of every input."""

import pytest
import torch

from bignlp_fast.ops import rnn_layer
from bignlp_fast.ops.rnn import GATES
from conftest import backend_params, tile_paths
from reference import assert_within_torch_error

BACKENDS = backend_params("cpu", "cuda", "torch", "triton")


def _inputs(mode, t, b, hidden, state, dtype, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    gh = GATES[mode] * hidden
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device, dtype)  # noqa: E731
    return [make(t, b, gh), make(gh, state, scale=state ** -0.5), make(gh) if bias else None, make(b, state),
            make(b, hidden) if mode == "lstm" else None,
            make(state, hidden, scale=hidden ** -0.5) if state != hidden else None]


def _run(mode, inputs, lengths, reverse, backend):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    out, h_n, c_n = rnn_layer(mode, *leaves, lengths=lengths, reverse=reverse, backend=backend)
    outs = [out, h_n] + ([c_n] if c_n is not None else [])
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    present = [x for x in leaves if x is not None]
    return outs + list(torch.autograd.grad(outs, present, cotangents))


CASES = [  # (t, b, hidden, state, lengths, reverse)
    (1, 1, 7, 7, None, False),
    (5, 3, 13, 13, None, True),
    (9, 4, 37, 37, [9, 3, 0, 5], True),   # lengths in any order, one empty sequence
    (9, 4, 37, 37, [2, 9, 1, 5], False),
    (6, 3, 40, 21, [6, 2, 4], True),      # LSTM with a projection (state 21 < hidden 40)
    (6, 17, 21, 21, [6, 3, 0, 1, 5, 6, 2, 4, 6, 1, 3, 5, 6, 2, 6, 4, 1], False),  # > one 16-row block
    (4, 2, 40, 40, [4, 2], False),        # even state >= 16: the CPU's vectorized bf16 weight packing (AMX)
    (1, 5, 40, 40, [1, 0, 1, 1, 0], True),  # one step (the cells' case: fp32 takes torch's GEMM, no
    (1, 3, 40, 21, [0, 1, 1], False),       # packing), > one block of units, empty rows, a projection
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_float64(backend, device, mode, case, dtype):
    t, b, hidden, state, lengths, reverse = case
    if state != hidden and mode != "lstm":
        pytest.skip("projections are an LSTM option")
    if dtype == torch.float16 and device.type != "cuda" and backend != "cuda":  # "cuda" on a CPU: emulated
        pytest.skip("float16 runs on CUDA tensors only")
    lengths = torch.tensor(lengths) if lengths is not None else None  # on the CPU on every device
    inputs = _inputs(mode, t, b, hidden, state, dtype, device=device)
    theirs = _run(mode, inputs, lengths, reverse, "torch")  # PyTorch's own error in this dtype
    ref = _run(mode, [x.double() if x is not None else None for x in inputs], lengths, reverse, "torch")
    for path, context in tile_paths(backend, dtype):
        with context():
            ours = _run(mode, inputs, lengths, reverse, backend)
        for k, (a, c, r) in enumerate(zip(ours, theirs, ref)):
            assert_within_torch_error(f"{backend} {path} {mode} {case} {dtype} output {k}", a, c, r, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_without_bias(backend, device):
    inputs = _inputs("gru", 6, 2, 24, 24, torch.float32, bias=False, device=device)
    ours, ref = _run("gru", inputs, None, False, backend), _run("gru", inputs, None, False, "torch")
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5)


def test_matches_torch_nn_lstm():
    lstm = torch.nn.LSTM(5, 6)
    x = torch.randn(7, 3, 5)
    ref, (h, c) = lstm(x)
    xw = torch.nn.functional.linear(x, lstm.weight_ih_l0, lstm.bias_ih_l0)
    out, h_n, c_n = rnn_layer("lstm", xw, lstm.weight_hh_l0, lstm.bias_hh_l0, torch.zeros(3, 6), torch.zeros(3, 6),
                              backend="cpu")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(h_n, h[0])
    torch.testing.assert_close(c_n, c[0])


def test_bad_input_names_the_argument():
    xw = torch.randn(4, 2, 12)
    w = torch.randn(12, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        rnn_layer("lstmx", xw, w, None, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 3\)"):
        rnn_layer("lstm", xw, w, None, torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="c0 is required for mode 'lstm'"):
        rnn_layer("lstm", xw, w, None, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 4\]"):
        rnn_layer("rnn_tanh", torch.randn(4, 2, 3), torch.randn(3, 3), None, torch.zeros(2, 3),
                  lengths=torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="a projection must be smaller than the hidden size"):
        rnn_layer("lstm", xw, w, None, torch.zeros(2, 3), torch.zeros(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="no time steps"):
        rnn_layer("gru", torch.randn(0, 2, 9), torch.randn(9, 3), None, torch.zeros(2, 3))


@pytest.mark.parametrize("backend,device", backend_params("cpu", "cuda"))
def test_gate_activations_at_the_edges(backend, device):
    """The kernels' tanh and sigmoid (CPU: csrc/cpu/activation.h; CUDA: activation.cuh's, not the
    --use_fast_math tanhf / __expf) on one step from a zero state: exact at +-inf, NaN kept, a tiny
    input giving a tiny output, and within 2e-7 of float64 over [-100, 100]."""
    v = torch.cat([torch.linspace(-100, 100, 4001), torch.tensor([float("inf"), -float("inf"), float("nan"),
                                                                   1e-30, -1e-30, 1e-6, -1e-6])])
    n = v.numel()
    zero_w, h0 = torch.zeros(n, n, device=device), torch.zeros(1, n, device=device)
    run = lambda mode, xw, w, *state: rnn_layer(mode, xw.to(device), w, None, *state, backend=backend)  # noqa: E731
    tanh_out = run("rnn_tanh", v.view(1, 1, n), zero_w, h0)[0].view(-1).cpu()
    # LSTM with i and o gates at +inf and the f gate irrelevant (c0 = 0): c = tanh(g), h = tanh(c)
    inf = torch.full((n,), float("inf"))
    xw = torch.cat([inf, torch.zeros(n), v, inf]).view(1, 1, 4 * n)
    zero_w4 = torch.zeros(4 * n, n, device=device)
    c_out = run("lstm", xw, zero_w4, h0, h0.clone())[2].view(-1).cpu()
    # sigmoid: the LSTM's i gate with g at +inf, c = sigmoid(x_i)
    xs = torch.cat([v, torch.zeros(n), inf, inf]).view(1, 1, 4 * n)
    sig_out = run("lstm", xs, zero_w4, h0, h0.clone())[2].view(-1).cpu()
    for name, got, want in (("tanh", tanh_out, torch.tanh(v.double())), ("tanh via the cell", c_out, torch.tanh(v.double())),
                            ("sigmoid", sig_out, torch.sigmoid(v.double()))):
        finite = torch.isfinite(v)
        assert (got[finite].double() - want[finite]).abs().max() < 2e-7, name
        assert torch.isnan(got[torch.isnan(v)]).all(), name
        assert got[v == float("inf")].item() == 1.0, name
        assert got[v == -float("inf")].item() == (-1.0 if "tanh" in name else 0.0), name
        tiny = v.abs() < 1e-5
        if "tanh" in name:  # odd, and as small as its input
            assert ((got[tiny].double() - v[tiny].double()).abs() <= 1e-6 * v[tiny].abs().double() + 1e-37).all(), name
