"""distillation_loss: knowledge distillation's loss in one pass over the logits, forward and backward.

    loss = alpha * T^2 * mean_rows KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, labels)

(s: student logits, t: teacher logits, T: temperature; CE is the mean over rows whose label is not
ignore_index, and 0 when every row is ignored (where F.cross_entropy's mean is NaN); a label outside
[0, V) that is not ignore_index raises, as in F.cross_entropy; without labels the loss is the KL term
alone, alpha and all.) Eager PyTorch writes
log_softmax(s/T), softmax(t/T), log_softmax(t/T), their product, and log_softmax(s), each [N, V],
and its backward writes as many again; with a 50k vocabulary those are the largest tensors of a
training step. Fused, each row is read in two passes (maxima, then sums of exponentials), and
when a gradient is needed a third pass writes d loss / d s directly: the softmaxes never exist as
tensors. The backward only scales that stored gradient by grad_output.

The teacher gets no gradient (it is the teacher: pass it detached; a teacher that requires grad
raises). Kernel contract (every backend; ``distillation_loss_fwd_torch`` is the specification):
student, teacher [N, V] contiguous, one dtype; labels int64 [N] or None; returns (loss: a float32
scalar (float64 for float64 logits), grad [N, V] in student's dtype, or [0] when need_grad is
false). Row sums are reduced in a fixed order (deterministic).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bignlp_fast import _backend
from bignlp_fast.ops._common import (acc_dtype, call, check_like, check_tensor, custom_op, fresh_like, grads_or_zeros,
                                     kernel, no_zero_grads, register_autograd)

OP = _backend.register_op(
    "distillation_loss",
    dtypes={"cpu": (torch.float32, torch.bfloat16)},
    missing={"cuda": "no CUDA kernel for distillation_loss yet", "triton": "no Triton kernel for distillation_loss yet"},
)


# ---- reference backend ------------------------------------------------------------------------
def distillation_loss_fwd_torch(student: Tensor, teacher: Tensor, labels: Optional[Tensor], temperature: float,
                                alpha: float, ignore_index: int, need_grad: bool):
    acc = acc_dtype(student.dtype)
    s, t = student.to(acc), teacher.to(acc)
    N = s.shape[0]
    T = temperature
    log_ps, log_pt = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    pt = log_pt.exp()
    kl = (pt * (log_pt - log_ps)).sum(-1).sum() / max(N, 1)
    kd_weight = alpha if labels is not None else 1.0
    loss = kd_weight * T * T * kl
    grad = kd_weight * T / max(N, 1) * (log_ps.exp() - pt)  # d(T^2 KL)/ds = T (softmax(s/T) - softmax(t/T))
    if labels is not None:
        valid = labels != ignore_index
        bad = (valid & ((labels < 0) | (labels >= s.shape[1]))).nonzero()
        if bad.numel():  # as the kernels (and F.cross_entropy): never a loss for a label that is no class
            r = int(bad[0, 0])
            raise RuntimeError(f"distillation_loss: label {int(labels[r])} of row {r} is outside [0, {s.shape[1]})")
        n_valid = max(int(valid.sum()), 1)
        log_p1 = torch.log_softmax(s, -1)
        safe = labels.clamp(0, s.shape[1] - 1)  # the ignored rows' labels, for gather and scatter
        ce_rows = -log_p1.gather(1, safe[:, None])[:, 0]
        loss = loss + (1 - alpha) * ce_rows.masked_fill(~valid, 0.0).sum() / n_valid
        onehot = torch.zeros_like(s).scatter_(1, safe[:, None], 1.0)
        grad = grad + (1 - alpha) / n_valid * (log_p1.exp() - onehot) * valid[:, None]
    return loss.to(acc), (grad.to(student.dtype) if need_grad else student.new_empty(0))


# ---- custom op --------------------------------------------------------------------------------
@custom_op("distillation_loss_fwd")
def distillation_loss_fwd(student: Tensor, teacher: Tensor, labels: Optional[Tensor], temperature: float,
                          alpha: float, ignore_index: int, need_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    run = kernel("distillation_loss", "fwd", backend)
    return tuple(run(student.contiguous(), teacher.contiguous(),
                     labels.contiguous() if labels is not None else None, temperature, alpha, ignore_index, need_grad))


@distillation_loss_fwd.register_fake
def _(student, teacher, labels, temperature, alpha, ignore_index, need_grad, backend):
    return student.new_empty((), dtype=acc_dtype(student.dtype)), (fresh_like(student) if need_grad
                                                       else student.new_empty(0))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    no_zero_grads(ctx, output, 1)


def _backward(ctx, grad_loss, _grad_grad):
    (grad_loss,) = grads_or_zeros(ctx, grad_loss)
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0:
        raise RuntimeError("distillation_loss: this forward did not keep the gradient (need_grad=False); call "
                           "the public distillation_loss, which keeps it when the student requires grad")
    if torch.is_grad_enabled():  # create_graph=True: the stored gradient has no graph to differentiate
        raise RuntimeError("distillation_loss has no second derivative (create_graph=True / double backward): "
                           "its backward scales the gradient its forward stored. Write the loss in eager PyTorch "
                           "(log_softmax, kl_div, cross_entropy) where a gradient of the gradient is needed")
    return (grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None)


register_autograd(distillation_loss_fwd, _backward, _setup_context)


# ---- public op --------------------------------------------------------------------------------
def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None,
                      temperature: float = 2.0, alpha: float = 0.5, ignore_index: int = -100, *,
                      backend: Optional[str] = None) -> Tensor:
    """Temperature-scaled KL(teacher || student) * T^2, mixed with cross-entropy: a float32 scalar
    (float64 for float64 logits).

    Args:
        student_logits, teacher_logits: [..., V], one dtype; the leading dims are flattened to rows.
        labels: int64 [...] (the leading dims) or None; rows labelled ignore_index are left out of
            the cross-entropy's mean (not out of the KL term).
        temperature: T > 0. alpha: the KL term's weight in [0, 1] (with labels).
        backend: "cpu", "torch" or None for automatic.
    """
    op = "distillation_loss"
    check_tensor(op, "student_logits", student_logits, min_dim=2)
    check_like(op, "teacher_logits", teacher_logits, "student_logits", student_logits)
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: teacher_logits requires grad; the teacher gets no gradient here, pass "
                         "teacher_logits.detach()")
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{op}: alpha must lie in [0, 1], got {alpha}")
    V = student_logits.shape[-1]
    if student_logits.numel() == 0:  # torch's mean over no rows is NaN; say so instead
        raise ValueError(f"{op}: empty logits {tuple(student_logits.shape)}; the loss is a mean over rows")
    student, teacher = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
    if labels is not None:
        if labels.dtype not in (torch.int32, torch.int64) or labels.shape != student_logits.shape[:-1]:
            raise ValueError(f"{op}: labels must be an integer tensor of shape {tuple(student_logits.shape[:-1])}, got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        labels = labels.reshape(-1).to(device=student.device, dtype=torch.int64)
    name = _backend.choose(OP, student.device, student.dtype, backend)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return call(distillation_loss_fwd, student, teacher.detach(), labels, float(temperature), float(alpha),
                                 int(ignore_index), need_grad, name)[0]
