import pytest
import torch
import torch.nn.functional as F

import bignlp_fast
from bignlp_fast.ops import add_layer_norm
from conftest import backend_params
from reference import assert_within_torch_error

BACKENDS = backend_params("cpu", "cuda", "triton", "torch")
DTYPES = {"cpu": (torch.float32, torch.bfloat16), "torch": (torch.float32, torch.bfloat16),
          "cuda": (torch.float32, torch.float16, torch.bfloat16),
          "triton": (torch.float32, torch.float16, torch.bfloat16)}
# Hidden sizes that are not multiples of any vector width, batch 1, 3-D inputs.
SHAPES = [(1, 1), (3, 7), (2, 5, 384), (4, 769), (1, 1025)]


def _inputs(shape, dtype, device, residual=True, weight=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: (torch.randn(*s, generator=g) * 2 + 0.5).to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    hidden = shape[-1]
    return (make(*shape), make(*shape) if residual else None, make(hidden) if weight else None,
            make(hidden) if bias else None)


def _eager(x, r, w, b, eps=1e-5):
    s = x + r if r is not None else x
    return F.layer_norm(s, (x.shape[-1],), w, b, eps), s


def _run(fn, tensors, grads):
    """Outputs of fn(*tensors) and the gradients of every given tensor for the output gradients."""
    out, s = fn(*tensors)
    leaves = [t for t in tensors if t is not None]
    outs, gs = ([out, s], grads) if tensors[1] is not None else ([out], grads[:1])
    return [out, s, *torch.autograd.grad(outs, leaves, gs)]


def _check_against_float64(backend, device, dtype, shape, residual=True, weight=True, bias=True, make=None):
    tensors = (make or _inputs)(shape, dtype, device, residual, weight, bias)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(2)]
    ours = _run(lambda *t: add_layer_norm(*t, backend=backend), tensors, grads)
    theirs = _run(_eager, tensors, grads)
    t64 = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    ref = _run(_eager, t64, [gr.double() for gr in grads])
    names = ["out", "residual_out"] + [n for n, t in zip(["grad_x", "grad_residual", "grad_weight", "grad_bias"],
                                                         tensors) if t is not None]
    for name, a, b, r in zip(names, ours, theirs, ref):
        assert_within_torch_error(f"{backend} {dtype} {shape} {name}", a, b, r, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(backend, device, shape):
    if backend == "triton" and device.type == "cpu" and shape[-1] > 400:
        pytest.skip("the Triton interpreter is slow: small shapes only on the CPU")
    for dtype in DTYPES[backend]:
        _check_against_float64(backend, device, dtype, shape)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("residual,weight,bias", [(False, True, True), (True, False, False), (True, True, False),
                                                  (False, False, False)])
def test_optional_arguments(backend, device, residual, weight, bias):
    for dtype in DTYPES[backend]:
        _check_against_float64(backend, device, dtype, (3, 37), residual, weight, bias)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    def make(shape, dtype, device, *flags):
        x, r, w, b = _inputs((shape[0], 2 * shape[1]), dtype, device, *flags)
        with torch.no_grad():  # every other column: a strided view, made a leaf again
            x, r = (t[:, ::2].detach().requires_grad_() for t in (x, r))
            w, b = (t[::2].detach().requires_grad_() for t in (w, b))
        assert not x.is_contiguous() and not w.is_contiguous()
        return x, r, w, b
    _check_against_float64(backend, device, torch.float32, (5, 33), make=make)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_many_rows(dtype):
    """The benchmark's size class: many rows, split over threads."""
    _check_against_float64("cpu", torch.device("cpu"), dtype, (12288, 768))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_weight_gradients_do_not_depend_on_thread_count(backend, device):
    if device.type != "cpu":
        pytest.skip("thread count is a CPU setting")
    x, r, w, b = _inputs((333, 96), torch.float32, device)
    threads = torch.get_num_threads()
    results = []
    for n in (1, max(2, threads)):
        torch.set_num_threads(n)
        try:
            out, s = add_layer_norm(x, r, w, b, backend=backend)
            results.append(torch.autograd.grad([out, s], [w, b], [torch.ones_like(out), torch.ones_like(s)]))
        finally:
            torch.set_num_threads(threads)
    for a, c in zip(*results):
        assert torch.equal(a, c)


@pytest.mark.parametrize("hidden", [7, 40, 769])
def test_cpu_residual_out_is_the_eager_sum_bit_for_bit(hidden):
    """residual_out is x + residual rounded once to the dtype, as eager PyTorch computes it (the
    kernel normalises that rounded sum): equal bit for bit, full and partial vector steps."""
    for dtype in (torch.float32, torch.bfloat16):
        x, r, w, b = (t.detach() for t in _inputs((33, hidden), dtype, torch.device("cpu")))
        out, s = add_layer_norm(x, r, w, b, backend="cpu")
        assert torch.equal(s, x + r), dtype
        assert torch.equal(out, add_layer_norm(x + r, None, w, b, backend="cpu")[0]), dtype


def test_gradcheck_float64():
    x, r, w, b = (t.double().detach().requires_grad_() for t in _inputs((3, 11), torch.float32, "cpu"))
    assert torch.autograd.gradcheck(lambda *t: add_layer_norm(*t, backend="torch"), (x, r, w, b))
    assert torch.autograd.gradcheck(lambda x, w: add_layer_norm(x, None, w, None, backend="torch"), (x, w))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    dtype = torch.float32
    x, r, w, b = _inputs((4, 40), dtype, device)
    fwd = torch.ops.bignlp_fast.add_layer_norm_fwd
    torch.library.opcheck(fwd, (x, r, w, b, 1e-5, backend))
    torch.library.opcheck(fwd, (x, None, w, None, 1e-5, backend))
    _out, s, mean, rstd = (t.detach() for t in fwd(x, r, w, b, 1e-5, backend))
    gy = torch.randn_like(s)  # the backward op has no backward of its own: no input requires grad
    torch.library.opcheck(torch.ops.bignlp_fast.add_layer_norm_bwd,
                          (gy, gy.clone(), s, mean, rstd, w.detach(), True, backend))


def test_layer_norm_module_is_a_drop_in():
    for kwargs in ({}, {"elementwise_affine": False}, {"bias": False}):
        ref = torch.nn.LayerNorm(48, eps=1e-6, **kwargs)
        if ref.weight is not None:
            torch.nn.init.normal_(ref.weight)
        ours = bignlp_fast.nn.LayerNorm(48, eps=1e-6, **kwargs)
        ours.load_state_dict(ref.state_dict())
        assert list(ours.state_dict()) == list(ref.state_dict())
        x = torch.randn(2, 3, 48)
        torch.testing.assert_close(ours(x), ref(x))
    ref = torch.nn.LayerNorm((4, 6))  # several normalised dimensions
    torch.nn.init.normal_(ref.weight)
    torch.testing.assert_close(bignlp_fast.nn.LayerNorm.from_torch(ref)(x.view(2, 3, 4, 12)[..., :6].contiguous()),
                               ref(x.view(2, 3, 4, 12)[..., :6].contiguous()))


def test_layer_norm_module_with_residual():
    ln = bignlp_fast.nn.LayerNorm(16)
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    out, s = ln(x, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(out, F.layer_norm(x + r, (16,), ln.weight, ln.bias))


def test_layer_norm_module_follows_torch_dtypes_under_autocast_and_mixed_precision():
    ref = torch.nn.LayerNorm(16)
    torch.nn.init.normal_(ref.weight)
    ours = bignlp_fast.nn.LayerNorm.from_torch(ref)
    x = torch.randn(3, 16, dtype=torch.bfloat16)  # bf16 activations, fp32 weights
    assert ours(x).dtype == ref(x).dtype == torch.bfloat16
    torch.testing.assert_close(ours(x), ref(x), rtol=0.02, atol=0.02)  # one bf16 rounding of output and weights
    lin = torch.nn.Linear(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = ours(lin(x.float())), ref(lin(x.float()))
    assert got.dtype == want.dtype == torch.bfloat16  # CPU autocast keeps layer_norm in the input's dtype
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)


def test_compiles_without_graph_breaks():
    ln = bignlp_fast.nn.LayerNorm(32)

    def block(x, r, w1):
        h, s = ln(x, r)
        return bignlp_fast.ops.bias_gelu(h @ w1, None), s

    x, r = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32)
    w1 = torch.randn(32, 32, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    got, want = compiled(x, r, w1), block(x, r, w1)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)
    (got[0].sum() + got[1].sum()).backward()
    gx = x.grad.clone()
    x.grad = None
    (want[0].sum() + want[1].sum()).backward()
    torch.testing.assert_close(gx, x.grad)


def test_bad_input_names_the_argument():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    with pytest.raises(ValueError, match="eps must be a non-negative number, got 'a'"):
        add_layer_norm(x, x, w, w, eps="a")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        add_layer_norm([1.0, 2.0])
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        add_layer_norm(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        add_layer_norm(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"residual has shape \(4, 9\) but x has \(4, 8\)"):
        add_layer_norm(x, torch.randn(4, 9))
    with pytest.raises(TypeError, match="residual has dtype torch.float64 but x has torch.float32"):
        add_layer_norm(x, x.double())
    with pytest.raises(ValueError, match=r"weight must be a vector of x's last dimension, shape \(8,\); got \(7,\)"):
        add_layer_norm(x, None, torch.randn(7))
    with pytest.raises(ValueError, match=r"bias must be a vector of x's last dimension, shape \(8,\); got \(2, 4\)"):
        add_layer_norm(x, None, w, torch.randn(2, 4))
    with pytest.raises(TypeError, match="weight has dtype torch.bfloat16"):
        add_layer_norm(x, None, w.bfloat16())
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        add_layer_norm(x, None, w.to("meta"))
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        add_layer_norm(x, None, w, eps=-1.0)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        add_layer_norm(x, backend="fast")
    with pytest.raises(bignlp_fast.BackendError, match="backend 'cuda' cannot run this call: .*CUDA tensors"):
        add_layer_norm(x, backend="cuda")
    with pytest.raises(bignlp_fast.BackendError, match="cpu backend of add_layer_norm runs float32, bfloat16, got float16"):
        add_layer_norm(x.half(), backend="cpu")
    with pytest.raises(ValueError, match="normalized_shape"):
        bignlp_fast.nn.LayerNorm(8)(torch.randn(2, 9))
