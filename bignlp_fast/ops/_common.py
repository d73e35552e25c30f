"""Pieces every op shares: argument checks with messages that name the argument, and the lookup of
a backend's kernel by the project's naming ladder, ``{op}_{fwd|bwd}_{backend}``:

- cpu, cuda: ``bignlp_fast._C.{op}_fwd_cpu`` / ``..._cuda`` (csrc/cpu/{op}.cpp, csrc/cuda/{op}.cu)
- triton:    ``bignlp_fast.kernels.{op}.{op}_fwd_triton`` (kernels/{op}.py)
- torch:     ``bignlp_fast.ops.{op}.{op}_fwd_torch`` (the reference, beside the public op)

and the custom ops' registration (:func:`custom_op`) with the eager shortcut past torch's dispatcher
(:func:`call`).
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import operator
from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from bignlp_fast import _backend


# ---- custom ops and the eager shortcut ------------------------------------------------------------
# A custom op costs ~8 us per call in torch's dispatcher (Python -> C++ dispatcher -> autograd
# redispatch -> Python body), more than the kernel itself for the small calls of decoding (GPT-2 at
# batch 1 makes ~100 of them per token); one that autograd records costs more: the custom op's
# autograd layer added ~35 us to a forward+backward (add_layer_norm on [8, 768]: 89 us against 54 us
# through a torch.autograd.Function, eager PyTorch 31 us). So call() takes the cheapest route that
# keeps the semantics:
# - nothing records or transforms the call: the op's body directly (same function, same result);
# - only autograd must record it: the body on a torch.autograd.Function with the op's own
#   setup_context and backward (:func:`register_autograd`), the same gradients without the dispatcher;
# - anything else (torch.compile, modes, functorch, the profiler, subclasses, meta tensors, tensors in
#   a list that require grad, which an autograd.Function would not see): the custom op through the
#   dispatcher.
_BODIES: dict = {}
_EAGER: dict = {}
PLAIN_TENSORS = (Tensor, torch.nn.Parameter)  # types of tensors whose ops need no dispatcher (not subclasses)
_SCALARS = frozenset((int, float, bool, str, type(None)))  # arguments _route passes over at once


def custom_op(name: str) -> Callable:
    """``@custom_op("foo_fwd")`` = ``torch.library.custom_op("bignlp_fast::foo_fwd", mutates_args=())``,
    keeping the undecorated function for :func:`call`."""

    def register(fn: Callable):
        op = torch.library.custom_op(f"bignlp_fast::{name}", fn, mutates_args=())
        _BODIES[op] = fn
        if name.endswith("_bwd"):
            _no_second_derivative(op, name.removesuffix("_bwd"))
        return op

    return register


def _no_second_derivative(op, public: str) -> None:
    """A backward op's own backward: a clear error when a second derivative (double backward: a
    gradient taken with create_graph=True, then differentiated) passes through it. Without one, torch
    says only that no autograd formula was registered. Raised at the second backward, not the first:
    create_graph=True alone (gradients kept with their graph, not differentiated here) still works."""
    def backward(ctx, *grads):
        raise RuntimeError(f"bignlp_fast.{public} has no second derivative (double backward through a gradient "
                           "taken with create_graph=True): its backward is a fused kernel. Use the torch.nn module "
                           "or torch function it replaces where a gradient of a gradient is needed")

    register_autograd(op, backward, lambda ctx, inputs, output: None)


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)`` for a custom op made by
    :func:`custom_op`, and the same pair on a torch.autograd.Function for :func:`call`'s eager route.
    ``setup_context`` sees every argument of the op (call() fills in defaults) and ``backward``
    returns one gradient per argument, as torch.library asks."""
    op.register_autograd(backward, setup_context=setup_context)
    params = list(inspect.signature(_BODIES[op]).parameters.values())
    defaults = tuple(p.default for p in params)

    # forward(ctx, ...) rather than a separate setup_context: apply() then skips binding the
    # arguments to forward's signature by inspect (~10 us a call)
    def forward(ctx, *args):
        output = _BODIES[op](*args)  # looked up per call: the body registered now or a test's wrapper
        setup_context(ctx, args, output)
        return output

    def eager_backward(ctx, *grads):
        # a list of tensors is a plain argument to an autograd.Function, whose gradient must be None
        # (this route is taken only when none of its tensors requires grad; see _route)
        return tuple(None if isinstance(g, (list, tuple)) else g for g in backward(ctx, *grads))

    eager = type(f"{op._name.split('::')[-1]}_eager", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(eager_backward)})
    _EAGER[op] = (eager, len(params), defaults)


