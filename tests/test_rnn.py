"""bignlp_fast.nn.LSTM / GRU / RNN, their cells and LayerNormLSTM against torch.nn with the same
state_dict: outputs, final states and the gradients of the input, the initial states and every
weight; plus gradcheck and opcheck of the rnn_layer op underneath, and torch.compile."""

import copy
import importlib

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import bignlp_fast
from bignlp_fast import _backend
from bignlp_fast import nn as bnn
from bignlp_fast import ops
from bignlp_fast.ops import rnn_layer
from bignlp_fast.ops.rnn import GATES
from conftest import HAS_CUDA, emulated_cuda_marks
from reference import assert_within_torch_error

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

# the triton backend runs these CPU modules under TRITON_INTERPRET=1; on a GPU machine it is tested on
# CUDA tensors by tests/test_rnn_layer.py
BACKENDS = ["torch", "cpu", pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(
    not _backend.triton_interpreted() or _backend.unavailable("triton", torch.device("cpu")) is not None,
    reason="the module tests run the triton backend on CPU tensors, under TRITON_INTERPRET=1 only")])] + (
    # the cuda backend on these CPU modules: csrc/cuda's kernels through the emulation (conftest.py)
    [pytest.param("cuda", marks=emulated_cuda_marks(), id="cuda-emulated")] if not HAS_CUDA else [])
KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _classes(kind):
    name = {"lstm": "LSTM", "gru": "GRU"}.get(kind, "RNN")
    extra = {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}
    return getattr(torch.nn, name), getattr(bnn, name), extra


def make_pair(kind, backend, input_size=5, hidden_size=13, dtype=torch.float32, **kwargs):
    """torch's module with random weights and ours loaded from its state_dict."""
    torch.manual_seed(0)
    ref_cls, our_cls, extra = _classes(kind)
    ref = ref_cls(input_size, hidden_size, **extra, **kwargs, dtype=dtype)
    ours = our_cls(input_size, hidden_size, **extra, **kwargs, dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    return ref, ours


def initial_state(module, batch, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    layers = module.num_layers * (2 if module.bidirectional else 1)
    state = module.proj_size or module.hidden_size  # proj_size is 0 for GRU and RNN
    h0 = torch.randn(layers, batch, state, generator=g, dtype=dtype)
    if isinstance(module, torch.nn.LSTM):
        return h0, torch.randn(layers, batch, module.hidden_size, generator=g, dtype=dtype)
    return h0


def _leaves(x):
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(t.detach().clone().requires_grad_() for t in x)
    return x.detach().clone().requires_grad_()


def run(module, x, hx=None, lengths=None, enforce_sorted=True):
    """Outputs (output, h_n[, c_n]) and gradients of (x, h0[, c0], every parameter) of a fixed random
    linear function of the outputs. With ``lengths`` x is packed (pack_padded_sequence) first."""
    x, hx = _leaves(x), _leaves(hx)
    inp = x
    if lengths is not None:
        inp = pack_padded_sequence(x, torch.tensor(lengths), batch_first=module.batch_first,
                                   enforce_sorted=enforce_sorted)
    out, h = module(inp, hx)
    if lengths is not None:
        assert isinstance(out, PackedSequence)
        assert torch.equal(out.batch_sizes, inp.batch_sizes)
        out = out.data
    outs = [out] + (list(h) if isinstance(h, tuple) else [h])
    # the cotangents drawn in float32 whatever the dtype: torch.randn draws other values in float64 and
    # bfloat16 (past 16 elements), which left the float64 references of other dtypes a different loss
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o.dtype)).sum() for o in outs)
    wrt = [x] + (list(hx) if isinstance(hx, tuple) else [hx] if hx is not None else []) + list(module.parameters())
    return outs + list(torch.autograd.grad(loss, wrt))


def assert_all_close(got, expected, **tol):
    assert len(got) == len(expected)
    for k, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape, f"tensor {k}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        torch.testing.assert_close(a, b, **(tol or TOL), msg=lambda m: f"tensor {k}: {m}")


# ---- the modules against torch.nn -------------------------------------------------------------------
CONFIGS = [  # num_layers, bidirectional, batch_first, bias, proj_size (LSTM only)
    (1, False, False, True, 0),
    (2, True, True, True, 0),
    (2, False, True, False, 0),
    (1, True, False, False, 0),
    (3, True, False, True, 0),
    (2, True, True, True, 7),
    (1, False, False, False, 5),
]
INPUTS = {  # batch 4, 6 steps; lengths in any order for packing
    "dense": None,
    "packed_unsorted": ([3, 6, 1, 4], False),
    "packed_sorted": ([6, 4, 3, 1], True),
}


