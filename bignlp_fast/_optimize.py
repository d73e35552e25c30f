"""``bignlp_fast.optimize(model)``: switch an existing model to bignlp_fast's modules, in place.

    import bignlp_fast
    report = bignlp_fast.optimize(model)      # the same model object, now running bignlp_fast ops
    print(report)                             # what was swapped, what was left and why

What it does, module by module (``model.named_modules()``, the root included):

- ``torch.nn.MultiheadAttention, LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell, Conv1d, Conv2d,
  LayerNorm, Linear`` (exactly these types) become the :mod:`bignlp_fast.nn` module of the same name
  (``bignlp_fast.nn.Linear`` runs each product on the faster of ops.linear and F.linear for its
  input: :func:`bignlp_fast.ops.linear.linear_is_faster`).
- A Hugging Face ``PreTrainedModel`` (found only when ``transformers.modeling_utils`` is already
  imported: optimize never imports transformers) is switched to ``attn_implementation="bignlp_fast"``
  with ``set_attn_implementation`` (see :mod:`bignlp_fast.hf`), and its ``torch.nn.LayerNorm``s and
  ``torch.nn.Linear``s are swapped; its other modules are left to transformers (reported as skipped).
- transformers' BERT-family encoder stacks (``BertEncoder``, ``RobertaEncoder`` ...: exactly the types of
  ``bignlp_fast.hf.UNPADDED_ENCODERS``) become ``bignlp_fast.hf``'s subclass of each
  (:func:`bignlp_fast.hf.unpadded_encoder_class`), which runs a padded batch on its real tokens only:
  every layer's GEMMs, LayerNorms and activations on T rows instead of B * L, attention on
  varlen_attention. ``last_hidden_state`` is zero at padding, where transformers leaves values nothing
  should read (the pooler reads position 0, as before). Their masked-LM heads (``BertLMPredictionHead``,
  ``RobertaLMHead`` ...: ``bignlp_fast.hf.UNPADDED_HEADS``) become the subclass
  :func:`bignlp_fast.hf.unpadded_head_class` makes, which on that state computes the logits of the real
  tokens and of one zero state (every padding position's logits) only. ``unpad=False`` keeps the
  padded layout.
- transformers' ``Conv1D`` (the GPT-2 family's projections; exactly that type, found only when
  ``transformers.pytorch_utils`` is already imported) becomes ``bignlp_fast.hf.Conv1D``, its subclass
  whose forward is ``ops.linear.dense(x, weight.t(), bias)`` (``backend=`` does not reach it).
- Everything else is left alone. A module of a swappable family that is not swapped is reported as
  skipped, with the reason: a subclass (``subclass of torch.nn.LSTM; not swapped``: its forward may
  not be torch's), a parametrized module, an option the fused path never runs (``add_bias_kv``,
  ``add_zero_attn``), or parameters whose device and dtype no fused backend takes (float64, or float16 on
  the CPU): swapping those would only trade torch's kernel for the
  reference implementation. Modules that are already bignlp_fast modules are reported as already
  optimized, so a second call changes nothing. The children of bignlp_fast.nn modules are theirs
  (e.g. TextCNN reads its convolutions' weights directly) and are not visited.

How a module is swapped: by class reassignment, ``module.__class__ = bignlp_fast.nn.LSTM``, plus
the attributes our class adds to torch's (``backend``; ``activation=None`` for the convolutions: the
attributes ``from_torch`` would give a new module; a test checks the two agree). Our classes are
subclasses of torch's that add no parameters, buffers or submodules, so the module object and
everything it holds stay as they were: the same Parameter objects (an optimizer built before keeps
working), the same state_dict keys, the training flag, hooks, user attributes, and every reference
to the module elsewhere (a module shared by two parents is swapped once). This is also why the root
itself can be swapped in place (``optimize(torch.nn.LSTM(...))`` works), so the API needs no second
return value: ``optimize`` returns an :class:`OptimizeReport` whose ``model`` is the model it
changed (``model`` itself, or with ``inplace=False`` a deep copy, the original left untouched).

``backend`` ("cpu", "cuda", "triton", "torch" or None) is stored in every swapped module (and set on
already-optimized ones when given); the device/dtype check uses it the way the ops will (a named
backend that cannot run the module's parameters skips the module, ``"torch"`` always swaps). The
check looks at the parameters as they are now: call optimize after ``model.to(device, dtype)``.
Hugging Face attention has no backend argument: it follows ``BIGNLP_FAST_BACKEND``.

Calling conventions that still run torch's code after the swap (recorded in
:func:`bignlp_fast.report`): ``MultiheadAttention`` called with ``need_weights=True`` (torch's
default; pass ``need_weights=False``), and any op call whose tensors no fused backend takes.
``torch.nn.TransformerEncoderLayer`` in inference takes torch's fused encoder layer and never calls
its (swapped) children; the report lists each such layer as skipped, saying so.
Call optimize before ``torch.compile``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import sys
import warnings
from typing import Callable, Optional

import torch
import torch.nn.utils.parametrize

from bignlp_fast import _backend, hf
from bignlp_fast import nn as bnn
from bignlp_fast.ops.add_layer_norm import OP as _LN_OP
from bignlp_fast.ops.add_layer_norm import _triton_check as _ln_triton_check
from bignlp_fast.ops.attention import OP as _ATTENTION_OP
from bignlp_fast.ops.attention import _supports as _attention_supports
from bignlp_fast.ops.conv import OP as _CONV_OP
from bignlp_fast.ops.linear import prepack as _prepack
from bignlp_fast.ops.linear import OP as _LINEAR_OP
from bignlp_fast.ops.rnn import OP as _RNN_OP

__all__ = ["OptimizeReport", "optimize"]

tnn = torch.nn

# torch.nn type -> (bignlp_fast.nn type, the op its forward runs, constructor args of a tiny probe)
_SWAPS: dict[type, tuple[type, _backend.OpInfo, tuple]] = {
    tnn.MultiheadAttention: (bnn.MultiheadAttention, _ATTENTION_OP, (1, 1)),
    tnn.LSTM: (bnn.LSTM, _RNN_OP, (1, 1)),
    tnn.GRU: (bnn.GRU, _RNN_OP, (1, 1)),
    tnn.RNN: (bnn.RNN, _RNN_OP, (1, 1)),
    tnn.LSTMCell: (bnn.LSTMCell, _RNN_OP, (1, 1)),
    tnn.GRUCell: (bnn.GRUCell, _RNN_OP, (1, 1)),
    tnn.RNNCell: (bnn.RNNCell, _RNN_OP, (1, 1)),
    tnn.Conv1d: (bnn.Conv1d, _CONV_OP, (1, 1, 1)),
    tnn.Conv2d: (bnn.Conv2d, _CONV_OP, (1, 1, 1)),
    tnn.LayerNorm: (bnn.LayerNorm, _LN_OP, (1,)),
    tnn.Linear: (bnn.Linear, _LINEAR_OP, (1, 1)),
}
_IN_HF = (tnn.LayerNorm, tnn.Linear)  # what optimize swaps inside a transformers model
_OURS = tuple(new for new, _, _ in _SWAPS.values())
_HF_NAME = "bignlp_fast"


# ---- the report -------------------------------------------------------------------------------
@dataclasses.dataclass
class OptimizeReport:
    """What :func:`optimize` did. ``swapped``: (qualified name, from type, to type); ``skipped``:
    (qualified name, type, reason). Names are those of ``model.named_modules()`` ("" is the root).
    ``model`` is the optimized model (the argument itself unless ``inplace=False``)."""

    swapped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    model: Optional[torch.nn.Module] = dataclasses.field(default=None, repr=False, compare=False)
    prepacked: int = 0  # weights marked for packing once (optimize(..., prepack=True))

    def summary(self) -> str:
        """One line: counts by type, e.g. ``swapped 3 (2 LayerNorm, 1 LSTM), skipped 1``."""
        counts: dict[str, int] = {}
        for _, _, to in self.swapped:  # "bignlp_fast.nn.LSTM" -> LSTM; "BertModel(attn_...)" -> BertModel attention
            short = to.split("(")[0].rsplit(".", 1)[-1] + (" attention" if "(" in to else "")
            counts[short] = counts.get(short, 0) + 1
        detail = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
        already = sum(reason.startswith("already optimized") for _, _, reason in self.skipped)
        line = f"bignlp_fast.optimize: swapped {len(self.swapped)}" + (f" ({detail})" if detail else "")
        line += f", skipped {len(self.skipped)}"
        if already:
            line += f" ({already} already optimized)"
        if self.prepacked:
            line += f"; {self.prepacked} weights marked for prepacking"
        return line

    def __str__(self) -> str:
        lines = [self.summary()]
        for title, header, rows in (("swapped", ("module", "from", "to"), self.swapped),
                                    ("skipped", ("module", "type", "reason"), self.skipped)):
            if not rows:
                continue
            rows = [(name or "(root)", a, b) for name, a, b in rows]
            w0 = max(len(header[0]), *(len(r[0]) for r in rows))
            w1 = max(len(header[1]), *(len(r[1]) for r in rows))
            lines += ["", f"{title}:", f"  {header[0]:<{w0}}  {header[1]:<{w1}}  {header[2]}"]
            lines += [f"  {n:<{w0}}  {a:<{w1}}  {b}" for n, a, b in rows]
        return "\n".join(lines)


# ---- helpers ----------------------------------------------------------------------------------
# torch.nn.TransformerEncoderLayer's forward, in eval mode with grad disabled (and batch_first, an even
# head count, no hooks, ...), runs torch's fused encoder-layer kernel on its children's weights
# instead of calling them: the swapped modules below it run only in training or with grad enabled.
# Said in the report (a swap that never runs is a slow path no one would see); not overridden, as
# the only switch is torch's process-wide one.
_ENCODER_FAST_PATH = ("the modules below are swapped, but in inference (eval mode, grad disabled) torch runs its own "
                      "fused encoder layer on their weights instead of calling them; "
                      "torch.backends.mha.set_fastpath_enabled(False) turns that off for the whole process")

def _type_name(cls: type) -> str:
    if cls in _SWAPS:
        return f"torch.nn.{cls.__name__}"
    if cls in _OURS:
        return f"bignlp_fast.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.lru_cache(maxsize=None)
def _added_attributes(torch_type: type) -> tuple[tuple[str, object], ...]:
    """The instance attributes our class's ``from_torch`` gives a module beyond torch's own (with
    their values), found once on a tiny meta-device probe: what class reassignment must add."""
    ours, _, args = _SWAPS[torch_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = torch_type(*args, device="meta")
        new = ours.from_torch(probe)
    base = vars(probe)
    return tuple((k, v) for k, v in vars(new).items() if k not in base)


def _hf_pretrained_class() -> Optional[type]:
    """transformers.PreTrainedModel if transformers' modeling code is already imported, else None
    (an instance of it cannot exist otherwise; looking it up through ``transformers`` itself could
    trigger the lazy import of its modeling code)."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    return getattr(modeling_utils, "PreTrainedModel", None)


