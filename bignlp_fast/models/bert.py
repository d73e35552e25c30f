"""BERT: ``BertModel``, ``BertForSequenceClassification`` and ``BertForMaskedLM`` on the fused ops,
with Hugging Face's parameter names, so checkpoints load as they are (see _pretrained.py).

What makes it fast:

- **Padding costs nothing.** With an ``attention_mask``, the batch is unpadded once, before the
  embeddings: every layer runs on the T real tokens ([T, hidden], T = sum of the lengths), and
  attention is ``varlen_attention`` over the packed sequences (cumulative offsets ``cu_seqlens``).
  The last hidden state is scattered back to [B, L, hidden] at the end, with zeros at padding.
- **Fewer passes over memory.** The residual add and the LayerNorm after it are one op
  (``add_layer_norm``); the intermediate layer's bias and GELU are one op (``bias_gelu``);
  attention is flash-style (no [L, L] score matrix in memory).
- The GEMMs are ``bignlp_fast.nn.Linear``'s: the project's packed GEMM (``ops.linear``) for float32 on
  CPUs where torch's sgemm is the slower one (AMD with an AVX-512 build: 1.5-2x F.linear at these
  shapes), torch's elsewhere (MKL on Intel or with an AVX2 build, oneDNN's bf16 GEMMs, cuBLAS).

Under ``torch.compile`` the batch is not unpadded (the token count would be data-dependent):
layers run on all B*L positions and attention takes the padding mask instead. Both paths give the
same result at real tokens, and the tests check it.

Post-LN, as the original BERT:  h = LN(h + Attention(h));  h = LN(h + FFN(h)).
Padded positions of ``last_hidden_state`` (and of the MLM logits) are zero; transformers leaves
values there that nothing should read. ``pooler_output`` is taken at position 0 (the [CLS] token of
right-padded batches), as transformers does.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bignlp_fast import nn as bnn
from bignlp_fast.models._batch import _Batch, labelled_loss
from bignlp_fast.models._pretrained import HFConfig, PretrainedModel, model_output
from bignlp_fast.ops.linear import dense
from bignlp_fast.ops.bias_gelu import bias_gelu

_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
_ACTIVATIONS = (*_GELU, "relu")


@dataclasses.dataclass
class BertConfig(HFConfig):
    """Hugging Face's BertConfig fields (config.json names and defaults: BERT-base)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2
    problem_type: Optional[str] = None  # regression / single_label_classification / multi_label_classification
    classifier_dropout: Optional[float] = None
    extra: dict = dataclasses.field(default_factory=dict, repr=False)

    model_type = "bert"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BertConfig: hidden_act must be one of {_ACTIVATIONS}, got {self.hidden_act!r}")
        if self.extra.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("BertConfig: only position_embedding_type='absolute' is supported, got "
                             f"{self.extra['position_embedding_type']!r}")
        if self.extra.get("is_decoder") or self.extra.get("add_cross_attention"):
            raise ValueError("BertConfig: decoder BERT (is_decoder / add_cross_attention) is not supported")

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        d = dict(d)
        if "num_labels" not in d and "num_labels" not in overrides and "id2label" in d:
            d["num_labels"] = len(d["id2label"])  # transformers stores the labels, not their count
        return super().from_dict(d, **overrides)

    def to_dict(self) -> dict:
        d = super().to_dict()
        if len(d.get("id2label", {})) != self.num_labels:  # so that transformers reads num_labels back
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return d


@model_output
class BertOutput:
    last_hidden_state: Tensor  # [B, L, hidden]; zero at padding
    pooler_output: Optional[Tensor] = None  # [B, hidden]


@model_output
class SequenceClassifierOutput:
    logits: Tensor  # [B, num_labels]
    loss: Optional[Tensor] = None


@model_output
class MaskedLMOutput:
    logits: Tensor  # [B, L, vocab]; zero at padding
    loss: Optional[Tensor] = None