@pytest.mark.parametrize("inputs", list(INPUTS))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "L{}{}{}{}{}".format(
    c[0], "-bi" if c[1] else "", "-bf" if c[2] else "", "" if c[3] else "-nobias", f"-proj{c[4]}" if c[4] else ""))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch(backend, kind, config, inputs):
    layers, bidirectional, batch_first, bias, proj = config
    if proj and kind != "lstm":
        pytest.skip("proj_size is an LSTM option")
    if backend == "triton" and inputs != "packed_unsorted":
        pytest.skip("the interpreter is slow: triton runs the hardest input of each config (the module's "
                    "packing logic does not depend on the backend; tests/test_rnn_layer.py covers the op)")
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    if proj:
        kwargs["proj_size"] = proj
    ref, ours = make_pair(kind, backend, **kwargs)
    x = torch.randn((4, 6, 5) if batch_first else (6, 4, 5))
    lengths, enforce_sorted = INPUTS[inputs] or (None, True)
    for hx in (None, initial_state(ref, 4)):
        assert_all_close(run(ours, x, hx, lengths, enforce_sorted), run(ref, x, hx, lengths, enforce_sorted))
    report = [r for r in bignlp_fast.report() if r["op"] == "rnn"]
    assert not report, report


@pytest.mark.parametrize("kind", KINDS)
# B20 H70: whole 8-row tiles and a partial one, and a last block of 6 units on the CPU
@pytest.mark.parametrize("shape", [(1, 1, 37), (1, 3, 13), (7, 1, 37), (5, 20, 70)],
                         ids=lambda s: "T{}-B{}-H{}".format(*s))
def test_awkward_shapes(backend, kind, shape):
    t, b, hidden = shape
    ref, ours = make_pair(kind, backend, input_size=3, hidden_size=hidden, num_layers=2, bidirectional=True)
    x = torch.randn(t, b, 3)
    assert_all_close(run(ours, x, initial_state(ref, b)), run(ref, x, initial_state(ref, b)))
    lengths = [t] + [max(1, t - 2 * i) for i in range(1, b)]
    assert_all_close(run(ours, x, None, lengths[::-1], False), run(ref, x, None, lengths[::-1], False))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_input_projections_regrouped_by_block(kind, dtype):
    """From a state of 256 the CPU forward copies each step's input projections into blocks of units
    (rnn.cpp's xs) during the step before: H264 (9 blocks, the last of 8 units) for 3 rows, both
    directions, rows of every length, two layers; against float64 within twice torch's error."""
    ref, ours = make_pair(kind, "cpu", input_size=7, hidden_size=264, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 7)
    lengths = [2, 6, 5]
    expected = run(copy.deepcopy(ref).double(), x.double(), None, lengths, False)
    theirs = run(ref.to(dtype), x.to(dtype), None, lengths, False)
    got = run(ours.to(dtype), x.to(dtype), None, lengths, False)
    checked = 2 if kind == "rnn_relu" and dtype == torch.bfloat16 else len(got)  # see test_bfloat16_within_torch_error
    for k, (a, b, r) in enumerate(zip(got[:checked], theirs, expected)):
        assert_within_torch_error(f"{kind} {dtype} tensor {k}", a, b, r, dtype)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_workspace_past_the_caches(kind):
    """T128 B32 H256: the forward's workspace (21-25 MiB) is written with streaming stores on the CPU
    (past 16 MiB); outputs and every gradient within twice torch's fp32 error of a float64 reference,
    rows of every length included (kept states go through the same stores)."""
    ref, ours = make_pair(kind, "cpu", input_size=16, hidden_size=256)
    x = torch.randn(128, 32, 16)
    lengths = [128 - 3 * i for i in range(32)]
    expected = run(copy.deepcopy(ref).double(), x.double(), None, lengths, False)
    theirs = run(ref, x, None, lengths, False)
    got = run(ours, x, None, lengths, False)
    for k, (a, b, r) in enumerate(zip(got, theirs, expected)):
        assert_within_torch_error(f"{kind} tensor {k}", a, b, r, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(backend, kind, batch_first):
    """A 2-D [T, F] input is one sequence whatever batch_first says; hx is then [L*D, S]."""
    ref, ours = make_pair(kind, backend, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(6, 5)
    hx = initial_state(ref, 1)
    hx = tuple(t[:, 0] for t in hx) if isinstance(hx, tuple) else hx[:, 0]
    for state in (None, hx):
        got, expected = run(ours, x, state), run(ref, x, state)
        assert got[0].shape == (6, 26)
        assert_all_close(got, expected)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("config", [(2, True, False, 0), (1, False, True, 4)], ids=["L2-bi", "L1-bf-proj"])
def test_float64_matches_torch(kind, config):
    """In float64 (the torch backend) our modules and torch agree to rounding, packed input included."""
    layers, bidirectional, batch_first, proj = config
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    if proj and kind == "lstm":
        kwargs["proj_size"] = proj
    ref, ours = make_pair(kind, "torch", dtype=torch.float64, **kwargs)
    x = torch.randn((4, 6, 5) if batch_first else (6, 4, 5), dtype=torch.float64)
    hx = initial_state(ref, 4, torch.float64)
    tight = {"rtol": 1e-12, "atol": 1e-12}
    assert_all_close(run(ours, x, hx), run(ref, x, hx), **tight)
    assert_all_close(run(ours, x, hx, [2, 6, 5, 1], False), run(ref, x, hx, [2, 6, 5, 1], False), **tight)


# hidden 37: odd (k pairs padded); 48: even, with a partial block of units; batch 20: 8-row tiles and a
# partial one
@pytest.mark.parametrize("batch, hidden", [(3, 37), (3, 48), (20, 48)], ids=lambda v: str(v))
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_within_torch_error(backend, kind, batch, hidden):
    """bf16: our error against a float64 reference at most twice torch's own bf16 error (+ floor)."""
    ref, ours = make_pair(kind, backend, hidden_size=hidden, num_layers=2, bidirectional=True)
    x = torch.randn(7, batch, 5)
    lengths = ([7, 4, 5] * batch)[:batch]
    expected = run(ref.double(), x.double(), None, lengths, False)
    theirs = run(ref.to(torch.bfloat16), x.to(torch.bfloat16), None, lengths, False)
    got = run(ours.to(torch.bfloat16), x.to(torch.bfloat16), None, lengths, False)
    # relu's derivative is a step: a pre-activation within bf16 rounding of zero flips it, and which
    # ones flip differs between any two bf16 implementations (over 8 seeds our gradient errors ran
    # 0.0x to 83x torch's, either way). Its gradients are checked in float32 against torch
    # (test_matches_torch) and by gradcheck in float64 (test_rnn_layer_gradcheck); here only its outputs
    # and final states.
    checked = 2 if kind == "rnn_relu" else len(got)
    for k, (a, b, r) in enumerate(zip(got[:checked], theirs, expected)):
        assert_within_torch_error(f"{kind} tensor {k}", a, b, r, torch.bfloat16)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_autocast_runs_the_recurrence_in_bf16(backend, kind):
    """Under CPU autocast the projection is bf16 and the recurrence follows it (torch: LSTM bf16, GRU fp32)."""
    ref, ours = make_pair(kind, backend, num_layers=2)
    cell_ref, cell = make_cell_pair(kind, backend)
    x = torch.randn(5, 3, 5)
    expected, expected_cell = ref.double()(x.double())[0], cell_ref.double()(x[0].double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ours(x)
        h = cell(x[0])
    h = h[0] if kind == "lstm" else h
    expected_cell = expected_cell[0] if kind == "lstm" else expected_cell
    assert out.dtype == h.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=0)
    torch.testing.assert_close(h.double(), expected_cell, atol=3e-2, rtol=0)


# ---- training-mode dropout ---------------------------------------------------------------------------
def test_dropout_between_layers(backend):
    ref, ours = make_pair("lstm", backend, num_layers=3, dropout=0.5)
    x = torch.randn(5, 2, 5)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], **TOL)  # eval: no dropout
    ours.train()
    torch.manual_seed(1)
    a, (h_a, _) = ours(x)
    torch.manual_seed(1)
    b, (h_b, _) = ours(x)
    torch.testing.assert_close(a, b)  # masks come from torch's generator
    assert not torch.allclose(a, ours.eval()(x)[0])
    # layer 0 sees no dropout: its final state is the eval one; the last layer's output is not dropped
    torch.testing.assert_close(h_a[0], ours(x)[1][0][0], **TOL)
    assert (a != 0).all()


