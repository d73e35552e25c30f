"""GELU: a drop-in for torch.nn.GELU that runs bignlp_fast.ops.bias_gelu (with no bias)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bignlp_fast.ops.bias_gelu import bias_gelu


class GELU(torch.nn.GELU):
    """torch.nn.GELU(approximate="none"|"tanh"); ``backend`` (keyword only) pins a backend."""

    def __init__(self, approximate: str = "none", *, backend: Optional[str] = None):
        super().__init__(approximate)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:  # (torch.nn's argument name: callers may pass it by name)
        x = input
        if x.dim() == 0:  # a scalar, as torch.nn.GELU takes it (bias_gelu's rows need a last dimension)
            return bias_gelu(x.reshape(1), None, self.approximate, backend=self.backend).reshape(())
        return bias_gelu(x, None, self.approximate, backend=self.backend)
