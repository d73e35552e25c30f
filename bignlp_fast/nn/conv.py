"""Conv1d, Conv2d (drop-ins for torch.nn's, with an optional fused activation and residual), and the
TextCNN block (multi-width convolution + activation + max over time in one op)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from bignlp_fast.ops._activation import check_activation
from bignlp_fast.ops.conv import conv1d, conv2d
from bignlp_fast.ops.text_cnn_pool import text_cnn_pool


class _FusedConv:
    """What Conv1d and Conv2d share: the extra constructor arguments and the padding modes."""

    def _init_fused(self, activation: Optional[str], backend: Optional[str]) -> None:
        check_activation(type(self).__name__, activation)
        self.activation, self.backend = activation, backend

    def _run(self, fn, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":  # reflect / replicate / circular: pad first, as torch does
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return fn(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups, self.activation,
                  residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")

    @classmethod
    def from_torch(cls, module, activation: Optional[str] = None):
        """A module of this class sharing ``module``'s parameters (e.g. from torch.nn.Conv1d)."""
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, module.padding_mode, device="meta",
                  activation=activation)
        new.weight, new.bias = module.weight, module.bias
        return new.train(module.training)


class Conv1d(_FusedConv, torch.nn.Conv1d):
    """torch.nn.Conv1d with the same constructor, parameters and state_dict keys, plus keyword-only
    ``activation`` (None, "relu", "gelu", "silu", "tanh") applied in the fused epilogue and
    ``backend``. ``forward(x, residual=None)`` adds ``residual`` after the activation."""

    def __init__(self, *args, activation: Optional[str] = None, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fused(activation, backend)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:  # (input: torch.nn's name)
        return self._run(conv1d, input, residual)


class Conv2d(_FusedConv, torch.nn.Conv2d):
    """torch.nn.Conv2d with the same constructor, parameters and state_dict keys, plus ``activation``
    and ``backend`` as :class:`Conv1d`."""

    def __init__(self, *args, activation: Optional[str] = None, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fused(activation, backend)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:  # (input: torch.nn's name)
        return self._run(conv2d, input, residual)


class TextCNN(torch.nn.Module):
    """The TextCNN block: for each width k, a Conv1d(embed_dim, num_filters, k) over the tokens,
    the activation, and the max over each sequence's valid positions; outputs concatenated.

    ``forward(x [B, L, E], lengths=None) -> [B, num_filters * len(widths)]``. The convolutions are
    ``self.convs[i]`` (torch.nn.Conv1d), so the state_dict keys are ``convs.{i}.weight/bias``, as in
    the usual hand-written block. A sequence shorter than a width gives 0 for that width's filters.
    """

    def __init__(self, embed_dim: int, num_filters: int, widths: Sequence[int] = (3, 4, 5),
                 activation: Optional[str] = "relu", bias: bool = True, *, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        check_activation("TextCNN", activation)
        self.convs = torch.nn.ModuleList(torch.nn.Conv1d(embed_dim, num_filters, k, bias=bias, device=device,
                                                         dtype=dtype) for k in widths)
        self.activation, self.backend = activation, backend

    @property
    def out_features(self) -> int:
        return sum(c.out_channels for c in self.convs)

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        biases = [c.bias for c in self.convs] if self.convs[0].bias is not None else None
        return text_cnn_pool(x, [c.weight for c in self.convs], biases, self.activation, lengths, backend=self.backend)