# ---- gradcheck and opcheck of the op underneath ---------------------------------------------------
@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("variant", ["plain", "lengths-reverse", "lengths", "proj"])
def test_rnn_layer_gradcheck(mode, variant):
    if variant == "proj" and mode != "lstm":
        pytest.skip("projections are an LSTM option")
    g = torch.Generator().manual_seed(0)
    t, b, hidden = 4, 3, 3
    state = 2 if variant == "proj" else hidden
    gh = GATES[mode] * hidden
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    xw, w_hh, b_hh, h0 = make(t, b, gh), make(gh, state), make(gh), make(b, state)
    c0 = make(b, hidden) if mode == "lstm" else None
    w_hr = make(state, hidden) if variant == "proj" else None
    lengths = torch.tensor([2, 4, 1]) if variant.startswith("lengths") else None
    reverse = variant == "lengths-reverse"

    def f(*args):
        xw, w_hh, b_hh, h0, *rest = args
        c0 = rest.pop(0) if mode == "lstm" else None
        w_hr = rest.pop(0) if rest else None
        out, h_n, c_n = rnn_layer(mode, xw, w_hh, b_hh, h0, c0, w_hr, lengths, reverse, backend="torch")
        return (out, h_n) + ((c_n,) if c_n is not None else ())

    args = [a for a in (xw, w_hh, b_hh, h0, c0, w_hr) if a is not None]
    assert torch.autograd.gradcheck(f, args)


