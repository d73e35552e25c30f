import pytest
import torch

from bignlp_fast import ops
from bignlp_fast.ops._activation import check_activation
from bignlp_fast.ops.text_cnn_pool import text_cnn_pool_eager, text_cnn_pool_fwd_torch
from conftest import backend_params
from reference import assert_within_torch_error

BACKENDS = backend_params("cpu", "cuda", "triton", "torch")
DTYPES = {"cpu": (torch.float32, torch.bfloat16), "torch": (torch.float32, torch.bfloat16),
          "cuda": (torch.float32, torch.float16, torch.bfloat16), "triton": (torch.float32, torch.float16, torch.bfloat16)}
ACTIVATIONS = [None, "relu", "gelu", "silu", "tanh"]


def _inputs(B, L, E, channels, widths, device, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, E, generator=g).to(device=device, dtype=dtype).requires_grad_()
    ws = [(torch.randn(c, E, k, generator=g) / (E * k) ** 0.5).to(device=device, dtype=dtype).requires_grad_()
          for c, k in zip(channels, widths)]
    bs = [torch.randn(c, generator=g).to(device=device, dtype=dtype).requires_grad_() for c in channels] if bias else None
    gy = torch.randn(B, sum(channels), generator=g).to(device=device, dtype=dtype)
    return x, ws, bs, gy


def _run(fn, x, ws, bs, gy):
    y = fn(x, ws, bs)
    leaves = [x, *ws, *(bs or [])]
    return [y, *torch.autograd.grad(y, leaves, gy.to(y.dtype))]


