"""Every public op, module and model under torch.inference_mode(), as users run inference: the same
results as under torch.no_grad(). Tensors made in inference mode have no version counter (reading it
raises), so any check that keys a cache on one must not read it there (ops._common.version_counter)."""

import pytest
import torch

import bignlp_fast.nn as bnn
from bignlp_fast import models, ops, optimize
from conftest import padded_batch


def _same_as_no_grad(fn):
    """fn() under inference_mode and under no_grad (inputs made inside each: inference tensors there)."""
    with torch.no_grad():
        expected = fn()
    with torch.inference_mode():
        got = fn()
    for g, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        if isinstance(g, torch.Tensor):
            torch.testing.assert_close(g, e)
        else:
            assert g == e


def _seeded(fn):
    def run():
        torch.manual_seed(0)
        return fn()
    return run


OPS = {
    "add_layer_norm": lambda: ops.add_layer_norm(torch.randn(6, 32), torch.randn(6, 32), torch.randn(32), torch.randn(32)),
    "bias_gelu": lambda: ops.bias_gelu(torch.randn(6, 32), torch.randn(32)),
    "scaled_dot_product_attention": lambda: ops.scaled_dot_product_attention(
        torch.randn(2, 3, 7, 16), torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16),
        torch.rand(2, 1, 1, 9) > 0.3),
    "varlen_attention": lambda: ops.varlen_attention(
        torch.randn(10, 2, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16),
        torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 4, 10], dtype=torch.int32), 6, 6, causal=True),
    "linear": lambda: ops.linear(torch.randn(5, 64), torch.randn(48, 64), torch.randn(48)),
    "conv1d": lambda: ops.conv1d(torch.randn(2, 8, 20), torch.randn(6, 8, 3), torch.randn(6), padding=1,
                                 activation="gelu"),
    "conv2d": lambda: ops.conv2d(torch.randn(2, 4, 9, 9), torch.randn(6, 4, 3, 3), torch.randn(6), padding=1,
                                 activation="relu"),
    "causal_conv1d": lambda: ops.causal_conv1d(torch.randn(2, 8, 20), torch.randn(8, 4), torch.randn(8), "silu"),
    "text_cnn_pool": lambda: ops.text_cnn_pool(torch.randn(3, 12, 16), [torch.randn(5, 16, w) for w in (2, 3)],
                                               [torch.randn(5) for _ in range(2)], lengths=torch.tensor([12, 7, 4])),
    "distillation_loss": lambda: ops.distillation_loss(torch.randn(6, 50), torch.randn(6, 50),
                                                       torch.tensor([1, 2, -100, 4, 5, 6])),
}


@pytest.mark.parametrize("name", list(OPS))
def test_ops(name):
    _same_as_no_grad(_seeded(OPS[name]))


MODULES = {
    "LSTM with lengths": lambda: bnn.LSTM(12, 16, num_layers=2, bidirectional=True)(
        torch.randn(9, 3, 12), lengths=torch.tensor([9, 5, 2])),
    "GRU": lambda: bnn.GRU(12, 16, batch_first=True)(torch.randn(3, 9, 12)),
    "RNN": lambda: bnn.RNN(12, 16)(torch.randn(9, 3, 12)),
    "LSTMCell": lambda: bnn.LSTMCell(12, 32)(torch.randn(3, 12)),
    "GRUCell": lambda: bnn.GRUCell(12, 32)(torch.randn(3, 12), torch.randn(3, 32)),
    "LayerNormLSTM": lambda: bnn.LayerNormLSTM(12, 16)(torch.randn(9, 3, 12)),
    "MultiheadAttention": lambda: bnn.MultiheadAttention(32, 4, batch_first=True)(
        *(torch.randn(2, 7, 32),) * 3, key_padding_mask=torch.tensor([[False] * 7, [False] * 4 + [True] * 3]),
        need_weights=False)[0],
    "Conv1d": lambda: bnn.Conv1d(8, 6, 3, padding=1)(torch.randn(2, 8, 20)),
    "TextCNN": lambda: bnn.TextCNN(16, 5, (2, 3))(torch.randn(3, 12, 16)),
    "LayerNorm + Linear": lambda: bnn.Linear(32, 8)(bnn.LayerNorm(32)(torch.randn(4, 32))),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_modules(name):
    _same_as_no_grad(_seeded(MODULES[name]))


@pytest.mark.parametrize("first", ["inference_mode", "no_grad"])
def test_prepacked_cell(first):
    """A packed copy (ops.prepack) made under one mode serves calls under the other."""
    torch.manual_seed(0)
    cell = bnn.LSTMCell(32, 32)
    ops.prepack(cell)
    x = torch.randn(4, 32)
    modes = [torch.inference_mode, torch.no_grad]
    if first == "no_grad":
        modes.reverse()
    results = []
    for mode in modes:
        with mode():
            results.append(cell(x, cell(x)))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected)


def _bert(cls, **kwargs):
    torch.manual_seed(0)
    config = models.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=32, **kwargs)
    return cls(config).eval()


@pytest.mark.parametrize("cls", [models.BertModel, models.BertForMaskedLM, models.BertForSequenceClassification])
def test_bert_on_a_padded_batch(cls):
    """The padded batch is unpadded into varlen attention, whose cu_seqlens are made in inference mode."""
    model = _bert(cls)
    ids, mask = padded_batch([9, 5, 2], 9, left=False, low=3)
    _same_as_no_grad(lambda: model(ids, attention_mask=mask))


def test_gpt_generate_left_padded():
    torch.manual_seed(0)
    model = models.GPTLMHeadModel(models.GPTConfig(vocab_size=101, n_positions=32, n_embd=32, n_layer=2,
                                                   n_head=4)).eval()
    ids, mask = padded_batch([6, 3], 6, left=True, low=3)
    _same_as_no_grad(lambda: model.generate(ids, 5, attention_mask=mask))


@pytest.mark.parametrize("cls, config", [
    (models.TextCNNClassifier, dict(vocab_size=101, embed_dim=16, num_filters=4, widths=(2, 3))),
    (models.RNNClassifier, dict(vocab_size=101, embed_dim=16, hidden_size=8)),
])
def test_classifiers(cls, config):
    torch.manual_seed(0)
    config_cls = models.TextCNNConfig if cls is models.TextCNNClassifier else models.RNNClassifierConfig
    model = cls(config_cls(**config)).eval()
    ids, mask = padded_batch([9, 5, 2], 9, left=False, low=3)
    _same_as_no_grad(lambda: model(ids, attention_mask=mask))


def test_optimized_hf_bert_unpadded_and_packed():
    """transformers' BERT after optimize(): the unpadded encoder (cu_seqlens made in inference mode)
    and a padding-free row whose mask transformers builds in inference mode (the layout cache keys on
    tensors without version counters)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=4, intermediate_size=64,
                                                           max_position_embeddings=32)).eval()
    optimize(model)
    ids, mask = padded_batch([9, 5, 2], 9, left=False, low=3)
    _same_as_no_grad(lambda: model(ids, attention_mask=mask).last_hidden_state)
    row = torch.randint(3, 101, (1, 16))
    positions = torch.cat([torch.arange(n) for n in (9, 5, 2)])[None]
    _same_as_no_grad(lambda: model(row, position_ids=positions).last_hidden_state)
