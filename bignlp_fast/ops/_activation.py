"""The activations a fused epilogue can apply (conv1d / conv2d, causal_conv1d, text_cnn_pool), their
derivatives written out, and the integer codes the kernels take.

Every backend computes the same functions: relu, gelu (erf form, as torch.nn.functional.gelu),
silu (x * sigmoid(x)), tanh; None is the identity.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# The code each kernel receives (csrc/cpu/activation.h, csrc/cuda/activation.cuh, kernels/_activation.py).
ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "silu": 3, "tanh": 4}


def check_activation(op: str, activation: Optional[str]) -> int:
    """The kernel code of ``activation``, or a ValueError naming the choices."""
    if not isinstance(activation, (str, type(None))) or activation not in ACTIVATIONS:
        choices = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"{op}: activation must be one of {choices}, got {activation!r}")
    return ACTIVATIONS[activation]


def activation_torch(v: Tensor, code: int) -> Tensor:
    if code == 1:
        return torch.relu(v)
    if code == 2:
        return F.gelu(v)
    if code == 3:
        return F.silu(v)
    if code == 4:
        return torch.tanh(v)
    return v


def activation_grad_torch(v: Tensor, code: int) -> Tensor:
    """d act(v) / dv, elementwise (relu' is 0 at 0, as torch's)."""
    if code == 1:
        return (v > 0).to(v.dtype)
    if code == 2:
        return 0.5 * (1 + torch.erf(v / math.sqrt(2.0))) + v * torch.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)
    if code == 3:
        s = torch.sigmoid(v)
        return s * (1 + v * (1 - s))
    if code == 4:
        t = torch.tanh(v)
        return 1 - t * t
    return torch.ones_like(v)