def _route(args) -> int:
    """0: the body can run directly; 1: only autograd must record the call; 2: the dispatcher must
    see it (see the top of this section)."""
    if _forward_ad._current_level >= 0:
        _no_forward_mode(args)
    if _recorded():
        return 2
    grad = torch.is_grad_enabled()
    route = 0
    for a in args:
        kind = type(a)
        if kind in _SCALARS:
            continue
        if kind in PLAIN_TENSORS:
            if a.is_meta:
                return 2  # the op's fake function is its meta kernel: shapes without data
            if grad and a.requires_grad:
                route = 1
        elif isinstance(a, Tensor) or (isinstance(a, (list, tuple)) and dispatcher_needed_in(a, grad)):
            return 2  # a subclass, or a list holding one or an input that requires grad
    return route


def _recorded() -> bool:
    """Whether something records or transforms every call now, whatever its arguments: torch.compile,
    torch.jit tracing, a TorchDispatchMode or TorchFunctionMode, functorch transforms, the profiler."""
    return (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
            or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active() or torch.autograd.profiler._is_profiler_enabled)


def cpu_lane_open() -> bool:
    """Whether an op's eager lane may call its CPU kernel now, as far as the state of the process goes
    (the arguments have their own conditions): nothing records or transforms calls, no forward-mode AD,
    autocast off for every device type, BIGNLP_FAST_BACKEND unset or "cpu", and the CPU kernels built
    for this CPU. The general path, which the lane skips, would then choose the cpu backend."""
    return (_forward_ad._current_level < 0 and not _recorded() and autocast_off()
            and _backend.requested_backend(None) in (None, "cpu") and _backend.unavailable_cpu() is None)


def _no_forward_mode(args) -> None:
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is on: an error if this call would
    need a forward derivative. The ops have none, and without this check torch.func.jvp returned zero
    tangents and forward_ad none, silently."""
    if torch._C._are_functorch_transforms_active() or any(
            isinstance(a, Tensor) and _forward_ad.unpack_dual(a).tangent is not None for a in args):
        raise NotImplementedError(
            "bignlp_fast ops have no forward-mode derivative (torch.func.jvp, jacfwd, hessian, "
            "torch.autograd.forward_ad): use the torch.nn module or torch function they replace there; "
            "reverse mode (backward, torch.autograd.grad) works")


def dispatcher_needed(args) -> bool:
    """Whether a call with these arguments cannot simply run the op's body: under torch.compile or
    torch.jit tracing (they must see the op), a TorchDispatchMode or TorchFunctionMode (FakeTensor,
    FlopCounter...), functorch transforms, the profiler (its record of the op), a tensor subclass, or
    when autograd has to record the call (grad mode on and an input that requires grad)."""
    return _route(args) != 0


def dispatcher_needed_in(tensors, grad: bool) -> bool:
    return any(isinstance(t, Tensor) and (type(t) not in PLAIN_TENSORS or (grad and t.requires_grad)) for t in tensors)


def body(op) -> Callable:
    """The function a custom op made by :func:`custom_op` runs (its implementation, backend-dispatching),
    for callers that have made :func:`dispatcher_needed`'s checks once for many calls."""
    return _BODIES[op]