def _init_weights(module: torch.nn.Module, std: float) -> None:
    """transformers' BERT initialisation: normal(0, std) weights, zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, 0.0, std)
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.zeros_(m.bias)
        if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)


def _dense_activation(layer: torch.nn.Linear, h: Tensor, hidden_act: str) -> Tensor:
    """act(h W^T + b): the GEMM without its bias, then the bias and the activation in one pass."""
    x = dense(h, layer.weight)
    if hidden_act in _GELU:
        return bias_gelu(x, layer.bias, _GELU[hidden_act])
    return F.relu(x + layer.bias)


# ---- modules, named as transformers names them (their names are the state_dict keys) -------------
class BertEmbeddings(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = torch.nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.position_embeddings = torch.nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = torch.nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = bnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, position_ids: Tensor) -> Tensor:
        """Each [T] -> [T, hidden]."""
        words = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        h, _ = self.LayerNorm(words, residual=self.position_embeddings(position_ids))
        return self.dropout(h)


class BertSelfAttention(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = bnn.Linear(config.hidden_size, config.hidden_size)
        self.key = bnn.Linear(config.hidden_size, config.hidden_size)
        self.value = bnn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, h: Tensor, batch: _Batch) -> Tensor:
        """[T, hidden] -> [T, hidden]: the heads' outputs side by side."""
        q, k, v = (proj(h).unflatten(-1, (self.num_heads, -1)) for proj in (self.query, self.key, self.value))
        return batch.attend(q, k, v, self.dropout_p if self.training else 0.0).flatten(1)


class BertDenseLayerNorm(torch.nn.Module):
    """dense, dropout, then LayerNorm(x + residual): transformers' BertSelfOutput and BertOutput."""

    def __init__(self, config: BertConfig, in_features: int):
        super().__init__()
        self.dense = bnn.Linear(in_features, config.hidden_size)
        self.LayerNorm = bnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        out, _ = self.LayerNorm(self.dropout(self.dense(x)), residual=residual)
        return out


class BertAttention(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertDenseLayerNorm(config, config.hidden_size)

    def forward(self, h: Tensor, batch: _Batch) -> Tensor:
        return self.output(self.self(h, batch), h)


class BertIntermediate(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = bnn.Linear(config.hidden_size, config.intermediate_size)
        self.hidden_act = config.hidden_act

    def forward(self, h: Tensor) -> Tensor:
        return _dense_activation(self.dense, h, self.hidden_act)


class BertLayer(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertDenseLayerNorm(config, config.intermediate_size)

    def forward(self, h: Tensor, batch: _Batch) -> Tensor:
        h = self.attention(h, batch)
        return self.output(self.intermediate(h), h)


class BertEncoder(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = torch.nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, h: Tensor, batch: _Batch) -> Tensor:
        for layer in self.layer:
            h = layer(h, batch)
        return h


class BertPooler(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = bnn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, last_hidden_state: Tensor) -> Tensor:
        return torch.tanh(self.dense(last_hidden_state[:, 0]))


# ---- models -------------------------------------------------------------------------------------
def _check_inputs(config: BertConfig, input_ids: Tensor, attention_mask, token_type_ids, position_ids) -> None:
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"Bert: input_ids must be integer token ids [B, L], got {input_ids.dtype} of shape "
                         f"{tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:  # the pooler and the classifier read the first token
        raise ValueError(f"Bert: input_ids has no tokens, shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"Bert: input_ids has {input_ids.shape[1]} positions, more than max_position_embeddings "
                         f"{config.max_position_embeddings}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"Bert: attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    for name, t in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
        if t is not None and t.shape != input_ids.shape and t.shape != (1, input_ids.shape[1]):
            raise ValueError(f"Bert: {name} must have input_ids' shape {tuple(input_ids.shape)} (or "
                             f"{(1, input_ids.shape[1])}, the same for every row), got {tuple(t.shape)}")


class BertModel(PretrainedModel):
    """The encoder: ``forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None)``
    -> BertOutput(last_hidden_state [B, L, hidden], pooler_output [B, hidden])."""

    config_class = BertConfig
    base_model_prefix = "bert"
    ignored_keys = ("embeddings.position_ids", "embeddings.token_type_ids")
    optional_keys = ("pooler.",)
    architecture = "BertModel"

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        _init_weights(self, config.initializer_range)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> BertOutput:
        h, batch = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        last = batch.unpack(h)
        return BertOutput(last, self.pooler(last) if self.pooler is not None else None)

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> tuple[Tensor, _Batch]:
        """The encoder's output at the real tokens only ([T, hidden]) and the batch layout."""
        _check_inputs(self.config, input_ids, attention_mask, token_type_ids, position_ids)
        b, l = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(l, device=input_ids.device)
        position_ids = position_ids.expand(b, l)  # [1, L] or none: the same for every row, as in transformers
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids.expand(b, l)
        batch = _Batch.of(attention_mask, (b, l))
        h = self.embeddings(batch.pack(input_ids), batch.pack(token_type_ids), batch.pack(position_ids))  # [T, hidden]
        return self.encoder(h, batch), batch


class BertForSequenceClassification(PretrainedModel):
    """BERT + pooler + dropout + linear. ``forward(..., labels=None)`` -> SequenceClassifierOutput;
    the loss follows ``config.problem_type`` (inferred from num_labels and the labels' dtype when None)."""

    config_class = BertConfig
    base_model_prefix = "bert"
    ignored_keys = BertModel.ignored_keys
    optional_keys = ("bert.pooler.",)
    architecture = "BertForSequenceClassification"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = bnn.Linear(config.hidden_size, config.num_labels)
        _init_weights(self.classifier, config.initializer_range)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> SequenceClassifierOutput:
        pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids).pooler_output
        logits = self.classifier(self.dropout(pooled))
        return SequenceClassifierOutput(logits, self._loss(logits, labels) if labels is not None else None)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        n = self.config.num_labels
        problem = self.config.problem_type
        if problem is None:
            problem = ("regression" if n == 1 else
                       "single_label_classification" if labels.dtype in (torch.int64, torch.int32) else
                       "multi_label_classification")
        if problem == "regression":
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype)) if n == 1 else \
                F.mse_loss(logits, labels.to(logits.dtype))
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, n), labels.view(-1))
        if problem == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        raise ValueError(f"BertForSequenceClassification: unknown problem_type {problem!r}")


