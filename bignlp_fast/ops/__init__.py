"""The public functional ops of bignlp_fast. Each is a PyTorch custom op (namespace bignlp_fast)
with a fake implementation and autograd, dispatching to the cpu, cuda, triton or torch backend."""

from bignlp_fast.ops.add_layer_norm import add_layer_norm
from bignlp_fast.ops.attention import scaled_dot_product_attention, varlen_attention
from bignlp_fast.ops.bias_gelu import bias_gelu
from bignlp_fast.ops.causal_conv1d import causal_conv1d
from bignlp_fast.ops.conv import conv1d, conv2d
from bignlp_fast.ops.distillation_loss import distillation_loss
from bignlp_fast.ops.layer_norm_lstm import layer_norm_lstm_layer
from bignlp_fast.ops.linear import linear, prepack
from bignlp_fast.ops.rnn import gru, lstm, rnn, rnn_layer
from bignlp_fast.ops.text_cnn_pool import text_cnn_pool

__all__ = ["add_layer_norm", "bias_gelu", "causal_conv1d", "conv1d", "conv2d", "distillation_loss", "gru",
           "layer_norm_lstm_layer", "linear", "lstm", "prepack", "rnn", "rnn_layer", "scaled_dot_product_attention",
           "text_cnn_pool", "varlen_attention"]
