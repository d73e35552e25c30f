"""Meta tensors (shapes without data: torch.device("meta") model construction, memory planning):
every op, module and model gives outputs of the right shapes on the meta device, as torch's own do,
through the custom ops' fake functions; nothing reads a value or asks autocast about "meta"."""

import pytest
import torch

import bignlp_fast.models as M
import bignlp_fast.nn as bnn
import bignlp_fast.ops as ops

META = torch.device("meta")


def _empty(*shape, dtype=torch.float32):
    return torch.empty(*shape, device=META, dtype=dtype)


OPS = {
    "add_layer_norm": (lambda: ops.add_layer_norm(_empty(4, 32), _empty(4, 32), _empty(32), _empty(32))[0], (4, 32)),
    "bias_gelu": (lambda: ops.bias_gelu(_empty(4, 32), _empty(32)), (4, 32)),
    "linear": (lambda: ops.linear(_empty(4, 32), _empty(8, 32), _empty(8)), (4, 8)),
    "conv1d": (lambda: ops.conv1d(_empty(2, 8, 10), _empty(4, 8, 3), _empty(4), activation="gelu"), (2, 4, 8)),
    "conv2d": (lambda: ops.conv2d(_empty(2, 8, 10, 10), _empty(4, 8, 3, 3)), (2, 4, 8, 8)),
    "causal_conv1d": (lambda: ops.causal_conv1d(_empty(2, 8, 10), _empty(8, 4)), (2, 8, 10)),
    "text_cnn_pool": (lambda: ops.text_cnn_pool(_empty(2, 10, 8), [_empty(4, 8, 3)], [_empty(4)],
                                                lengths=_empty(2, dtype=torch.int64)), (2, 4)),
    "scaled_dot_product_attention": (lambda: ops.scaled_dot_product_attention(_empty(2, 4, 8, 16), _empty(2, 2, 9, 16),
                                                                              _empty(2, 2, 9, 16), enable_gqa=True),
                                     (2, 4, 8, 16)),
    "varlen_attention": (lambda: ops.varlen_attention(_empty(9, 4, 16), _empty(9, 4, 16), _empty(9, 4, 16),
                                                      _empty(3, dtype=torch.int32), _empty(3, dtype=torch.int32), 6, 6),
                         (9, 4, 16)),
    "distillation_loss": (lambda: ops.distillation_loss(_empty(4, 10), _empty(4, 10), _empty(4, dtype=torch.int64)), ()),
}


@pytest.mark.parametrize("name", OPS)
def test_ops_on_meta(name):
    build, shape = OPS[name]
    out = build()
    assert out.device == META and tuple(out.shape) == shape


MODULES = {
    "LSTM": (lambda: bnn.LSTM(5, 8, batch_first=True, bidirectional=True, device=META), (3, 7, 5), (3, 7, 16)),
    "GRU": (lambda: bnn.GRU(5, 8, num_layers=2, device=META), (7, 3, 5), (7, 3, 8)),
    "RNN": (lambda: bnn.RNN(5, 8, device=META), (7, 5), (7, 8)),
    "LSTMCell": (lambda: bnn.LSTMCell(5, 8, device=META), (3, 5), (3, 8)),
    "LayerNormLSTM": (lambda: bnn.LayerNormLSTM(5, 8, device=META), (7, 3, 5), (7, 3, 8)),
    "MultiheadAttention": (lambda: bnn.MultiheadAttention(32, 4, batch_first=True, device=META), (2, 5, 32), (2, 5, 32)),
    "Conv1d": (lambda: bnn.Conv1d(8, 4, 3, device=META), (2, 8, 10), (2, 4, 8)),
    "LayerNorm": (lambda: bnn.LayerNorm(32, device=META), (4, 32), (4, 32)),
    "Linear": (lambda: bnn.Linear(32, 8, device=META), (4, 32), (4, 8)),
}


@pytest.mark.parametrize("name", MODULES)
def test_modules_on_meta(name):
    build, in_shape, out_shape = MODULES[name]
    module = build()
    x = _empty(*in_shape)
    out = module(x, x, x, need_weights=False) if name == "MultiheadAttention" else module(x)
    out = out[0] if isinstance(out, tuple) else out
    assert out.device == META and tuple(out.shape) == out_shape


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "attention_mask"])
def test_models_on_meta(masked):
    ids = _empty(2, 8, dtype=torch.int64)
    kwargs = {"attention_mask": _empty(2, 8, dtype=torch.int64)} if masked else {}
    with torch.device(META):
        bert = M.BertModel(M.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64))
        gpt = M.GPTLMHeadModel(M.GPTConfig(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=16))
        cnn = M.TextCNNClassifier(M.TextCNNConfig(vocab_size=100, embed_dim=16, num_filters=4))
    assert bert(ids, **kwargs).last_hidden_state.shape == (2, 8, 32)
    assert gpt(ids, **kwargs).logits.shape == (2, 8, 100)
    assert cnn(ids, **kwargs).logits.shape == (2, 2)
