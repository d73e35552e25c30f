import pytest
import torch
import torch.nn.functional as F

from bignlp_fast.ops import distillation_loss
from conftest import backend_params
from reference import assert_within_torch_error

BACKENDS = backend_params("cpu", "torch")


def _eager(s, t, labels, T, alpha, ignore_index=-100):
    """What users write: KLDivLoss on log-softmaxes, times T^2, plus cross-entropy."""
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True)
    if labels is None:
        return kl * T * T
    return alpha * kl * T * T + (1 - alpha) * F.cross_entropy(s, labels, ignore_index=ignore_index)


def _inputs(N, V, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g) * scale).to(dtype).requires_grad_()
    t = (torch.randn(N, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    return s, t, labels


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("N,V", [(1, 1), (3, 7), (5, 97), (8, 1000), (2, 32003)])
@pytest.mark.parametrize("T,alpha,with_labels", [(2.0, 0.5, True), (1.0, 0.9, True), (4.0, 0.5, False)])
def test_matches_float64(backend, device, N, V, T, alpha, with_labels):
    for dtype in (torch.float32, torch.bfloat16):
        s, t, labels = _inputs(N, V, dtype)
        labels = labels if with_labels else None
        ours = distillation_loss(s, t, labels, T, alpha, backend=backend)
        (g_ours,) = torch.autograd.grad(ours, [s])
        theirs = _eager(s, t, labels, T, alpha)
        (g_theirs,) = torch.autograd.grad(theirs, [s])
        s64 = s.detach().double().requires_grad_()
        ref = _eager(s64, t.double(), labels, T, alpha)
        (g_ref,) = torch.autograd.grad(ref, [s64])
        assert ours.dtype == torch.float32 and ours.shape == ()
        assert_within_torch_error(f"{backend} {dtype} loss", ours, theirs.float(), ref, torch.float32)
        assert_within_torch_error(f"{backend} {dtype} grad", g_ours, g_theirs, g_ref, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ignore_index_and_leading_dims(backend, device):
    s, t, labels = _inputs(12, 50, torch.float32)
    labels[[1, 5, 6]] = -100
    ours = distillation_loss(s.view(3, 4, 50), t.view(3, 4, 50), labels.view(3, 4), 3.0, 0.3, backend=backend)
    ref = _eager(s.double(), t.double(), labels, 3.0, 0.3)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(ours * 2.5, [s])  # the backward scales the stored gradient
    (g_ref,) = torch.autograd.grad(_eager(s, t, labels, 3.0, 0.3) * 2.5, [s])
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_extreme_logits_stay_finite():
    s, t, labels = _inputs(4, 300, torch.float32, scale=80.0)
    loss = distillation_loss(s, t, labels, 0.5, 0.5)
    (g,) = torch.autograd.grad(loss, [s])
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss.double(), _eager(s.double(), t.double(), labels, 0.5, 0.5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scale", [1e4, 1e6])
def test_large_teacher_logits_keep_the_loss_within_torch_error(backend, device, scale):
    """Teacher logits of 1e4-1e6 (an unnormalised teacher): the KL is taken about the row maxima, not as
    A / Zt - mt / T + ..., whose fp32 terms of ~scale / T had cancelled (1e-3 of the loss at 1e5)."""
    s, t, labels = _inputs(4, 50, torch.float32)
    t = t.detach() * scale
    ours = distillation_loss(s, t, labels, backend=backend)
    assert_within_torch_error(f"{backend} loss at {scale:g}", ours, _eager(s, t, labels, 2.0, 0.5).float(),
                              _eager(s.double(), t.double(), labels, 2.0, 0.5), torch.float32)


def test_gradcheck_float64():
    s, t, labels = _inputs(3, 9, torch.float64)
    assert torch.autograd.gradcheck(lambda s: distillation_loss(s, t, labels, 2.0, 0.4, backend="torch"), (s,))


def test_double_backward_raises_instead_of_returning_zeros():
    """The backward scales a gradient stored by the forward: a gradient of it would be silently zero."""
    s, t, labels = _inputs(3, 9, torch.float32)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(distillation_loss(s, t, labels), [s], create_graph=True)
    (g,) = torch.autograd.grad(distillation_loss(s, t, labels), [s])  # a first derivative is fine
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    s, t, labels = _inputs(4, 33, torch.float32)
    torch.library.opcheck(torch.ops.bignlp_fast.distillation_loss_fwd, (s, t, labels, 2.0, 0.5, -100, True, backend))
    torch.library.opcheck(torch.ops.bignlp_fast.distillation_loss_fwd,
                          (s.detach(), t, None, 1.5, 0.5, -100, False, backend))


def test_compiles_fullgraph():
    s, t, labels = _inputs(4, 33, torch.float32)
    fn = lambda s: distillation_loss(s * 1.0, t, labels)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(s), fn(s))


def test_bad_input():
    s, t, labels = _inputs(4, 10, torch.float32)
    with pytest.raises(ValueError, match="detach"):
        distillation_loss(s, t.requires_grad_(), labels)
    t = t.detach()
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, labels, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(s, t, labels, alpha=1.5)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(s, t, labels[:3])
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(s, t[:, :9])
    for backend in ("cpu", "torch"):  # a label that is no class (ignore_index aside) is an error on every path
        for bad in (10, -1):
            with pytest.raises(RuntimeError, match=f"label {bad} of row 3 is outside"):
                distillation_loss(s, t, torch.tensor([0, -100, 2, bad]), backend=backend)