def _op_samples(backend):
    """Argument lists for torch.ops.bignlp_fast.rnn_fwd and rnn_bwd: every mode, with/without lengths."""
    samples_fwd, samples_bwd = [], []
    g = torch.Generator().manual_seed(0)
    for mode in GATES:
        t, b, hidden = 5, 3, 13
        projection = mode == "lstm"
        state = 7 if projection else hidden
        gh = GATES[mode] * hidden
        make = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        xw, w_hh, b_hh, h0 = make(t, b, gh), make(gh, state) * 0.3, make(gh), make(b, state)
        c0 = make(b, hidden) if mode == "lstm" else None
        w_hr = make(state, hidden) * 0.3 if projection else None
        for lengths, reverse in ((None, False), (torch.tensor([5, 2, 4]), True)):
            leaves = [a.requires_grad_() if a is not None else None for a in (xw, w_hh, b_hh, h0, c0, w_hr)]
            samples_fwd.append(leaves + [lengths, mode, reverse, True, backend])
            with torch.no_grad():
                out, h_n, c_n, ws = torch.ops.bignlp_fast.rnn_fwd(*[a.detach() if a is not None else None
                                                                    for a in leaves], lengths, mode, reverse,
                                                                  True, backend)
            grad_c = torch.randn_like(c_n) if mode == "lstm" else None
            detached = [a.detach() if a is not None else None for a in leaves]
            samples_bwd.append([torch.randn_like(out), torch.randn_like(h_n), grad_c] + detached
                               + [lengths, ws, mode, reverse, backend])
    return samples_fwd, samples_bwd


def test_opcheck_rnn_fwd(backend):
    for args in _op_samples(backend)[0]:
        torch.library.opcheck(torch.ops.bignlp_fast.rnn_fwd.default, args)


@pytest.mark.parametrize("bwd_backend", BACKENDS)
def test_opcheck_rnn_bwd(bwd_backend):
    for args in _op_samples(bwd_backend)[1]:
        torch.library.opcheck(torch.ops.bignlp_fast.rnn_bwd.default, args)


# ---- torch.compile -----------------------------------------------------------------------------------
class _Tagger(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.rnn = bnn.LSTM(6, 13, num_layers=2, bidirectional=True, batch_first=True, backend=backend)
        self.head = torch.nn.Linear(26, 3)

    def forward(self, tokens):
        out, (h_n, _) = self.rnn(self.embed(tokens))
        return self.head(out), h_n


def test_compiles_without_graph_breaks(backend):
    """Dynamo refuses every torch.nn.LSTM instance (ours included) unless allow_rnn is set; with it,
    the whole model is one graph."""
    torch.manual_seed(0)
    model = _Tagger(backend)
    tokens = torch.randint(0, 11, (2, 5))
    expected = model(tokens)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(tokens)
        (got[0].square().sum() + got[1].sum()).backward()
    torch.testing.assert_close(got, expected, **TOL)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (expected[0].square().sum() + expected[1].sum()).backward()
    assert_all_close(grads, [p.grad for p in model.parameters()])


# ---- modules: sharing parameters, dtype conversion, functional_call ---------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_from_torch_shares_parameters(backend, kind):
    ref, _ = make_pair(kind, backend, num_layers=2, bidirectional=True, batch_first=True,
                       **({"proj_size": 4} if kind == "lstm" else {}))
    ours = type(_).from_torch(ref.eval(), backend=backend)
    assert isinstance(ours, type(ref)) and not ours.training and ours.backend == backend
    assert all(a is b for a, b in zip(ours.parameters(), ref.parameters()))
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 4, 5)
    assert_all_close(run(ours, x), run(ref, x))


def test_to_double_and_functional_call():
    ref, ours = make_pair("gru", "torch", num_layers=2)
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(ours.double()(x)[0], ref.double()(x)[0])
    params = {k: torch.zeros_like(v) for k, v in ours.named_parameters()}
    out, h_n = torch.func.functional_call(ours, params, (x,))
    assert not out.any() and not h_n.any()  # all-zero weights: every state stays zero


def test_auto_backend_runs_the_cpu_kernel():
    ref, ours = make_pair("lstm", None, num_layers=2)
    x = torch.randn(5, 2, 5)
    assert_all_close(run(ours, x), run(ref, x))
    assert bignlp_fast.report() == []


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_dtype_no_kernel_takes_runs_torchs_own_forward(kind):
    """float64 on the CPU: torch.nn's implementation (recorded), not the reference's loop over steps;
    a backend named "torch" still runs the reference."""
    ref, ours = make_pair(kind, None, num_layers=2, dtype=torch.float64)
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    assert_all_close(run(ours, x), run(ref, x))
    assert [r["reason"] for r in bignlp_fast.report()] == \
        [f"the cpu backend of rnn runs float32, bfloat16, got float64: ran torch.nn.{kind.upper()}'s own forward"]
    bignlp_fast.reset_report()
    ours.backend = "torch"
    assert_all_close(run(ours, x), run(ref, x))
    assert not bignlp_fast.report()


