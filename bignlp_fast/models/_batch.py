"""How a padded batch's real tokens are laid out for the models that skip padding (BERT; GPT-2 without a
cache; transformers' encoders and masked-LM heads after optimize, in bignlp_fast.hf): :class:`_Batch`
packs them in one row for varlen attention and scatters results back, and :func:`labelled_loss` takes
a loss on the labelled rows only."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bignlp_fast.ops._common import values_readable
from bignlp_fast.ops.attention import scaled_dot_product_attention, varlen_attention


@dataclasses.dataclass
class _Batch:
    """How the tokens of a batch are laid out for attention: packed (``cu_seqlens``) or padded (``mask``)."""

    shape: tuple[int, int]  # (B, L)
    indices: Optional[Tensor] = None  # packed: [T] positions of the real tokens in the flattened [B * L]
    cu_seqlens: Optional[Tensor] = None  # packed: int32 [B + 1]
    max_seqlen: int = 0
    mask: Optional[Tensor] = None  # padded: bool [B, 1, 1, L], True = attend (None: every token)

    @staticmethod
    def of(attention_mask: Optional[Tensor], shape: tuple[int, int]) -> "_Batch":
        b, l = shape
        if b == 0:  # no sequences to pack (varlen attention needs at least one)
            return _Batch(shape)
        if attention_mask is None or not values_readable(attention_mask):
            mask = None if attention_mask is None else attention_mask.bool().view(b, 1, 1, l)
            return _Batch(shape, mask=mask)
        keep = attention_mask.bool()
        lengths = keep.sum(1, dtype=torch.int32)
        cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        indices = keep.flatten().nonzero().flatten()
        return _Batch(shape, indices, cu_seqlens, int(lengths.max()))

    def pack(self, t: Tensor) -> Tensor:
        """[B, L, ...] -> the real tokens [T, ...]."""
        flat = t.flatten(0, 1)
        return flat if self.indices is None else flat[self.indices]

    def pack_labels(self, labels: Tensor) -> Tensor:
        """[B, L] labels -> those of the tokens :meth:`pack` gives, -100 (no loss) at padding."""
        if self.mask is not None:
            labels = labels.masked_fill(~self.mask.view(self.shape), -100)
        return self.pack(labels)

    def unpack(self, t: Tensor) -> Tensor:
        """[T, ...] -> [B, L, ...], zero at padding (in the padded layout too, where the layers ran on
        the padding and left values there)."""
        if self.indices is not None:
            t = t.new_zeros(self.shape[0] * self.shape[1], *t.shape[1:]).index_copy(0, self.indices, t)
        t = t.view(*self.shape, *t.shape[1:])
        if self.mask is not None:
            t = torch.where(self.mask.view(*self.shape, *([1] * (t.dim() - 2))), t, 0.0)
        return t

    def unpack_projected(self, project: Callable[[Tensor], Tensor], h: Tensor, fill: Optional[Tensor] = None,
                         max_bytes: int = 1 << 28) -> Tensor:
        """``unpack(project(h))`` for h [T, ...], with ``fill`` (one row of the output; without autograd
        only) at padding instead of zeros. A vocabulary projection's output is large ([T, V]; GPT-2's
        50257 columns are 200 KB a row), and unpack writes a [B * L, V] copy of it: without autograd,
        where the T rows' output would pass ``max_bytes``, the rows are projected in slices of at least
        256 written straight into that copy, so the memory held at once stays near what the padded
        layout needs (its one [B * L, V] output)."""
        if fill is None and (torch.is_grad_enabled() or self.indices is None or h.shape[0] == 0):
            return self.unpack(project(h))
        row = fill if fill is not None else project(h[:1])[0]
        rows = max(256, max_bytes // max(1, row.numel() * row.element_size()))
        if fill is None and h.shape[0] <= rows:
            return self.unpack(project(h))
        n = self.shape[0] * self.shape[1]
        out = row.new_zeros(n, *row.shape) if fill is None else fill.expand(n, *row.shape).contiguous()
        for start in range(0, h.shape[0], rows):
            out.index_copy_(0, self.indices[start:start + rows], project(h[start:start + rows]))
        return out.view(*self.shape, *row.shape)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
        """q, k, v [T, heads, head_dim] -> [T, heads, head_dim]."""
        if self.cu_seqlens is not None:
            return varlen_attention(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen,
                                    dropout_p=dropout_p)
        b, l = self.shape
        q, k, v = (t.view(b, l, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))  # [B, heads, L, head_dim]
        out = scaled_dot_product_attention(q, k, v, self.mask, dropout_p)
        return out.transpose(1, 2).flatten(0, 1)


def labelled_loss(head: Callable[[Tensor], Tensor], h: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """The mean cross-entropy of ``logits = head(h)`` [N, vocab] against ``labels`` [N] (-100: no loss
    there). Under autograd, where at most half the rows are labelled (BERT's masked tokens, a
    fine-tuning set's answers after their prompts), their logits are computed again, apart from
    ``logits``: the loss's backward then runs the head on those rows only, not on every row with zero
    gradients at the others; ``logits`` keep their own graph for any other loss a caller builds."""
    if logits.requires_grad and values_readable(labels) and not torch.jit.is_tracing():
        counted = (labels != -100).nonzero().flatten()
        if 2 * counted.numel() <= labels.numel():
            return F.cross_entropy(head(h.index_select(0, counted)).float(), labels.index_select(0, counted))
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)