def _under(name: str, prefix: str) -> bool:
    """Whether module ``name`` lies strictly inside module ``prefix``."""
    return name != prefix and (prefix == "" or name.startswith(prefix + "."))


def _no_fused_backend(op: _backend.OpInfo, device: torch.device, dtype: torch.dtype, backend: Optional[str],
                      extra: Optional[Callable[[str], Optional[str]]] = None) -> Optional[str]:
    """Why no fused backend would run ``op`` on such tensors (None when one would), as
    _backend.choose decides at call time (through _backend.plan, which records nothing)."""
    if _backend.requested_backend(backend) == "torch":
        return None  # asked for the reference: the user's choice
    name, named, reasons = _backend.plan(op, device, dtype, backend, extra)
    if name is not None:
        return None
    if named:
        return f"backend {reasons[0][0]!r} cannot run it: {reasons[0][1]}"
    detail = "; ".join(f"{n}: {r}" for n, r in reasons) if reasons else f"no fused backend for {device.type} tensors"
    return (f"no fused kernel for its {_backend.dtype_name(dtype)} parameters on {device.type} ({detail}); "
            "it would run the torch reference")


def _unsupported(module: torch.nn.Module, op: _backend.OpInfo, backend: Optional[str]) -> Optional[str]:
    """Why our version of ``module`` (an exact torch.nn type) would not run its fused path, or None."""
    if isinstance(module, tnn.MultiheadAttention):
        if module.bias_k is not None:
            return "add_bias_kv=True: the fused path does not support it (it would always run torch's)"
        if module.add_zero_attn:
            return "add_zero_attn=True: the fused path does not support it (it would always run torch's)"
    params = list(module.parameters())
    if not params:
        return None  # e.g. LayerNorm(elementwise_affine=False): chosen per call from the input
    devices, dtypes = {p.device for p in params}, {p.dtype for p in params}
    if len(devices) > 1 or len(dtypes) > 1:
        return (f"its parameters are on several devices or dtypes ({', '.join(sorted(map(str, devices)))}; "
                f"{', '.join(sorted(_backend.dtype_name(d) for d in dtypes))})")
    device, dtype = devices.pop(), dtypes.pop()
    extra = None
    if isinstance(module, tnn.MultiheadAttention):
        extra = _attention_supports(module.head_dim, module.head_dim, False)
    elif isinstance(module, tnn.LayerNorm):
        extra = _ln_triton_check(math.prod(module.normalized_shape), dtype)
    return _no_fused_backend(op, device, dtype, backend, extra)


