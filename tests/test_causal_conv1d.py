import pytest
import torch

from bignlp_fast import ops
from bignlp_fast.ops._activation import check_activation
from bignlp_fast.ops.causal_conv1d import causal_conv1d_eager, causal_conv1d_fwd_torch
from conftest import backend_params
from reference import assert_within_torch_error

BACKENDS = backend_params("cpu", "cuda", "triton", "torch")
DTYPES = {"cpu": (torch.float32, torch.bfloat16), "torch": (torch.float32, torch.bfloat16),
          "cuda": (torch.float32, torch.float16, torch.bfloat16),
          "triton": (torch.float32, torch.float16, torch.bfloat16)}
ACTIVATIONS = [None, "relu", "gelu", "silu", "tanh"]


def _inputs(B, C, L, W, device, dtype, bias=True, state=False, seed=0, blc=False):
    """blc: x laid out [B, L, C] (a [B, L, C] tensor transposed, as sequence models hand it over)."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    x = mk(B, L, C).detach().transpose(1, 2).requires_grad_() if blc else mk(B, C, L)
    return (x, (torch.randn(C, W, generator=g) * 0.5).to(device=device, dtype=dtype).requires_grad_(),
            mk(C) if bias else None, mk(B, C, W - 1) if state else None,
            torch.randn(B, C, L, generator=g).to(device=device, dtype=dtype))


def _run(fn, x, w, b, s, gy):
    y = fn(x, w, b, s)
    leaves = [t for t in (x, w, b, s) if t is not None]
    return [y, *torch.autograd.grad(y, leaves, gy)]


def _eager(activation):
    """torch's grouped conv (the reference users run), with the initial state prepended by hand."""
    def f(x, w, b, s):
        W = w.shape[1]
        if s is None:
            return causal_conv1d_eager(x, w, b, activation)
        return causal_conv1d_eager(torch.cat([s, x], -1), w, b, activation)[..., W - 1:]
    return f


def _check(backend, device, dtype, B, C, L, W, activation, bias=True, state=False, blc=False):
    x, w, b, s, gy = _inputs(B, C, L, W, device, dtype, bias, state, blc=blc)
    ours = _run(lambda x, w, b, s: ops.causal_conv1d(x, w, b, activation, initial_state=s, backend=backend),
                x, w, b, s, gy)
    if blc and backend == "cpu":  # read as it is, answered in kind
        assert ours[0].transpose(1, 2).is_contiguous() and ours[1].transpose(1, 2).is_contiguous()
    theirs = _run(_eager(activation), x, w, b, s, gy)
    d64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, s)]
    ref = _run(_eager(activation), *d64, gy.double())
    names = ["y", "grad_x", "grad_w"] + (["grad_b"] if bias else []) + (["grad_state"] if state else [])
    for name, a, c, r in zip(names, ours, theirs, ref):
        assert_within_torch_error(f"{backend} {dtype} W={W} L={L} {activation} {name}", a, c, r, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("L", [1, 7, 97])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_float64(backend, device, W, L, activation):
    for dtype in DTYPES[backend]:
        _check(backend, device, dtype, 2, 3, L, W, activation)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("L", [1, 2, 40])
def test_initial_state_and_no_bias(backend, device, L):
    for W in (2, 4):
        _check(backend, device, torch.float32, 2, 5, L, W, "silu", bias=False, state=True)
        _check(backend, device, torch.float32, 1, 3, L, W, None, bias=True, state=True)


# x laid out [B, L, C]: the CPU kernels for that layout run over runs of 64 positions (L = 1, 2, 64,
# 150: one run, two and a part) and channel vectors (37: a partial one); the other backends copy x
# (Triton's interpreter takes minutes over this grid: one small case below).
@pytest.mark.parametrize("backend,device", backend_params("cpu", "cuda", "torch"))
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("L", [1, 2, 64, 150])
def test_x_laid_out_blc_matches_float64(backend, device, W, L):
    for dtype in DTYPES[backend]:
        _check(backend, device, dtype, 2, 37, L, W, "silu", blc=True)
    _check(backend, device, torch.float32, 2, 5, L, W, "gelu", bias=False, state=True, blc=True)
    _check(backend, device, torch.float32, 1, 16, L, W, None, state=True, blc=True)


@pytest.mark.parametrize("backend,device", backend_params("triton"))
def test_x_laid_out_blc_triton(backend, device):
    _check(backend, device, torch.float32, 1, 5, 9, 3, "silu", state=True, blc=True)


@pytest.mark.parametrize("dtype,C,L,W", [(torch.float32, 300, 203, 4), (torch.float32, 800, 67, 3),
                                         (torch.bfloat16, 300, 203, 4), (torch.bfloat16, 40, 5, 2)])
def test_cpu_blc_agrees_with_contiguous_and_is_deterministic(dtype, C, L, W):
    """y and grad_x take the same sums in the same order as the contiguous kernel's (the same bits),
    whether positions go one at a time or in groups (bf16 fours; fp32 pairs, in the forward from 768
    channels; L past a run of 64 and not a multiple of the group: the tails); the weight and bias
    gradients are per-run partials added in a fixed order, whatever the threads; a grad_y in either
    layout gives the same gradients."""
    if (dtype, C) == (torch.float32, 300):
        _check("cpu", torch.device("cpu"), torch.float32, 2, 300, 70, 3, "gelu", state=True, blc=True)
    x, w, b, s, gy = _inputs(3, C, L, W, "cpu", dtype, state=True, blc=True)
    fn = lambda x, w, b, s: ops.causal_conv1d(x, w, b, "silu", initial_state=s, backend="cpu")  # noqa: E731
    xc = x.detach().contiguous().requires_grad_()
    blc, flat = _run(fn, x, w, b, s, gy), _run(fn, xc, w, b, s, gy)
    assert torch.equal(blc[0], flat[0]) and torch.equal(blc[1], flat[1]) and torch.equal(blc[4], flat[4])
    # the weight and bias sums in another order (per run of 64 positions, then the runs; the contiguous
    # kernel: per sequence, then the batch): within fp32 rounding of the gradient's scale (a small entry
    # can come out of cancellation, its error that of the large ones), bf16 to a step of its own
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, c in zip(blc[2:4], flat[2:4]):
        torch.testing.assert_close(a, c, rtol=tol, atol=tol * c.abs().max().item())
    before, runs = torch.get_num_threads(), []
    try:
        for threads, g in ((1, gy), (2, gy), (2, gy.transpose(1, 2).contiguous().transpose(1, 2))):
            torch.set_num_threads(threads)
            runs.append(_run(fn, x, w, b, s, g))
    finally:
        torch.set_num_threads(before)
    for r in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(r, runs[0]))


