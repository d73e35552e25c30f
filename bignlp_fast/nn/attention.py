"""MultiheadAttention: a drop-in for torch.nn.MultiheadAttention that runs
bignlp_fast.ops.scaled_dot_product_attention between torch's own in- and out-projections."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from bignlp_fast import _backend
from bignlp_fast.ops.attention import scaled_dot_product_attention
from bignlp_fast.ops.linear import dense

OP = "multihead_attention"


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention with the same constructor, parameters, state_dict keys and forward.

    ``forward(..., need_weights=False)`` projects q/k/v (one matmul for self-attention with the packed
    ``in_proj_weight``), runs the fused attention op on [B, H, L, head_dim] views with the key-padding
    mask kept as [B, 1, 1, S], then applies ``out_proj``. The projections take the faster GEMM for
    their input (ops.linear.dense: the project's packed GEMM where ops.linear.linear_is_faster says
    so, else F.linear). ``backend`` (keyword only) pins the attention op's backend; None chooses
    automatically.

    The fused path cannot return attention weights, nor add ``bias_k``/``bias_v`` or a zero key.
    Those calls (``need_weights=True`` is torch's default!) run torch's implementation, and the
    fallback is recorded in :func:`bignlp_fast.report` (an error under ``BIGNLP_FAST_STRICT=1``, and
    a :class:`~bignlp_fast.BackendError` when a backend other than ``torch`` was named through
    ``backend=`` or ``BIGNLP_FAST_BACKEND``).

    Differences from torch on the fused path: a query whose keys are all masked gives an attention
    output of zeros (so the module returns ``out_proj.bias``), as torch's own SDPA path does since
    torch 2.5, while torch's ``need_weights=True`` path gives NaN; dropout draws a different
    (counter-based) random mask; shape and dtype errors are ValueError/TypeError rather than
    AssertionError.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first, device=device,
                         dtype=dtype)
        self.backend = backend

    def _unfused_reason(self, query: Tensor, need_weights: bool) -> Optional[str]:
        if need_weights:
            return "need_weights=True: the fused kernel does not return attention weights (pass need_weights=False)"
        if self.bias_k is not None or self.bias_v is not None:
            return "add_bias_kv=True is not supported by the fused path"
        if self.add_zero_attn:
            return "add_zero_attn=True is not supported by the fused path"
        if query.is_nested:
            return "NestedTensor inputs are not supported by the fused path"
        return None

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        reason = self._unfused_reason(query, need_weights)
        if reason is not None:
            named = _backend.requested_backend(self.backend)
            if named not in (None, "torch"):
                raise _backend.BackendError(f"{OP}: backend {named!r} cannot run this call: {reason}")
            if named is None:
                _backend.record_fallback(OP, "-", reason)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal), None

    # ---- the fused path ---------------------------------------------------------------------------
    def _fused_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                       attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        batched = query.dim() == 3
        self._check_ranks(query, key, value, key_padding_mask, attn_mask, batched)
        same_qk, same_kv = query is key, key is value  # before any reshaping breaks the identities
        batch_first = self.batch_first
        if not batched:  # [L, E]: run as a batch of one, batch first
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
            batch_first = True
        b_dim, l_dim = (0, 1) if batch_first else (1, 0)
        b, lq, lk = query.shape[b_dim], query.shape[l_dim], key.shape[l_dim]
        self._check_shapes(query, key, value, key_padding_mask, attn_mask, b_dim, b, lq, lk)

        mask, causal = self._merged_mask(key_padding_mask, attn_mask, is_causal, b, lq, lk)
        q, k, v = self._in_projection(query, key, value, same_qk, same_kv)
        h, hd = self.num_heads, self.head_dim

        def heads(t: Tensor) -> Tensor:  # [B, L, E] or [L, B, E] -> [B, H, L, hd], a view with stride(-1) == 1
            t = t.unflatten(-1, (h, hd))
            return t.transpose(1, 2) if batch_first else t.permute(1, 2, 0, 3)

        dropout_p = self.dropout if self.training else 0.0
        out = scaled_dot_product_attention(heads(q), heads(k), heads(v), mask, dropout_p, causal,
                                           backend=self.backend)  # [B, H, Lq, hd]
        out = out.transpose(1, 2).reshape(b, lq, self.embed_dim)  # free: the op's output is laid out [B, L, H, hd]
        if not batch_first:
            out = out.transpose(0, 1)
        out = dense(out, self.out_proj.weight, self.out_proj.bias)
        return out if batched else out.squeeze(0)

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor, same_qk: bool, same_kv: bool):
        """q, k, v projected to embed_dim, in the inputs' layout; views of one matmul where inputs are shared."""
        e = self.embed_dim
        bias = self.in_proj_bias
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
        if not self._qkv_same_embed_dim:
            return (dense(query, self.q_proj_weight, b_q), dense(key, self.k_proj_weight, b_k),
                    dense(value, self.v_proj_weight, b_v))
        w = self.in_proj_weight
        if same_kv and same_qk:  # self-attention: one matmul, q/k/v are views of it
            return dense(query, w, bias).unflatten(-1, (3, e)).unbind(-2)
        w_q, w_k, w_v = w.chunk(3)
        q = dense(query, w_q, b_q)
        if same_kv:  # encoder-decoder attention: one matmul for k and v
            b_kv = bias[e:] if bias is not None else None
            k, v = dense(key, w[e:], b_kv).unflatten(-1, (2, e)).unbind(-2)
            return q, k, v
        return q, dense(key, w_k, b_k), dense(value, w_v, b_v)

    def _merged_mask(self, key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], is_causal: bool,
                     b: int, lq: int, lk: int):
        """torch's key_padding_mask [B, S] and attn_mask [L, S] / [B*H, L, S] (bool True = masked out, or
        additive float) as one mask in the op's convention (bool True = attend, or additive float)
        broadcastable to [B, H, L, S], and the op's is_causal. Returns (mask or None, is_causal)."""
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for "
                          "both instead.", stacklevel=4)
        if is_causal:
            if attn_mask is None:
                raise RuntimeError(f"{OP}: need attn_mask if specifying the is_causal hint. You may use the "
                                   "Transformer module method `generate_square_subsequent_mask` to create this mask.")
            if key_padding_mask is None:
                return None, True  # torch trusts the hint: attn_mask is the causal mask and is not read
        kpm = key_padding_mask.view(b, 1, 1, lk) if key_padding_mask is not None else None  # never expanded
        am = attn_mask
        if am is not None and am.dim() == 3:
            am = am.view(b, self.num_heads, lq, lk)
        if kpm is None or am is None:
            only = kpm if kpm is not None else am
            if only is None:
                return None, False
            return (~only if only.dtype == torch.bool else only), False
        if kpm.dtype == torch.bool and am.dtype == torch.bool:
            return ~(am | kpm), False
        dtype = kpm.dtype if kpm.is_floating_point() else am.dtype
        if am.is_floating_point() and kpm.is_floating_point():
            dtype = torch.promote_types(am.dtype, kpm.dtype)

        def additive(m: Tensor) -> Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, -math.inf)
            return m
        return additive(am) + additive(kpm), False

    # ---- argument checks, with torch's rules and messages that name the argument ------------------
    def _check_ranks(self, query, key, value, key_padding_mask, attn_mask, batched: bool) -> None:
        if query.dim() not in (2, 3):
            raise ValueError(f"{OP}: query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"{OP}: for a {query.dim()}-D query, key and value must be {query.dim()}-D, got "
                             f"{key.dim()}-D and {value.dim()}-D")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and m.dtype != torch.bool and not m.is_floating_point():
                raise TypeError(f"{OP}: {name} must be bool or floating point, got {m.dtype}")
        if key_padding_mask is not None and key_padding_mask.dim() != (2 if batched else 1):
            raise ValueError(f"{OP}: key_padding_mask must be {'2-D [N, S]' if batched else '1-D [S]'} for a "
                             f"{'batched' if batched else 'unbatched'} query, got shape "
                             f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ValueError(f"{OP}: attn_mask must be 2-D [L, S] or 3-D [N*num_heads, L, S], got shape "
                             f"{tuple(attn_mask.shape)}")

    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask, b_dim, b, lq, lk) -> None:
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"{OP}: query has {query.shape[-1]} features but embed_dim is {self.embed_dim}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"{OP}: key and value have {key.shape[-1]} and {value.shape[-1]} features but kdim and "
                             f"vdim are {self.kdim} and {self.vdim}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"{OP}: key's sequence and batch dimensions {tuple(key.shape[:2])} do not match "
                             f"value's {tuple(value.shape[:2])}")
        if key.shape[b_dim] != b:
            raise ValueError(f"{OP}: key has batch size {key.shape[b_dim]} but query has {b}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, lk):
            raise ValueError(f"{OP}: key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected "
                             f"(batch, source length) = {(b, lk)}")
        if attn_mask is not None:
            want = (lq, lk) if attn_mask.dim() == 2 else (b * self.num_heads, lq, lk)
            if tuple(attn_mask.shape) != want:
                raise ValueError(f"{OP}: the {attn_mask.dim()}-D attn_mask has shape {tuple(attn_mask.shape)}, "
                                 f"expected {want}")

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention, *, backend: Optional[str] = None) -> "MultiheadAttention":
        """A bignlp_fast MultiheadAttention sharing ``module``'s parameters (and its out_proj)."""
        new = cls(module.embed_dim, module.num_heads, module.dropout, bias=module.in_proj_bias is not None,
                  add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
                  vdim=module.vdim, batch_first=module.batch_first, device="meta", backend=backend)
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                     "bias_v"):
            setattr(new, name, getattr(module, name))
        new.out_proj = module.out_proj
        return new.train(module.training)
