"""Drop-in modules: torch.nn's constructor signatures and state_dict keys, running bignlp_fast ops."""

from bignlp_fast.nn.activation import GELU
from bignlp_fast.nn.attention import MultiheadAttention
from bignlp_fast.nn.conv import Conv1d, Conv2d, TextCNN
from bignlp_fast.nn.linear import Linear
from bignlp_fast.nn.normalization import LayerNorm
from bignlp_fast.nn.rnn import GRU, LSTM, RNN, GRUCell, LayerNormLSTM, LSTMCell, RNNCell

__all__ = ["Conv1d", "Conv2d", "GELU", "GRU", "GRUCell", "LSTM", "LSTMCell", "LayerNorm", "LayerNormLSTM", "Linear", "MultiheadAttention", "RNN",
           "RNNCell", "TextCNN"]