def call(op, *args):
    """``op(*args)`` by the cheapest route that keeps its semantics (see the top of this section)."""
    fn = _BODIES.get(op)
    if fn is None:
        return op(*args)
    route = _route(args)
    if route == 0:
        return fn(*args)
    eager = _EAGER.get(op) if route == 1 else None
    if eager is None:
        if not torch._C._are_functorch_transforms_active():
            return op(*args)
        try:
            return op(*args)
        except RuntimeError as e:  # torch.func.grad / jacrev / jvp: say whose limit it is, and what works
            if "setup_context" not in str(e):
                raise
            raise RuntimeError(f"bignlp_fast: {op._name} has its own backward, and torch's custom ops with one "
                               "do not support torch.func's grad, jacrev or jvp (vmap and functional_call work); "
                               "use torch.autograd.grad, or the torch.nn module this one replaces") from e
    function, n, defaults = eager
    return function.apply(*args, *defaults[len(args):n])


def no_zero_grads(ctx, outputs: Sequence[Tensor], used: int) -> None:
    """In a custom op's ``setup_context``: no zero gradients for its internal outputs.

    Autograd hands a backward a zero tensor for every output that received no gradient, and an op's
    outputs past the first ``used`` are internal (a workspace, a saved pre-activation, a gradient kept
    for the backward): filling those with zeros is a memset of a tensor nothing reads, on every
    backward (distillation_loss over 4096 x 8000 logits: 150 ms of a 975 ms step, on the 2-core CPU).
    This turns the filling off; the backward calls :func:`grads_or_zeros` for the first ``used``."""
    ctx.set_materialize_grads(False)
    ctx.grad_meta = [(o.shape, o.dtype, o.device) for o in outputs[:used]]


def grads_or_zeros(ctx, *grads: Optional[Tensor]) -> list[Tensor]:
    """The gradients of an op's first outputs (see :func:`no_zero_grads`), zeros where one got none."""
    return [g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
            for g, (shape, dtype, device) in zip(grads, ctx.grad_meta)]


def kernel(op: str, pass_: str, backend: str) -> Callable:
    """The function that runs pass ``fwd``/``bwd`` of ``op`` on ``backend``."""
    name = f"{op}_{pass_}_{backend}"
    if backend in ("cpu", "cuda"):
        return getattr(_backend.compiled(), name)
    module = "bignlp_fast.kernels" if backend == "triton" else "bignlp_fast.ops"
    fn = getattr(importlib.import_module(f"{module}.{op}"), name)
    return on_tensors_device(fn) if backend == "triton" else fn


def on_tensors_device(fn: Callable) -> Callable:
    """``fn`` run with its first CUDA tensor's device as torch's current device. Triton launches on
    the current device (and its stream), not on the arguments' (the CUDA ops guard theirs with a
    CUDAGuard): tensors on cuda:1 while cuda:0 is current would be read from the wrong GPU."""
    def run(*args):
        device = next((a.device for a in args if getattr(a, "device", None) is not None and a.device.type == "cuda"),
                      None)
        if device is None or device.index == torch.cuda.current_device():
            return fn(*args)
        with torch.cuda.device(device):
            return fn(*args)

    return run


def contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def seq_channels_last(t: Tensor) -> bool:
    """A [B, C, L] tensor laid out [B, L, C] (and not also contiguous), as a sequence model's [B, L, C]
    activation transposed for a convolution over L is: the CPU's depthwise conv1d and causal_conv1d
    kernels read it as it is (csrc/cpu/common.h's seq_channels_last is the same test)."""
    return t.dim() == 3 and not t.is_contiguous() and t.transpose(1, 2).is_contiguous()


def fresh_like(t: Tensor) -> Tensor:
    """A new contiguous tensor of ``t``'s shape, dtype and device: in a fake (meta) function, what the
    kernels return for an input they made contiguous first. (torch.empty_like would keep a
    non-contiguous input's strides, and torch.compile's code checks the real output against them.)"""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are kept in: float32 for 16-bit and 32-bit inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