def _check(backend, device, dtype, B, L, E, channels, widths, activation, lengths=None, bias=True):
    """Against the eager code users write (conv1d + act + masked max + cat), every length >= the widest kernel."""
    x, ws, bs, gy = _inputs(B, L, E, channels, widths, device, dtype, bias)
    lens = lengths.to(device) if lengths is not None else None
    ours = _run(lambda x, ws, bs: ops.text_cnn_pool(x, ws, bs, activation, lens, backend=backend), x, ws, bs, gy)
    theirs = _run(lambda x, ws, bs: text_cnn_pool_eager(x, ws, bs, activation, lens), x, ws, bs, gy)
    d64 = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    ref = _run(lambda x, ws, bs: text_cnn_pool_eager(x, ws, bs, activation, lens), d64(x), [d64(w) for w in ws],
               [d64(b) for b in bs] if bias else None, gy.double())
    names = ["out", "grad_x"] + [f"grad_w{k}" for k in widths] + ([f"grad_b{k}" for k in widths] if bias else [])
    for name, a, c, r in zip(names, ours, theirs, ref):
        assert_within_torch_error(f"{backend} {dtype} {activation} {name}", a, c, r, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_float64(backend, device, activation):
    for dtype in DTYPES[backend]:
        _check(backend, device, dtype, 3, 13, 10, [5, 3, 17], [3, 4, 5], activation)
        _check(backend, device, dtype, 3, 13, 10, [5, 3, 17], [3, 4, 5], activation, lengths=torch.tensor([13, 5, 9]))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_batch_one_width_one_no_bias(backend, device):
    _check(backend, device, torch.float32, 1, 7, 3, [4, 2], [1, 7], "relu", bias=False)
    _check(backend, device, torch.float32, 2, 7, 5, [3], [2], "tanh", lengths=torch.tensor([2, 6]), bias=False)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
def test_gradient_of_x_alone(backend, device, bias):
    """Frozen convolutions (only the embeddings train): the call takes autograd.Function's route, whose
    list arguments must get None, not a list (it had raised "returned a gradient different than None")."""
    x, ws, bs, gy = _inputs(2, 9, 4, [3, 2], [3, 2], device, torch.float32, bias)
    ws, bs = [w.detach() for w in ws], [b.detach() for b in bs] if bias else None
    (grad,) = torch.autograd.grad(ops.text_cnn_pool(x, ws, bs, "relu", backend=backend), x, gy)
    (want,) = torch.autograd.grad(text_cnn_pool_eager(x, ws, bs, "relu", None), x, gy)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_propagates_as_amax_does(backend, device):
    """A NaN window is its channel's maximum, as in the eager code's amax (the kernels had passed over it,
    and a row of NaN gave -inf)."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 9, 4, generator=g), torch.randn(5, 4, 3, generator=g)
    x[0, 2, 1] = float("nan")  # the windows over position 2 of sequence 0
    x[2] = float("nan")  # a whole sequence
    x = x.to(device)
    w = w.to(device)
    got = ops.text_cnn_pool(x, [w], None, "relu", backend=backend)
    want = text_cnn_pool_eager(x, [w], None, "relu", None)
    assert want.isnan()[0].all() and want.isnan()[2].all() and not want.isnan()[1].any()
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_vmap_over_x_and_lengths(backend, device):
    """torch.func.vmap over x and lengths (a rule of ours: torch generates none for an op with list
    arguments): the same as a loop; mapping over the kernels is refused with a message."""
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(3, 4, 3, generator=g).to(device), torch.randn(2, 4, 2, generator=g).to(device)]
    bs = [torch.randn(3, generator=g).to(device), torch.randn(2, generator=g).to(device)]
    xs, lens = torch.randn(4, 2, 9, 4, generator=g).to(device), torch.randint(0, 10, (4, 2), generator=g)
    run = lambda x, lengths=None: ops.text_cnn_pool(x, ws, bs, "gelu", lengths, backend=backend)  # noqa: E731
    assert torch.equal(torch.func.vmap(run)(xs, lens), torch.stack([run(x, n) for x, n in zip(xs, lens)]))
    assert torch.equal(torch.func.vmap(run, in_dims=1)(xs.transpose(0, 1)), torch.stack([run(x) for x in xs]))
    with pytest.raises(NotImplementedError, match="vmap over the weights"):
        torch.func.vmap(lambda w: ops.text_cnn_pool(xs[0], [w], None, backend=backend))(torch.stack(ws[:1] * 3))


def test_cpu_benchmark_like_shapes():
    """Long sequences over several position tiles, lengths in any order, bf16."""
    lengths = torch.tensor([100, 37, 64, 99, 5, 71])
    _check("cpu", torch.device("cpu"), torch.float32, 6, 100, 50, [20, 33, 10], [3, 4, 5], "relu", lengths=lengths)
    _check("cpu", torch.device("cpu"), torch.bfloat16, 6, 100, 50, [20, 33, 10], [3, 4, 5], "gelu", lengths=lengths)


@pytest.mark.parametrize("backend,device", backend_params("cuda"))
def test_cuda_tiles(backend, device):
    """The CUDA kernel's tiles: 64 positions (sequences over 2-3 tiles, lengths past L counted as L),
    64 channels (a width over two channel blocks), 16 embedding columns (a partial last one)."""
    _check(backend, device, torch.float32, 3, 150, 20, [70, 5], [3, 1], "relu", lengths=torch.tensor([150, 64, 65]))
    _check(backend, device, torch.bfloat16, 2, 70, 17, [66], [4], "silu")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sequences_shorter_than_a_width(backend, device):
    """No window: zeros and zero gradients for that width (the eager code would give -inf)."""
    x, ws, bs, gy = _inputs(3, 6, 4, [2, 3], [2, 5], device, torch.float32)
    lengths = torch.tensor([6, 3, 0], device=device)
    ours = _run(lambda x, ws, bs: ops.text_cnn_pool(x, ws, bs, "relu", lengths, backend=backend), x, ws, bs, gy)
    code = check_activation("t", "relu")
    ref = text_cnn_pool_fwd_torch(x.detach().double(), [w.detach().double() for w in ws],
                                  [b.detach().double() for b in bs], lengths, code)[0]
    torch.testing.assert_close(ours[0].double(), ref, rtol=1e-5, atol=1e-6)
    assert (ours[0][1, 2:] == 0).all() and (ours[0][2] == 0).all()
    # sequence 2 has no window at all, sequence 1 none of width 5: nothing flows back from them
    assert (ours[1][2] == 0).all()
    eager = text_cnn_pool_eager(x, ws, bs, "relu", lengths)
    assert torch.isinf(eager[1, 2:]).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("B,L,E", [(0, 6, 4), (2, 0, 4), (2, 6, 0)])
def test_empty_inputs(backend, device, B, L, E):
    """No batch, no tokens (no window: zeros) or no embedding (an empty sum: each window is the bias) on
    every backend; the torch backend's backward gathered position -1 at L = 0, and with E = 0 it took
    F.conv1d's [B, 0, P] answer (no channels) for the bias."""
    x, ws, bs, gy = _inputs(B, L, E, [2, 3], [2, 3], device, torch.float32)
    ours = _run(lambda x, ws, bs: ops.text_cnn_pool(x, ws, bs, "relu", backend=backend), x, ws, bs, gy)
    assert ours[0].shape == (B, 5)
    expected = torch.relu(torch.cat(bs)).expand(B, 5) if L else torch.zeros(B, 5, device=device)
    torch.testing.assert_close(ours[0], expected.detach())
    assert ours[1].shape == x.shape and not ours[1].any()
    assert [g.shape for g in ours[2:]] == [t.shape for t in ws + bs]
    assert not any(g.any() for g in ours[2:4])
    # the bias is each window's value when E == 0, so its gradient is grad_out where the relu passes it
    expected_grad_b = (gy * (torch.cat(bs) > 0)).sum(0) if L else torch.zeros(5, device=device)
    torch.testing.assert_close(torch.cat(ours[4:]), expected_grad_b.detach() if E == 0 else torch.zeros_like(expected_grad_b))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ties_take_the_first_position(backend, device):
    x = torch.zeros(1, 8, 2, device=device)
    x[0, 2] = 1.0
    x[0, 5] = 1.0  # the same window value at positions 2 and 5
    w = torch.ones(1, 2, 1, device=device, requires_grad=True)
    out = ops.text_cnn_pool(x, [w], None, None, backend=backend)
    (grad_w,) = torch.autograd.grad(out.sum(), [w])
    assert out.item() == 2.0 and grad_w.sum().item() == 2.0  # one window's gradient, not two


def test_gradcheck_float64():
    x, ws, bs, _ = _inputs(2, 7, 3, [2, 3], [2, 3], "cpu", torch.float64)
    lengths = torch.tensor([7, 4])
    assert torch.autograd.gradcheck(
        lambda x, w0, w1, b0, b1: ops.text_cnn_pool(x, [w0, w1], [b0, b1], "gelu", lengths, backend="torch"),
        (x, *ws, *bs))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    x, ws, bs, gy = _inputs(2, 9, 4, [3, 2], [2, 3], device, torch.float32)
    lengths = torch.tensor([9, 4], device=device)
    torch.library.opcheck(torch.ops.bignlp_fast.text_cnn_pool_fwd, (x, ws, bs, lengths, 1, backend))
    torch.library.opcheck(torch.ops.bignlp_fast.text_cnn_pool_fwd, (x, ws, [], None, 2, backend))
    out, idx, pre = torch.ops.bignlp_fast.text_cnn_pool_fwd(x.detach(), [w.detach() for w in ws],
                                                            [b.detach() for b in bs], lengths, 1, backend)
    torch.library.opcheck(torch.ops.bignlp_fast.text_cnn_pool_bwd,
                          (gy, x.detach(), [w.detach() for w in ws], [b.detach() for b in bs], idx, pre, 1, backend))


def test_compiles_fullgraph():
    x, ws, bs, _ = _inputs(2, 12, 6, [4, 4], [3, 5], "cpu", torch.float32)
    lengths = torch.tensor([12, 7])

    def block(x):
        return ops.text_cnn_pool(x * 1.5, ws, bs, "relu", lengths).sum(-1)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x))


def test_bad_input():
    x, ws, bs, _ = _inputs(2, 8, 4, [3], [3], "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"must be \[C, E=4, k\]"):
        ops.text_cnn_pool(x, [torch.randn(3, 5, 3)])
    with pytest.raises(ValueError, match="biases has 2 entries"):
        ops.text_cnn_pool(x, ws, [torch.randn(3), torch.randn(3)])
    with pytest.raises(ValueError, match="lengths must lie"):
        ops.text_cnn_pool(x, ws, lengths=torch.tensor([9, 1]))
    with pytest.raises(ValueError, match="lengths must be an integer"):
        ops.text_cnn_pool(x, ws, lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="at least one"):
        ops.text_cnn_pool(x, [])
    with pytest.raises(ValueError, match=r"x must be \[B, L, E\]"):
        ops.text_cnn_pool(x[0], ws)
