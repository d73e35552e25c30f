"""Linear: a drop-in for torch.nn.Linear whose GEMM is the faster of bignlp_fast.ops.linear and
F.linear for the input at hand (bignlp_fast.ops.linear.linear_is_faster)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bignlp_fast.ops.linear import dense, linear


class Linear(torch.nn.Linear):
    """torch.nn.Linear with the same constructor, parameters and state_dict keys.

    ``forward`` runs ``bignlp_fast.ops.linear`` (the project's packed GEMM, or its streaming kernels
    for decoding-sized inputs) where ``bignlp_fast.ops.linear.linear_is_faster`` says that is the
    faster GEMM on this machine for the input at hand: decoding-sized inputs with a large enough
    weight; float32 products of enough multiply-adds unless torch's sgemm is the faster one
    (``_backend.blas_sgemm_is_fast()``: MKL on an Intel CPU, or any CPU but Zen 1 / Zen 2 in a build
    without AVX-512); bfloat16 products where torch's bf16 GEMM has no vector kernels (no AVX-512).
    Elsewhere (GPUs, autocast, small products) it is F.linear, as in torch; ``bignlp-fast info``
    says which GEMM this machine takes. ``backend`` (keyword only) pins ops.linear's backend ("cpu" or
    "torch") for every call instead.
    """

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:  # (torch.nn's argument name: callers may pass it by name)
        if self.backend is not None:
            return linear(input, self.weight, self.bias, backend=self.backend)
        return dense(input, self.weight, self.bias)

    @classmethod
    def from_torch(cls, module: torch.nn.Linear, *, backend: Optional[str] = None) -> "Linear":
        """A Linear sharing ``module``'s parameters (the same Parameter objects)."""
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta",
                  backend=backend)
        new.weight = module.weight
        new.bias = module.bias
        return new.train(module.training)