def _swap(module: torch.nn.Module, backend: Optional[str]) -> type:
    """Turn ``module`` (an exact torch.nn type of _SWAPS) into our class, in place. Returns the class."""
    torch_type = type(module)
    ours = _SWAPS[torch_type][0]
    module.__class__ = ours
    for name, value in _added_attributes(torch_type):
        setattr(module, name, copy.deepcopy(value))
    module.backend = backend
    return ours


# ---- Hugging Face -----------------------------------------------------------------------------
def _swap_hf_conv1d(name: str, module: torch.nn.Module, hf_conv1d: type, backend: Optional[str],
                    report: OptimizeReport) -> None:
    """transformers' Conv1D (GPT-2's projections) -> bignlp_fast.hf's subclass on ops.linear.dense."""
    ours = hf.fast_conv1d_class(hf_conv1d)
    if type(module) is ours:
        report.skipped.append((name, "bignlp_fast.hf.Conv1D", "already optimized"))
        return
    p = module.weight
    reason = _no_fused_backend(_LINEAR_OP, p.device, p.dtype, backend)
    if reason is not None:
        report.skipped.append((name, "transformers.pytorch_utils.Conv1D", reason))
        return
    module.__class__ = ours
    report.swapped.append((name, "transformers.pytorch_utils.Conv1D", "bignlp_fast.hf.Conv1D"))