def test_lengths_as_pack_padded_sequence_takes_them():
    _, lstm = make_pair("lstm", None, batch_first=True)
    x = torch.randn(3, 6, 5)
    expected = lstm(x, lengths=torch.tensor([6, 2, 4]))
    for lengths in ([6, 2, 4], torch.tensor([6, 2, 4], dtype=torch.int32)):
        got = lstm(x, lengths=lengths)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1][0], expected[1][0])
    with pytest.raises(ValueError, match="lengths must be a 1-D int32 / int64 tensor or a list of ints"):
        lstm(x, lengths=[6.0, 2.0, 4.0])


# ---- the functional forms: bignlp_fast.ops.lstm / gru / rnn ------------------------------------------
FUNCTIONAL = {"lstm": (ops.lstm, torch.nn.LSTM, {}), "gru": (ops.gru, torch.nn.GRU, {}),
              "rnn_relu": (ops.rnn, torch.nn.RNN, {"nonlinearity": "relu"})}


@pytest.mark.parametrize("kind", FUNCTIONAL)
@pytest.mark.parametrize("config", [{}, {"num_layers": 2, "bidirectional": True, "batch_first": True},
                                    {"bias": False, "proj_size": 3}], ids=["one layer", "2 bidirectional", "no bias"])
def test_functional_forms_match_torch_nn_in_float64(kind, config):
    """ops.lstm(input, module._flat_weights, hx, ...) is what the modules run: against torch.nn's module
    in float64, outputs, states and every gradient, with initial states and lengths."""
    fn, cls, extra = FUNCTIONAL[kind]
    if kind != "lstm" and "proj_size" in config:
        config = {"bias": False}
    torch.manual_seed(1)
    ref = cls(5, 7, **extra, **config).double()
    args = {k: v for k, v in config.items() if k in ("num_layers", "bidirectional", "batch_first")}
    layers = config.get("num_layers", 1) * (2 if config.get("bidirectional") else 1)
    state = config.get("proj_size", 7)
    x = torch.randn((3, 6, 5) if config.get("batch_first") else (6, 3, 5), dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers, 3, state, dtype=torch.float64)
    hx = (h0, torch.randn(layers, 3, 7, dtype=torch.float64)) if kind == "lstm" else h0
    lengths = [6, 2, 5]
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), batch_first=args.get("batch_first", False),
                                                     enforce_sorted=False)
    ref_out, ref_state = ref(packed, hx)
    ref_out, _ = torch.nn.utils.rnn.pad_packed_sequence(ref_out, batch_first=args.get("batch_first", False))
    weights = [w.detach().float().requires_grad_() for w in ref._flat_weights]
    x32 = x.float().requires_grad_()
    hx32 = tuple(t.float() for t in hx) if kind == "lstm" else hx.float()
    out, st = fn(x32, weights, hx32, lengths=lengths, **extra, **args)
    got = [out, *(st if kind == "lstm" else (st,))]
    expected = [ref_out, *(ref_state if kind == "lstm" else (ref_state,))]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.sum() + (st[0].sum() if kind == "lstm" else st.sum()), [x32, *weights])
    ref_grads = torch.autograd.grad(ref_out.sum() + (ref_state[0].sum() if kind == "lstm" else ref_state.sum()),
                                    [x, *ref._flat_weights])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)
    assert not bignlp_fast.report()


def test_functional_form_compiles_without_allow_rnn():
    """A function, not an nn.LSTM instance: Dynamo traces it with its default config."""
    torch._dynamo.reset()
    weights = [w.detach() for w in torch.nn.LSTM(5, 7, num_layers=2)._flat_weights]
    x = torch.randn(6, 3, 5)
    fn = lambda x: ops.lstm(x, weights, num_layers=2)[0]  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x), fn(x))