# Whether autocast is on for any device type: one call (~0.2 us) that spares the common case the
# per-device questions (~1 us, and ~0.5 us more for a torch.device's .type). Not while torch.compile
# traces, which knows torch.is_autocast_enabled but not this private function.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_off() -> bool:
    """Whether autocast is off for every device type, known in ~0.2 us (False where it cannot be known
    so cheaply: then ask per device type)."""
    return _any_autocast is not None and not torch.compiler.is_compiling() and not _any_autocast()


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for a device type autocast does not know (meta),
    where torch's own function raises."""
    if autocast_off():
        return False
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_lower(device: torch.device, *tensors):
    """``tensors`` as torch's autocast casts the arguments of its convolutions and of
    scaled_dot_product_attention (the "lower_precision_fp" policy): while autocast is on for
    ``device``'s type, every floating tensor other than float64 in autocast's dtype; anything else
    (None, integers, float64, autocast off) as it is.

    The ops that stand for those torch functions call this first. Autocast cannot do it for them:
    their custom ops are on none of its lists, and call()'s eager route passes by the dispatcher."""
    if autocast_off() or not autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def autocast_promote(device: torch.device, x: Tensor, residual: Optional[Tensor], *params):
    """The arguments of a fused elementwise op (add_layer_norm, bias_gelu) in one dtype while autocast
    is on for ``device``'s type, as the eager code it fuses would have them there: x and the residual
    promoted as ``x + residual`` is (a bf16 GEMM output and an fp32 residual stream give fp32), the
    parameters (weight, bias) cast to that dtype, as autocast's F.linear casts its bias and
    nn.LayerNorm its weight. Without autocast, everything as it is (mixed dtypes stay an error)."""
    if autocast_off() or not autocast_enabled(device.type):
        return (x, residual, *params)
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in (x, residual, *params))


def as_rows(t: Tensor) -> Tensor:
    """``t`` [..., width] as [rows, width]: ``t`` itself when it is 2-D already (a view costs ~2 us a
    call on a slow core, a view to a torch.Size ~5 us: small calls notice)."""
    dims = t.dim()
    return t if dims == 2 else t.flatten(0, -2) if dims > 2 else t.unsqueeze(0)


def rows_back(y: Tensor, x: Tensor) -> Tensor:
    """``y`` [rows, width'] of :func:`as_rows` (x) back in x's leading dimensions."""
    if x.dim() == 2:
        return y
    return y.view_as(x) if y.shape[1] == x.shape[-1] else y.view(*x.shape[:-1], y.shape[1])


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ("," if t.dim() == 1 else "") + ")"