def _swap_hf_unpadded(name: str, module: torch.nn.Module, owner, unpad: bool, report: OptimizeReport) -> None:
    """A BERT-family encoder stack of transformers (hf.UNPADDED_ENCODERS) -> hf.unpadded_encoder_class's
    subclass, which runs padded batches on their real tokens, where the model's attention is ours; its
    masked-LM head (hf.UNPADDED_HEADS) -> hf.unpadded_head_class's, which then computes the logits of
    the real tokens only. ``owner``: the transformers model the module is in."""
    cls = type(module)
    head = cls.__name__ in hf.UNPADDED_HEADS
    if cls.__module__ == hf.__name__:
        report.skipped.append((name, _type_name(cls), "already optimized"))
    elif not unpad:
        report.skipped.append((name, _type_name(cls), "optimize(unpad=False): padded batches run padded"))
    elif hf.attention_implementation(owner if head else module) != _HF_NAME:
        report.skipped.append((name, _type_name(cls), "its model's attention is not bignlp_fast's, which the "
                                                      "unpadded layers need"))
    elif head:
        module.__class__ = ours = hf.unpadded_head_class(cls)
        report.swapped.append((name, _type_name(cls), f"{_type_name(ours)} (logits of the real tokens only, "
                                                      "after the unpadded encoder)"))
    else:
        module.__class__ = ours = hf.unpadded_encoder_class(cls)
        report.swapped.append((name, _type_name(cls), f"{_type_name(ours)} (padded batches run unpadded)"))