def test_functional_form_bad_input():
    weights = torch.nn.LSTM(5, 7, num_layers=2)._flat_weights
    with pytest.raises(ValueError, match="for each of the 2 layer\\(s\\) x 1 direction\\(s\\), w_ih, w_hh"):
        ops.lstm(torch.randn(6, 3, 5), weights[:-1], num_layers=2)
    with pytest.raises(ValueError, match="input must be \\[T, B, F\\]"):
        ops.gru(torch.randn(6, 5), torch.nn.GRU(5, 7)._flat_weights)
    with pytest.raises(ValueError, match=r"h_0 must be \[num_layers \* directions, B, 7\] = \(2, 3, 7\)"):
        ops.lstm(torch.randn(6, 3, 5), weights, (torch.zeros(1, 3, 7), torch.zeros(2, 3, 7)), num_layers=2)
    with pytest.raises(ValueError, match="nonlinearity must be one of 'tanh', 'relu'"):
        ops.rnn(torch.randn(6, 3, 5), torch.nn.RNN(5, 7)._flat_weights, nonlinearity="gelu")


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors():
    _, lstm = make_pair("lstm", "torch", num_layers=2, proj_size=4)
    _, gru = make_pair("gru", "torch", batch_first=True)
    x = torch.randn(6, 3, 5)
    with pytest.raises(RuntimeError, match="LSTM: input.size\\(-1\\) must be equal to input_size. Expected 5, got 4"):
        lstm(x[..., :4])
    with pytest.raises(ValueError, match="LSTM: Expected input to be 2D or 3D, got 4D"):
        lstm(x[None])
    with pytest.raises(ValueError, match="input dtype \\(torch.float64\\) does not match weight dtype"):
        lstm(x.double())
    with pytest.raises(RuntimeError, match=r"expected hidden\[0\] of size \(2, 3, 4\).*got \[2, 3, 13\]"):
        lstm(x, (torch.zeros(2, 3, 13), torch.zeros(2, 3, 13)))
    with pytest.raises(RuntimeError, match=r"expected hidden\[1\] of size \(2, 3, 13\).*got \[2, 2, 13\]"):
        lstm(x, (torch.zeros(2, 3, 4), torch.zeros(2, 2, 13)))
    with pytest.raises(RuntimeError, match="LSTM: input and hx must have the same dtype and device, got input "
                                           "torch.float32 on cpu and hx torch.float64"):
        lstm(x, (torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2, 3, 13, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match=r"LSTMCell: input and hx\[1\] must have the same dtype"):
        bnn.LSTMCell(5, 4)(x[0], (torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64)))
    with pytest.raises(TypeError, match="hx must be a tuple \\(h_0, c_0\\)"):
        lstm(x, torch.zeros(2, 3, 4))
    with pytest.raises(RuntimeError, match="for batched 3-D input, hx should also be 3-D but got 2-D"):
        gru(x, torch.zeros(3, 13))
    with pytest.raises(RuntimeError, match=r"GRU: expected hidden of size \(1, 6, 13\)"):
        gru(x, torch.zeros(1, 3, 13))  # batch_first: the batch is 6
    with pytest.raises(RuntimeError, match="must be sorted in decreasing order"):  # torch's own packing check
        pack_padded_sequence(x, torch.tensor([2, 6, 3]), enforce_sorted=True)
    packed = pack_padded_sequence(x, torch.tensor([2, 6, 3]), enforce_sorted=False)
    with pytest.raises(RuntimeError, match=r"expected hidden of size \(1, 3, 13\)"):
        gru(packed, torch.zeros(1, 2, 13))


def test_functional_forms_name_a_weight_list_that_does_not_fit():
    """ops.lstm / gru / rnn take torch's _flat_weights: a list cut short, of another layer count or for
    another input size is named, not met as a GEMM's shape error or a misread h_0 shape."""
    m = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    x = torch.randn(5, 2, 4)
    out, _ = ops.lstm(x, m._flat_weights, num_layers=2, bidirectional=True)
    torch.testing.assert_close(out, m(x)[0])
    with pytest.raises(ValueError, match=r"weight_hr of layer 0 must be 2-D, got shape \(24,\)"):
        ops.lstm(x, torch.nn.LSTM(4, 6)._flat_weights[:3])  # w_ih, w_hh, b_ih: the third read as w_hr
    with pytest.raises(ValueError, match=r"weight_ih of layer 0 must have shape \(24, 7\) \(input size 7"):
        ops.lstm(torch.randn(5, 2, 7), m._flat_weights, num_layers=2, bidirectional=True)
    g = torch.nn.GRU(4, 6, num_layers=2)
    with pytest.raises(ValueError, match=r"bias_ih of layer 0 must have shape \(18,\)"):
        ops.gru(x, [g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0[:6], g.bias_hh_l0], num_layers=1)
    with pytest.raises(ValueError, match="weight_ih of layer 1 must be 2-D"):
        ops.gru(x, g._flat_weights[:4], num_layers=2)  # one layer's weights for two


# ---- cells ---------------------------------------------------------------------------------------
def make_cell_pair(kind, backend, bias=True):
    torch.manual_seed(0)
    name = {"lstm": "LSTMCell", "gru": "GRUCell"}.get(kind, "RNNCell")
    extra = {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}
    ref = getattr(torch.nn, name)(5, 13, bias, **extra)
    ours = getattr(bnn, name)(5, 13, bias, **extra, backend=backend)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run_cell(cell, x, hx):
    x, hx = _leaves(x), _leaves(hx)
    out = cell(x, hx)
    outs = list(out) if isinstance(out, tuple) else [out]
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    wrt = [x] + (list(hx) if isinstance(hx, tuple) else [hx] if hx is not None else []) + list(cell.parameters())
    return outs + list(torch.autograd.grad(loss, wrt))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_cells_match_torch(backend, kind, bias):
    ref, ours = make_cell_pair(kind, backend, bias)
    for b in (4, 1, None):  # None: unbatched
        shape = (b,) if b else ()
        x = torch.randn(*shape, 5)
        h = torch.randn(*shape, 13)
        hx = (h, torch.randn(*shape, 13)) if kind == "lstm" else h
        for state in (None, hx):
            assert_all_close(run_cell(ours, x, state), run_cell(ref, x, state))
    shared = type(ours).from_torch(ref, backend=backend)
    assert shared.weight_hh is ref.weight_hh and shared.backend == backend
    x = torch.randn(3, 5)
    assert_all_close(run_cell(shared, x, None), run_cell(ref, x, None))