class BertPredictionHeadTransform(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = bnn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = bnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.hidden_act = config.hidden_act

    def forward(self, h: Tensor) -> Tensor:
        return self.LayerNorm(_dense_activation(self.dense, h, self.hidden_act))


class BertLMPredictionHead(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = bnn.Linear(config.hidden_size, config.vocab_size)  # weight tied to the word embeddings
        self.bias = self.decoder.bias  # transformers' second name for the decoder's bias

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.transform(h))


class BertOnlyMLMHead(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, h: Tensor) -> Tensor:
        return self.predictions(h)


class BertForMaskedLM(PretrainedModel):
    """BERT + the masked-LM head, its decoder tied to the word embeddings (a decoder of its own when
    config.json says ``"tie_word_embeddings": false``, as transformers does).
    ``forward(..., labels=None)`` -> MaskedLMOutput; labels are token ids, -100 where no loss is taken
    (padding positions never count)."""

    config_class = BertConfig
    base_model_prefix = "bert"
    ignored_keys = BertModel.ignored_keys
    other_keys = ("bert.pooler.",)  # in BertForPreTraining / BertModel checkpoints; this model has no pooler
    tied_weights = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                    "cls.predictions.decoder.bias": "cls.predictions.bias"}
    architecture = "BertForMaskedLM"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        _init_weights(self.cls, config.initializer_range)
        if config.extra.get("tie_word_embeddings", True) is False:
            # Untied, as in transformers 5: the decoder's weight and bias are its own, and saved;
            # cls.predictions.bias is a separate parameter the forward does not use (a checkpoint
            # without the decoder's bias, written when the two were one, gives it its value)
            predictions = self.cls.predictions
            predictions.bias = torch.nn.Parameter(predictions.decoder.bias.detach().clone())
            self.tied_weights = {}
            self.filled_from = {"cls.predictions.decoder.bias": "cls.predictions.bias"}
        else:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> MaskedLMOutput:
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"BertForMaskedLM: labels must have input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(labels.shape)}")
        h, batch = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids)
        if labels is None:
            return MaskedLMOutput(batch.unpack_projected(self.cls, h))
        logits = self.cls(h)  # [T, vocab]: the real tokens only
        return MaskedLMOutput(batch.unpack(logits), labelled_loss(self.cls, h, logits, batch.pack_labels(labels)))


def bert_flops(config: BertConfig, tokens: int, seq_lengths: Optional[list] = None) -> float:
    """Forward FLOPs of the encoder over ``tokens`` real tokens (GEMMs + attention), for benchmarks."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    gemm = 2 * tokens * (4 * h * h + 2 * h * i)
    attn = 4 * h * sum(s * s for s in seq_lengths) if seq_lengths is not None else 0
    return float(n * (gemm + attn))


__all__ = ["BertConfig", "BertForMaskedLM", "BertForSequenceClassification", "BertModel", "BertOutput",
           "MaskedLMOutput", "SequenceClassifierOutput", "bert_flops"]