def _switch_hf(name: str, model, pretrained: type, report: OptimizeReport) -> bool:
    """attn_implementation="bignlp_fast" for a transformers PreTrainedModel and its sub-models.
    Returns whether it switched."""
    from bignlp_fast import hf

    cls_name = type(model).__name__
    before = model.config._attn_implementation
    if before == _HF_NAME:
        report.skipped.append((name, cls_name, f"already optimized (attn_implementation={_HF_NAME!r})"))
        return False
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        report.skipped.append((name, cls_name, "its attention does not go through transformers' AttentionInterface; "
                                               f"left at attn_implementation={before!r}"))
        return False
    if not hf.is_registered():
        hf.register()
    try:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(_HF_NAME)
        elif getattr(model, "_supports_attention_backend", False):  # older transformers
            model.config._attn_implementation = _HF_NAME
    except (ValueError, ImportError) as e:
        report.skipped.append((name, cls_name, f"transformers refused attn_implementation={_HF_NAME!r}: {e}"))
        return False
    if model.config._attn_implementation != _HF_NAME:
        report.skipped.append((name, cls_name, f"transformers kept attn_implementation={before!r} (the model does "
                                               "not support the AttentionInterface)"))
        return False
    report.swapped.append((name, f"{cls_name}(attn_implementation={before!r})",
                           f"{cls_name}(attn_implementation={_HF_NAME!r})"))
    for sub_name, sub in model.named_modules():
        if sub is not model and isinstance(sub, pretrained) and sub.config._attn_implementation != _HF_NAME:
            full = f"{name}.{sub_name}" if name else sub_name
            report.skipped.append((full, type(sub).__name__, "transformers did not switch this sub-model's attention; "
                                                             f"it stays {sub.config._attn_implementation!r}"))
    return True