def test_cells_bad_input():
    _, cell = make_cell_pair("lstm", "torch")
    with pytest.raises(RuntimeError, match="LSTMCell: input has inconsistent input_size: got 4 expected 5"):
        cell(torch.randn(2, 4))
    with pytest.raises(ValueError, match="Expected input to be 1D or 2D, got 3D"):
        cell(torch.randn(1, 2, 5))
    with pytest.raises(RuntimeError, match=r"hx\[1\] must have shape \(2, 13\)"):
        cell(torch.randn(2, 5), (torch.zeros(2, 13), torch.zeros(3, 13)))


# ---- LayerNormLSTM ------------------------------------------------------------------------------------
def test_layer_norm_lstm_shapes_and_gradients():
    torch.manual_seed(0)
    m = bnn.LayerNormLSTM(5, 13, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 6, 5, requires_grad=True)
    h0, c0 = torch.randn(4, 3, 13, requires_grad=True), torch.randn(4, 3, 13, requires_grad=True)
    out, (h_n, c_n) = m(x, (h0, c0))
    assert out.shape == (3, 6, 26) and h_n.shape == c_n.shape == (4, 3, 13)
    torch.testing.assert_close(out[:, -1, :13], h_n[2])  # last layer, forward direction: the last step
    torch.testing.assert_close(out[:, 0, 13:], h_n[3])  # last layer, backward direction: the first step
    (out.square().sum() + c_n.sum()).backward()
    for name, t in [("x", x), ("h0", h0), ("c0", c0)] + list(m.named_parameters()):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name
    out1, (h1, c1) = m(x[0].detach())  # unbatched
    assert out1.shape == (6, 26) and h1.shape == c1.shape == (4, 13)
    torch.testing.assert_close(out1, m(x[:1].detach())[0][0])
    assert bignlp_fast.report() == []  # float32 on the CPU: the fused kernel, no fallback


def test_layer_norm_lstm_is_not_an_lstm():
    torch.manual_seed(0)
    m = bnn.LayerNormLSTM(5, 13, bias=False)
    lstm = torch.nn.LSTM(5, 13, bias=False)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(m.weight_ih_l0)
        lstm.weight_hh_l0.copy_(m.weight_hh_l0)
    x = torch.randn(4, 2, 5)
    assert not torch.allclose(m(x)[0], lstm(x)[0], atol=1e-3)
    assert sorted(m.state_dict()) == ["ln_c_l0.weight", "ln_hh_l0.weight", "ln_ih_l0.weight", "weight_hh_l0",
                                      "weight_ih_l0"]


def test_layer_norm_lstm_gradcheck():
    torch.manual_seed(0)
    m = bnn.LayerNormLSTM(3, 4, bidirectional=True, dtype=torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))  # LayerNorms away from scale 1, shift 0
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    params = dict(m.named_parameters())

    def f(x, h0, c0, *ps):
        out, (h_n, c_n) = torch.func.functional_call(m, dict(zip(params, ps)), (x, (h0, c0)))
        return out, h_n, c_n

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params.values()))


def test_layer_norm_lstm_strict_and_named_backend(monkeypatch):
    x = torch.randn(3, 2, 5)
    bnn.LayerNormLSTM(5, 7, backend="cpu")(x)
    bnn.LayerNormLSTM(5, 7, backend="torch")(x)  # the reference asked for by name: nothing to record
    assert bignlp_fast.report() == []
    m = bnn.LayerNormLSTM(5, 7, dtype=torch.float64)  # no fused kernel runs float64: the reference
    m(x.double())
    assert {r["op"] for r in bignlp_fast.report()} == {"add_layer_norm", "layer_norm_lstm"}
    with pytest.raises(bignlp_fast.BackendError, match="runs float32, bfloat16, got float64"):
        bnn.LayerNormLSTM(5, 7, backend="cpu", dtype=torch.float64)(x.double())
    monkeypatch.setenv("BIGNLP_FAST_STRICT", "1")
    with pytest.raises(bignlp_fast.BackendError, match="BIGNLP_FAST_STRICT"):
        m(x.double())
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size. Expected 5, got 4"):
        m(x[..., :4].double())


