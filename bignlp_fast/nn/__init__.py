"""Drop-in modules: torch.nn's constructor signatures and state_dict keys, running bignlp_fast ops."""

from bignlp_fast.nn.activation import GELU
from bignlp_fast.nn.attention import MultiheadAttention
from bignlp_fast.nn.normalization import LayerNorm

__all__ = ["GELU", "LayerNorm", "MultiheadAttention"]
