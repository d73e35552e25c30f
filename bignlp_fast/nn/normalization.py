"""LayerNorm: a drop-in for torch.nn.LayerNorm that runs bignlp_fast.ops.add_layer_norm (or, for a
small CPU input without a residual, torch's own layer_norm: see TORCH_BELOW_NUMEL)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bignlp_fast.ops.add_layer_norm import add_layer_norm

# A CPU input of fewer elements, without a residual and without a backend named, is normalised by torch's
# own F.layer_norm (what torch.nn.LayerNorm runs): its one C++ call costs less than our op's choice and
# checks, which is most of such a call. A 2-core Xeon, H = 768, nn.LayerNorm forward, in-process medians
# of 15: ours 0.62-0.64x torch's at 1 row (5.5-9.8 us against 3.5-6.0), 0.74-0.80x at 2-64 rows,
# 0.92-0.96x at 128, 1.00-1.13x at 256 and 1.12-1.20x at 1024-4096. A residual keeps the fused op (one
# pass where torch makes two).
TORCH_BELOW_NUMEL = 1 << 17


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm with the same constructor, parameters and state_dict keys.

    A multi-dimensional ``normalized_shape`` is normalised as one flattened last dimension, exactly
    as torch does. ``backend`` (keyword only) pins a backend; None chooses automatically.
    ``forward(x, residual)`` also accepts a residual and then returns ``(LN(x + residual), x + residual)``.

    Dtypes as torch: parameters of another dtype than the input (bf16 activations, fp32 weights, as
    under CPU autocast) are cast to the input's dtype for the call, and the output has the input's
    dtype; under CUDA autocast the input is normalised in float32 (CUDA autocast's policy for layer_norm).
    A residual of another dtype than x is added as eager ``x + residual`` would: both in the promoted
    dtype (a bf16 GEMM output and an fp32 residual stream under CPU autocast give fp32).
    """

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, input: Tensor, residual: Optional[Tensor] = None):  # (input: torch.nn's name)
        # (every line here runs at each call: GPT-2 decoding makes 25 of them a token, and on the CPU a
        # microsecond of Python before a product read from memory costs it several; see ops.linear)
        x = input
        shape = self.normalized_shape
        k = len(shape)
        if (x.shape[-1] != shape[0] if k == 1 and x.dim() else tuple(x.shape[x.dim() - k:]) != tuple(shape)):
            raise ValueError(f"LayerNorm: input's last {k} dimension(s) {tuple(x.shape[x.dim() - k:])} do not "
                             f"match normalized_shape {tuple(shape)}")
        if residual is None and self.backend is None and x.is_cpu:
            n = x.numel()  # (symbolic under torch.compile's dynamic shapes: no rule by size there)
            if n < TORCH_BELOW_NUMEL and not isinstance(n, torch.SymInt):
                return F.layer_norm(x, shape, self.weight, self.bias, self.eps)
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            x = x.float()
            residual = residual.float() if residual is not None else None
        if residual is not None and residual.dtype != x.dtype:  # as eager x + residual: the promoted dtype
            dtype = torch.promote_types(x.dtype, residual.dtype)  # (bf16 x, fp32 residual under CPU autocast)
            x, residual = x.to(dtype), residual.to(dtype)
        x2, r2 = x, residual  # one normalized dimension: as they are (views cost microseconds a call)
        if k > 1:
            lead = x.shape[:x.dim() - k]
            n = math.prod(shape)  # not -1: an empty batch has no size to infer it from
            x2 = x.reshape(*lead, n)
            r2 = residual.reshape(*lead, n) if residual is not None else None
        out, total = add_layer_norm(x2, r2, _vector(self.weight, x.dtype), _vector(self.bias, x.dtype), self.eps,
                                    backend=self.backend)
        if k > 1:
            out, total = out.view(x.shape), (total.view(x.shape) if residual is not None else None)
        return out if residual is None else (out, total)

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm) -> "LayerNorm":
        """A bignlp_fast LayerNorm sharing ``module``'s parameters."""
        new = cls(module.normalized_shape, module.eps, module.elementwise_affine, bias=module.bias is not None,
                  device="meta")
        new.weight, new.bias = module.weight, module.bias
        return new.train(module.training)


def _vector(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A parameter as add_layer_norm takes it: a vector in x's dtype (.to and .reshape cost ~2 us a call)."""
    if t is None:
        return None
    t = t if t.dim() == 1 else t.reshape(-1)
    return t if t.dtype == dtype else t.to(dtype)