# ---- lengths= on a padded batch (an extension) ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_lengths_on_a_padded_batch_equals_the_packed_path(kind, backend):
    _, ours = make_pair(kind, backend, num_layers=2, bidirectional=True, batch_first=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 7, 5, generator=g)
    lengths = torch.tensor([3, 7, 1, 5])  # any order
    hx = initial_state(ours, 4)
    packed_out, packed_state = ours(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), hx)
    ref_out, _ = torch.nn.utils.rnn.pad_packed_sequence(packed_out, batch_first=True, total_length=7)
    out, state = ours(x, hx, lengths=lengths)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(state if isinstance(state, tuple) else (state,),
                    packed_state if isinstance(packed_state, tuple) else (packed_state,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lengths_bad_input():
    lstm = bnn.LSTM(5, 4, batch_first=True)
    x = torch.randn(2, 6, 5)
    with pytest.raises(ValueError, match="int64"):
        lstm(x, lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        lstm(torch.randn(3, 6, 5), lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"in \[1, 6\]"):
        lstm(x, lengths=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"no steps \(T = 0\)"):  # not "in [1, 0]"
        lstm(x[:, :0], lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="PackedSequence carries its own"):
        lstm(pack_padded_sequence(x, torch.tensor([6, 2]), batch_first=True), lengths=torch.tensor([6, 2]))


@pytest.mark.parametrize("blas_fast", [False, True])
def test_input_projection_takes_the_faster_gemm(monkeypatch, blas_fast):
    """fp32 on the CPU: ops.linear (the project's GEMM) where ops.linear.linear_is_faster says so: not
    for small products, nor where torch's sgemm is the faster one on this CPU (MKL on Intel); a backend
    named "cpu" always takes ops.linear. Same results either way."""
    rnn_module = importlib.import_module("bignlp_fast.ops.rnn")  # the module (ops.rnn is also the function)
    monkeypatch.setattr(_backend, "blas_sgemm_is_fast", lambda: blas_fast)
    calls = []
    real = rnn_module.linear
    monkeypatch.setattr(rnn_module, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    # 13 K multiply-adds; 256 rows by a 1 MiB weight (67 M: large in every build's rule)
    for (t, b, i, h), large in [((6, 4, 5, 13), False), ((8, 32, 512, 128), True)]:
        calls.clear()
        ref, auto = make_pair("lstm", None, input_size=i, hidden_size=h)
        _, named = make_pair("lstm", "cpu", input_size=i, hidden_size=h)
        x = torch.randn(t, b, i)
        torch.testing.assert_close(auto(x)[0], ref(x)[0], **TOL)
        assert len(calls) == (1 if large and not blas_fast else 0)
        torch.testing.assert_close(named(x)[0], ref(x)[0], **TOL)
        assert len(calls) == (2 if large and not blas_fast else 1)


@pytest.mark.parametrize("blas_bf16_fast", [False, True])
def test_bf16_input_projection_takes_ops_linear_without_avx512(monkeypatch, blas_bf16_fast):
    """bf16 on the CPU: ops.linear for the input projection where torch's bf16 GEMM has no vector
    kernels (a CPU without AVX-512: _backend.blas_bf16_gemm_is_fast) and the product is not small;
    F.linear (oneDNN) elsewhere. Both within torch's own bf16 error of the float64 reference."""
    rnn_module = importlib.import_module("bignlp_fast.ops.rnn")
    monkeypatch.setattr(_backend, "blas_bf16_gemm_is_fast", lambda: blas_bf16_fast)
    calls = []
    real = rnn_module.linear
    monkeypatch.setattr(rnn_module, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref, ours = make_pair("lstm", None, input_size=96, hidden_size=40)  # 512 rows x 96 x 160: 7.9 M multiply-adds
    ref64 = copy.deepcopy(ref).double()
    ref, ours = ref.bfloat16(), ours.bfloat16()
    x = torch.randn(32, 16, 96)
    out = ours(x.bfloat16())[0]
    assert len(calls) == (0 if blas_bf16_fast else 1)
    assert_within_torch_error("lstm bf16 output", out, ref(x.bfloat16())[0], ref64(x.double())[0], torch.bfloat16)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_bf16_projection_leaves_b_ih_to_the_recurrence(monkeypatch, mode):
    """F.linear with a bias copies the bias into its whole output first; LSTM and RNN hand b_ih to the
    recurrence (added with b_hh) instead, GRU cannot (b_hn sits inside r * (...)). Gradients of both
    biases still match torch.nn."""
    rnn_module = importlib.import_module("bignlp_fast.ops.rnn")
    seen = []
    real = rnn_module.F.linear
    monkeypatch.setattr(rnn_module.F, "linear", lambda x, w, b=None: seen.append(b is not None) or real(x, w, b))
    ref, ours = make_pair(mode, None)
    ref64 = copy.deepcopy(ref).double()
    ref, ours = ref.bfloat16(), ours.bfloat16()
    x = torch.randn(6, 4, 5)
    out = ours(x.bfloat16())[0]
    assert seen == [mode == "gru"]
    go = torch.randn(out.shape)
    for module, inp in ((ours, x.bfloat16()), (ref, x.bfloat16()), (ref64, x.double())):
        module(inp)[0].backward(go.to(inp.dtype))
    for name in ("bias_ih_l0", "bias_hh_l0"):
        grads = [getattr(m, name).grad for m in (ours, ref, ref64)]
        assert_within_torch_error(f"{mode} {name}.grad", *grads, torch.bfloat16)

