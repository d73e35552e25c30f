"""Ops that return internal outputs to their backward (a workspace, a pre-activation, a gradient kept
for the backward) must not have autograd fill a zero gradient of that size on every backward
(ops._common.no_zero_grads): for distillation_loss over a vocabulary that memset was 15% of a step.
Each case runs the backward under a dispatch mode that records every fill and checks that none is
of the internal output's size; gradients through the other outputs alone still arrive."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bignlp_fast import ops
from conftest import backend_params

FILLS = {torch.ops.aten.fill_.Scalar, torch.ops.aten.zero_.default, torch.ops.aten.zeros.default,
         torch.ops.aten.zeros_like.default, torch.ops.aten.new_zeros.default}


class _Fills(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in FILLS:
            self.sizes.append(out.numel())
        return out


def _fills_in_backward(loss) -> list[int]:
    with _Fills() as mode:
        loss.backward()
    return mode.sizes


@pytest.mark.parametrize("backend,device", backend_params("cpu", "torch"))
def test_no_zero_gradient_for_internal_outputs(backend, device):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(64, 1000, generator=g, requires_grad=True)
    teacher, labels = torch.randn(64, 1000, generator=g), torch.randint(0, 1000, (64,), generator=g)
    assert student.numel() not in _fills_in_backward(ops.distillation_loss(student, teacher, labels, backend=backend))
    assert student.grad is not None

    x, w = torch.randn(2, 8, 150, generator=g, requires_grad=True), torch.randn(9, 8, 3, generator=g)
    y = ops.conv1d(x, w, None, padding=1, activation="gelu", backend=backend)
    assert y.numel() not in _fills_in_backward(y.square().sum())

    xw, w_hh = torch.randn(6, 3, 4 * 5, generator=g, requires_grad=True), torch.randn(4 * 5, 5, generator=g)
    h0, c0 = torch.zeros(3, 5), torch.zeros(3, 5)
    out, h_n, c_n = ops.rnn_layer("lstm", xw, w_hh, None, h0, c0, backend=backend)
    sizes = _fills_in_backward(out.sum())
    assert all(s <= h_n.numel() for s in sizes), sizes  # zeros for the unused h_n and c_n only
    # only the final state used: the output's gradient is zeros, made here
    out, h_n, c_n = ops.rnn_layer("lstm", xw, w_hh, None, h0, c0, backend=backend)
    (d_xw,) = torch.autograd.grad(h_n.sum(), xw)
    xw_ref = xw.detach().double().requires_grad_()
    _, h_ref, _ = ops.rnn_layer("lstm", xw_ref, w_hh.double(), None, h0.double(), c0.double(), backend="torch")
    (d_ref,) = torch.autograd.grad(h_ref.sum(), xw_ref)
    torch.testing.assert_close(d_xw.double(), d_ref, rtol=1e-5, atol=1e-6)