# ---- the entry point --------------------------------------------------------------------------
def optimize(model: torch.nn.Module, *, backend: Optional[str] = None, inplace: bool = True,
             prepack: bool = False, unpad: bool = True) -> OptimizeReport:
    """Swap ``model``'s torch.nn attention, recurrent, convolution, LayerNorm and Linear modules for
    bignlp_fast's, and switch Hugging Face models to ``attn_implementation="bignlp_fast"``.

    Args:
        model: any torch.nn.Module; the root itself may be a swappable module (e.g. a torch.nn.LSTM).
        backend: stored as the ``backend`` of every swapped module ("cpu", "cuda", "triton", "torch",
            or None to choose per call); it also decides which modules can run fused (see the module
            docstring). An unknown name raises ValueError.
        inplace: True (default) changes ``model`` itself; False optimizes a deep copy and leaves
            ``model`` untouched.
        prepack: also mark the model's 2-D weights for :func:`bignlp_fast.ops.prepack`: for
            inference, their products outside autograd run on copies packed once (a second copy of
            each weight in memory), not on copies packed at every call.
        unpad: run the padded batches of transformers' BERT-family encoders (BERT, RoBERTa, XLM-R,
            CamemBERT, ELECTRA, ERNIE, Data2VecText, XLM-R XL, RoBERTa-PreLayerNorm, ALBERT, DistilBERT),
            and their masked-LM heads, on their
            real tokens only (see the module docstring); the encoders' outputs at padding are then
            zeros. False keeps the padded layout.

    Returns:
        An :class:`OptimizeReport`: ``swapped`` and ``skipped`` (with reasons), ``str(report)`` a
        table, ``report.summary()`` one line, ``report.model`` the optimized model (``model`` itself
        unless ``inplace=False``), ``report.prepacked`` the number of weights ``prepack`` marked.

    Modules are swapped by class reassignment: the module objects, their Parameter objects, state_dict
    keys, training flags and hooks all stay as they were, so an optimizer built before keeps working
    and the root can be swapped too. Parameters are never copied, converted or moved.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    _backend.requested_backend(backend)  # an unknown name fails here, not at the first forward
    if not inplace:
        model = copy.deepcopy(model)
    report = OptimizeReport(model=model)
    pretrained = _hf_pretrained_class()
    closed: list[str] = []  # modules whose children are theirs: not visited
    hf_models: list[str] = []  # transformers models: only their LayerNorms, Linears and Conv1Ds are swapped
    hf_conv1d = hf.hf_conv1d_class()
    hf_conv1d_types = (hf_conv1d, hf.fast_conv1d_class(hf_conv1d)) if hf_conv1d is not None else ()
    for name, module in model.named_modules():
        if any(_under(name, p) for p in closed):
            continue
        cls = type(module)
        owner = next((p for p in hf_models if _under(name, p)), None)
        if pretrained is not None and isinstance(module, pretrained) and owner is None:
            hf_models.append(name)
            if _switch_hf(name, module, pretrained, report) and backend is not None:
                warnings.warn("optimize: backend= does not reach Hugging Face attention (transformers passes no "
                              "backend); set BIGNLP_FAST_BACKEND to pin it", stacklevel=2)
            continue
        if isinstance(module, torch.nn.TransformerEncoderLayer) and owner is None:
            report.skipped.append((name, _type_name(cls), _ENCODER_FAST_PATH))
        if cls.__module__.startswith("bignlp_fast.nn"):
            closed.append(name)
        if cls in hf_conv1d_types:
            _swap_hf_conv1d(name, module, hf_conv1d, backend, report)
        elif owner is not None and cls.__module__ in (hf.UNPADDED_ENCODERS.get(cls.__name__),
                                                      hf.UNPADDED_HEADS.get(cls.__name__), hf.__name__):
            _swap_hf_unpadded(name, module, model.get_submodule(owner), unpad, report)
        elif cls in _SWAPS:
            closed.append(name)
            if owner is not None and cls not in _IN_HF:
                report.skipped.append((name, _type_name(cls), f"inside the Hugging Face model {owner or '(root)'}: "
                                       "optimize switches its attention implementation and swaps only its LayerNorms "
                                       "and Linears"))
                continue
            reason = _unsupported(module, _SWAPS[cls][1], backend)
            if reason is not None:
                report.skipped.append((name, _type_name(cls), reason))
                continue
            ours = _swap(module, backend)
            report.swapped.append((name, _type_name(cls), _type_name(ours)))
        elif isinstance(module, _OURS):
            closed.append(name)
            reason = "already optimized"
            if backend is not None and getattr(module, "backend", None) != backend:
                module.backend = backend
                reason += f"; backend set to {backend!r}"
            report.skipped.append((name, _type_name(cls), reason))
        elif isinstance(module, tuple(_SWAPS)):
            closed.append(name)
            base = next(t for t in _SWAPS if isinstance(module, t))
            if torch.nn.utils.parametrize.is_parametrized(module):
                reason = f"parametrized (torch.nn.utils.parametrize) torch.nn.{base.__name__}; not swapped"
            else:
                reason = f"subclass of torch.nn.{base.__name__}; not swapped"
            report.skipped.append((name, _type_name(cls), reason))
    if prepack:
        report.prepacked = _prepack(model)
    return report
