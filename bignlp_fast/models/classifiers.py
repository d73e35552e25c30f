"""Text classifiers: TextCNN (embeddings + text_cnn_pool + dropout + linear) and an RNN classifier
(embeddings + bidirectional LSTM/GRU over each sequence's own length + pooling + linear).

Inputs are token ids [B, L] padded on the right, with either ``lengths`` [B] or an
``attention_mask`` [B, L] (1 for tokens; its row sums are the lengths). Padded positions never
reach the result: TextCNN pools only over windows inside each sequence, the RNN runs a
recurrence over each sequence's own length (as a PackedSequence would, without packing) and pools over
valid steps only.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bignlp_fast import nn as bnn
from bignlp_fast.models._pretrained import model_output
from bignlp_fast.ops._common import values_readable


@model_output
class ClassifierOutput:
    logits: Tensor  # [B, num_classes]
    loss: Optional[Tensor] = None  # cross-entropy against ``labels`` when given


def _lengths(input_ids: Tensor, lengths: Optional[Tensor], attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """int64 [B] lengths from ``lengths`` (int32 or int64) or a right-padded ``attention_mask``, or None."""
    if lengths is not None and attention_mask is not None:
        raise ValueError("give lengths or attention_mask, not both")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        lengths = attention_mask.to(torch.int64).sum(1)
        # a data-dependent check, skipped while torch.compile traces: a left-padded mask would be read as
        # right-padded (the lengths are all the models take)
        if values_readable(attention_mask):
            right_padded = torch.arange(input_ids.shape[1], device=lengths.device)[None, :] < lengths[:, None]
            if not torch.equal(attention_mask.bool(), right_padded.to(attention_mask.device)):
                raise ValueError("attention_mask must be right-padded (each row's ones, then its zeros); move "
                                 "left-padded sequences to the left first")
        return lengths
    if isinstance(lengths, Tensor) and lengths.dtype == torch.int32:
        lengths = lengths.to(torch.int64)
    return lengths


def _output(logits: Tensor, labels: Optional[Tensor]) -> ClassifierOutput:
    return ClassifierOutput(logits, F.cross_entropy(logits, labels) if labels is not None else None)


@dataclasses.dataclass
class TextCNNConfig:
    vocab_size: int
    num_classes: int = 2
    embed_dim: int = 300
    num_filters: int = 100  # per width
    widths: tuple[int, ...] = (3, 4, 5)
    activation: str = "relu"
    dropout: float = 0.5
    padding_idx: Optional[int] = 0


class TextCNNClassifier(torch.nn.Module):
    """Kim (2014): embeddings, convolutions of several widths with max-over-time pooling (one fused
    op), dropout, a linear layer. ``forward(input_ids, lengths=None, attention_mask=None, labels=None)``."""

    def __init__(self, config: TextCNNConfig):
        super().__init__()
        self.config = config
        self.embedding = torch.nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.padding_idx)
        self.text_cnn = bnn.TextCNN(config.embed_dim, config.num_filters, config.widths, config.activation)
        self.dropout = torch.nn.Dropout(config.dropout)
        self.classifier = torch.nn.Linear(self.text_cnn.out_features, config.num_classes)

    def forward(self, input_ids: Tensor, lengths: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> ClassifierOutput:
        x = self.embedding(input_ids)  # [B, L, E]
        pooled = self.text_cnn(x, _lengths(input_ids, lengths, attention_mask))  # [B, filters * widths]
        return _output(self.classifier(self.dropout(pooled)), labels)


@dataclasses.dataclass
class RNNClassifierConfig:
    vocab_size: int
    num_classes: int = 2
    embed_dim: int = 128
    hidden_size: int = 128
    num_layers: int = 1
    cell: str = "lstm"  # "lstm" or "gru"
    bidirectional: bool = True
    pooling: str = "last"  # "last" (final states), "mean" or "max" over valid steps
    dropout: float = 0.1
    padding_idx: Optional[int] = 0


class RNNClassifier(torch.nn.Module):
    """Embeddings, a (bidirectional) LSTM or GRU over each sequence's own length, pooling, dropout, a
    linear layer. ``forward(input_ids, lengths=None, attention_mask=None, labels=None)``."""

    def __init__(self, config: RNNClassifierConfig):
        super().__init__()
        if config.cell not in ("lstm", "gru"):
            raise ValueError(f"RNNClassifier: cell must be 'lstm' or 'gru', got {config.cell!r}")
        if config.pooling not in ("last", "mean", "max"):
            raise ValueError(f"RNNClassifier: pooling must be 'last', 'mean' or 'max', got {config.pooling!r}")
        self.config = config
        self.embedding = torch.nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.padding_idx)
        rnn = bnn.LSTM if config.cell == "lstm" else bnn.GRU
        self.rnn = rnn(config.embed_dim, config.hidden_size, num_layers=config.num_layers, batch_first=True,
                       bidirectional=config.bidirectional, dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.dropout = torch.nn.Dropout(config.dropout)
        directions = 2 if config.bidirectional else 1
        self.classifier = torch.nn.Linear(directions * config.hidden_size, config.num_classes)

    def forward(self, input_ids: Tensor, lengths: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> ClassifierOutput:
        B, L = input_ids.shape
        if L == 0:  # no step to run (torch.nn's recurrent layers take none either)
            raise ValueError(f"RNNClassifier: input_ids has no tokens, shape {tuple(input_ids.shape)}")
        x = self.embedding(input_ids)  # [B, L, E]
        lengths = _lengths(input_ids, lengths, attention_mask)
        if lengths is None:
            lengths = torch.full((B,), L, dtype=torch.int64)
        out, state = self.rnn(x, lengths=lengths)  # as if packed; out [B, L, D*H], zero past each length
        h_n = state[0] if isinstance(state, tuple) else state  # [layers * directions, B, H]
        if self.config.pooling == "last":
            directions = 2 if self.config.bidirectional else 1
            pooled = torch.cat(list(h_n[-directions:]), dim=-1)  # the last layer's final state(s)
        else:
            valid = (torch.arange(L, device=out.device)[None, :] < lengths.to(out.device)[:, None])[..., None]
            if self.config.pooling == "mean":
                pooled = (out * valid).sum(1) / lengths.to(out.device, out.dtype).clamp(min=1)[:, None]
            else:
                pooled = out.masked_fill(~valid, float("-inf")).amax(1)
        return _output(self.classifier(self.dropout(pooled)), labels)