def test_cpu_long_rows_bf16():
    _check("cpu", torch.device("cpu"), torch.bfloat16, 2, 16, 1000, 4, "silu")
    _check("cpu", torch.device("cpu"), torch.float32, 3, 8, 777, 3, "gelu", state=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_streaming_matches_one_call(backend, device):
    """Decoding in chunks, passing the final state on, gives the one-call result."""
    x, w, b, _, _ = _inputs(2, 4, 23, 4, device, torch.float32)
    x, w, b = x.detach(), w.detach(), b.detach()
    full = ops.causal_conv1d(x, w, b, "silu", backend=backend)
    state, pieces = None, []
    for lo, hi in [(0, 1), (1, 2), (2, 10), (10, 23)]:
        y, state = ops.causal_conv1d(x[..., lo:hi], w, b, "silu", initial_state=state, return_final_state=True,
                                     backend=backend)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, -1), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, x[..., -3:])


def test_reference_is_eager_conv():
    """The specification equals torch's grouped conv, in float64."""
    x, w, b, s, _ = _inputs(2, 3, 11, 3, "cpu", torch.float64, state=True)
    for act in ACTIVATIONS:
        code = check_activation("causal_conv1d", act)
        torch.testing.assert_close(causal_conv1d_fwd_torch(x, w, b, s, code), _eager(act)(x, w, b, s))


def test_depthwise_conv1d_weight_layout():
    x, w, b, _, _ = _inputs(1, 3, 9, 4, "cpu", torch.float32)
    torch.testing.assert_close(ops.causal_conv1d(x, w[:, None, :], b), ops.causal_conv1d(x, w, b))


def test_gradcheck_float64():
    x, w, b, s, _ = _inputs(2, 3, 6, 3, "cpu", torch.float64, state=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, s: ops.causal_conv1d(x, w, b, "gelu", initial_state=s, backend="torch"), (x, w, b, s))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    x, w, b, s, gy = _inputs(2, 3, 9, 3, device, torch.float32, state=True)
    torch.library.opcheck(torch.ops.bignlp_fast.causal_conv1d_fwd, (x, w, b, s, 3, backend))
    torch.library.opcheck(torch.ops.bignlp_fast.causal_conv1d_fwd, (x, w, None, None, 0, backend))
    torch.library.opcheck(torch.ops.bignlp_fast.causal_conv1d_bwd,
                          (gy, x.detach(), w.detach(), b.detach(), s.detach(), 3, backend))


def test_compiles_fullgraph():
    x, w, b, _, _ = _inputs(2, 8, 16, 4, "cpu", torch.float32)

    def block(x):
        return ops.causal_conv1d(x * 2, w, b, "silu").sum(1)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x))


def test_final_state_is_not_a_view_of_x():
    """A decoding loop may reuse its input buffer: the state handed to the next call must not change."""
    x, w = torch.randn(2, 3, 8), torch.randn(3, 4)
    _, state = ops.causal_conv1d(x, w, return_final_state=True)
    expected = x[..., -3:].clone()
    x.zero_()
    assert torch.equal(state, expected)


def test_bad_input():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="kernel width"):
        ops.causal_conv1d(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match="weight must be"):
        ops.causal_conv1d(x, torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"x must be \[B, C, L\]"):
        ops.causal_conv1d(x[0], torch.randn(3, 3))
    with pytest.raises(ValueError, match="initial_state"):
        ops.causal_conv1d(x, torch.randn(3, 3), initial_state=torch.randn(2, 3, 3))
    with pytest.raises(ValueError, match="activation"):
        ops.causal_conv1d(x, torch.randn(3, 3), activation="swish")
    with pytest.raises(ValueError, match="activation must be one of"):  # not "unhashable type"
        ops.causal_conv1d(x, torch.randn(3, 3), activation=["silu"])
    with pytest.raises(TypeError, match="dtype"):
        ops.causal_conv1d(x, torch.randn(3, 3, dtype=torch.float64))