def check_tensor(op: str, name: str, t, *, min_dim: int = 0, floating: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dimension(s), got shape {_shape(t)}")


def check_like(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor, *, same_shape: bool = True) -> None:
    """``t`` must be on ``ref``'s device, with its dtype, and (if same_shape) its shape."""
    check_tensor(op, name, t)
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if same_shape and t.shape != ref.shape:
        raise ValueError(f"{op}: {name} has shape {_shape(t)} but {ref_name} has {_shape(ref)}")


def check_vector(op: str, name: str, t: Optional[Tensor], size: int, ref_name: str, ref: Tensor) -> None:
    """``t`` (if given) must be a 1-D tensor of ``size`` elements like ``ref``: the last dim's weights."""
    if t is None:
        return
    # the common case in ~0.4 us (the checks below: ~0.7): a plain tensor of ref's dtype, on its device
    if (type(t) in PLAIN_TENSORS and t.dtype == ref.dtype and t.dim() == 1 and t.shape[0] == size
            and ((t.is_cpu and ref.is_cpu) or t.device == ref.device)):
        return
    check_like(op, name, t, ref_name, ref, same_shape=False)
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(f"{op}: {name} must be a vector of {ref_name}'s last dimension, shape ({size},); got "
                         f"{_shape(t)}")


def real_number(value) -> Optional[float]:
    """``value`` as a float where torch's functions take it as a real number (a Python int or float,
    a numpy scalar, a 0-d tensor); None for anything else."""
    if type(value) in (int, float):  # the common case, before the ABC's slower check
        return float(value)
    if isinstance(value, numbers.Real) or (isinstance(value, Tensor) and value.dim() == 0
                                           and not value.is_complex()):
        return float(value)
    return None


def integer(value) -> Optional[int]:
    """``value`` as an int where torch's functions take it as one (a Python int, a numpy integer, a 0-d
    integer tensor: anything with ``__index__``); None for anything else, floats included."""
    if type(value) is int:
        return value
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_choice(op: str, name: str, value, choices: Sequence) -> None:
    if not isinstance(value, (str, int, float, bool, type(None))) or value not in choices:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def version_counter(t: Tensor) -> int:
    """``t._version`` (moved by every in-place change autograd sees), or -1 for an inference tensor,
    which has none (reading it raises): a cache keyed on it then tells such tensors apart only by
    identity and data pointer."""
    return -1 if t.is_inference() else t._version


def values_readable(*tensors) -> bool:
    """Whether an argument check may read tensor values (.item(), .tolist(), a branch on a comparison):
    not while torch.compile traces (data a graph cannot branch on), nor of meta tensors (no data), nor
    of tensors torch.func.vmap maps over (one value per example). Checks skipped here are checks only:
    the kernels never read out of bounds on unchecked values."""
    return not torch.compiler.is_compiling() and not any(
        t is not None and (t.is_meta or torch._C._functorch.is_batchedtensor(t)) for t in tensors)


def check_lengths(op: str, lengths: Optional[Tensor], batch: int, steps: int) -> None:
    """Per-sequence lengths of a recurrent op: None, or int64 [batch] on the CPU with values in [0, steps]."""
    if lengths is None:
        return
    if not isinstance(lengths, Tensor) or lengths.dtype != torch.int64 or lengths.shape != (batch,) \
            or lengths.device.type != "cpu":
        got = f"{lengths.dtype} {tuple(lengths.shape)} on {lengths.device}" if isinstance(lengths, Tensor) \
            else type(lengths).__name__
        raise ValueError(f"{op}: lengths must be an int64 CPU tensor of shape ({batch},), got {got}")
    # under torch.compile the values are data a graph cannot branch on; unchecked, an out-of-range
    # length still cannot make a kernel read out of bounds (step t is active when t < lengths[b])
    if batch and values_readable(lengths) and (lengths.min().item() < 0 or lengths.max().item() > steps):
        raise ValueError(f"{op}: lengths must lie in [0, {steps}], got {lengths.tolist()}")


def check_time_major(op: str, xw, layout: str = "G*H") -> tuple[int, int, int]:
    """The input projection of a recurrent op, xw [T, B, layout] with T >= 1: returns (T, B, last dim)."""
    check_tensor(op, "xw", xw)
    if xw.dim() != 3:
        raise ValueError(f"{op}: xw must be [T, B, {layout}], got shape {tuple(xw.shape)}")
    if xw.shape[0] == 0:
        raise ValueError(f"{op}: xw has no time steps (shape {tuple(xw.shape)}); sequences need at least one")
    return tuple(xw.shape)


def check_operands(op: str, xw: Tensor, operands) -> None:
    """Each (name, tensor or None, expected shape) that is given has that shape and xw's dtype and device."""
    for name, tensor, shape in operands:
        if tensor is None:
            continue
        check_tensor(op, name, tensor)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(tensor.shape)}")
        if tensor.dtype != xw.dtype or tensor.device != xw.device:
            raise TypeError(f"{op}: {name} is {tensor.dtype} on {tensor.device}; xw is {xw.dtype} on {xw.device}")
