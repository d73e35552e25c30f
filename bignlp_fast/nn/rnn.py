"""Recurrent modules: drop-ins for torch.nn.LSTM / GRU / RNN and their cells, running the fused
time loop of bignlp_fast.ops.rnn_layer, and LayerNormLSTM on bignlp_fast.ops.layer_norm_lstm_layer.

The modules check and arrange their arguments (PackedSequence, unbatched input, batch_first, the
states' order) and run the stack of the functional forms ``bignlp_fast.ops.lstm / gru / rnn``
(``ops.rnn.recurrent_stack``): each layer and direction is one input-projection GEMM over all time
steps (``ops.linear`` on CPU tensors, F.linear elsewhere; its autograd gives dW_ih, db_ih and dx)
followed by one ``rnn_layer`` call that runs the recurrence::

    xw = linear(layer_input, weight_ih, bias_ih)                    # [T, B, G*H], time-major
    out, h_n, c_n = rnn_layer(mode, xw, weight_hh, bias_hh, h0, c0, weight_hr, lengths, reverse)

Bidirectional layers concatenate [forward, backward] on the feature dimension; dropout (training
only) is applied to every layer's output except the last; a PackedSequence runs as a padded batch
in its sorted order with each sequence's length, so h_n is the state after each sequence's own
last step, as in torch.

torch.compile: Dynamo refuses to trace any instance of torch.nn.RNN/GRU/LSTM (a graph break, an
error under ``fullgraph=True``) unless ``torch._dynamo.config.allow_rnn = True``. These modules are
such instances (so ``isinstance(m, nn.LSTM)`` and code that relies on it keep working); with that
flag set they trace into one graph: the loop over layers is Python, each layer one custom op.

Autocast: the input projection is an autocast ``F.linear``; the recurrence then runs in the dtype that
gave (bf16 under CPU autocast), with the recurrent weights and states cast to it, for the layers and
the cells alike, so the outputs are bf16. torch 2.14 under CPU bf16 autocast returns bf16 from RNN and
RNNCell too, but float32 from GRU, LSTMCell and GRUCell, and its LSTM fails there (oneDNN "could not
create a primitive descriptor"): a model that needs float32 out of these casts the output.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from bignlp_fast import _backend
from bignlp_fast.ops._common import PLAIN_TENSORS, autocast_enabled, values_readable
from bignlp_fast.ops.add_layer_norm import add_layer_norm
from bignlp_fast.ops.layer_norm_lstm import layer_norm_lstm_layer
from bignlp_fast.ops.rnn import (OP as RNN_OP, cell_lane, input_projection, recurrent_stack, rnn_layer, stack_lane,
                                  stack_layers)

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "LayerNormLSTM", "RNN", "RNNCell"]

_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


# ---- PackedSequence <-> padded, time-major, in the packed (sorted) batch order ----------------------
def _step_mask(batch_sizes: Tensor) -> Tensor:
    """[T, B] bool: step t of (sorted) sequence b exists. batch_sizes: int64 [T], non-increasing, CPU."""
    return torch.arange(int(batch_sizes[0]))[None, :] < batch_sizes[:, None]


def _unpack(data: Tensor, batch_sizes: Tensor) -> tuple[Tensor, Tensor]:
    """Packed data [N, F] -> (padded [T, B, F] with zeros after each sequence's end, lengths int64 [B])."""
    mask = _step_mask(batch_sizes)
    padded = data.new_zeros(*mask.shape, data.shape[-1]).masked_scatter(mask.to(data.device)[..., None], data)
    return padded, mask.sum(0)


def _pack(padded: Tensor, batch_sizes: Tensor) -> Tensor:
    """Padded [T, B, F] -> packed data [N, F] (the steps of batch_sizes, row-major: t, then b)."""
    return padded[_step_mask(batch_sizes).to(padded.device)]


def _check_lengths(name: str, batch_first: bool, input, lengths) -> Tensor:
    """lengths= of a padded batched input, as pack_padded_sequence takes them (a 1-D int32 / int64
    tensor or a list of ints, each in [1, T]): int64 [B] on the CPU."""
    if isinstance(input, PackedSequence) or not isinstance(input, Tensor) or input.dim() != 3:
        raise ValueError(f"{name}: lengths is for a padded batched (3-D) input; a PackedSequence carries its own")
    if isinstance(lengths, (list, tuple)) and all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
        lengths = torch.tensor(lengths, dtype=torch.int64)
    if not isinstance(lengths, Tensor) or lengths.dtype not in (torch.int32, torch.int64) or lengths.dim() != 1:
        raise ValueError(f"{name}: lengths must be a 1-D int32 / int64 tensor or a list of ints, got "
                         f"{lengths.dtype if isinstance(lengths, Tensor) else type(lengths).__name__}")
    lengths = lengths.to(device="cpu", dtype=torch.int64)
    batch, steps = (input.shape[0], input.shape[1]) if batch_first else (input.shape[1], input.shape[0])
    if lengths.shape[0] != batch:
        raise ValueError(f"{name}: lengths has {lengths.shape[0]} entries for a batch of {batch}")
    if steps == 0 and batch:
        raise ValueError(f"{name}: the input has no steps (T = 0), so lengths (each in [1, T], as "
                         f"pack_padded_sequence takes them) cannot be given; leave them out")
    if values_readable(lengths) and lengths.numel() and (lengths.min() < 1 or lengths.max() > steps):
        raise ValueError(f"{name}: lengths must be in [1, {steps}] (the input's steps), got {lengths.tolist()}")
    return lengths


def _autocast(x: Tensor) -> bool:
    return autocast_enabled(x.device.type)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t.to(dtype) if t is not None and t.dtype != dtype else t


class _FusedRNNBase:
    """The forward shared by LSTM, GRU and RNN; mixed in before the torch.nn class it replaces."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    # ---- argument checks: torch's rules and exception types, messages that name the module --------
    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        w = self.weight_ih_l0
        if x.dtype != w.dtype and not _autocast(x):
            raise ValueError(f"{name}: input dtype ({x.dtype}) does not match weight dtype ({w.dtype}). Convert "
                             f"input: input.to({w.dtype}), or convert model: model.to({x.dtype})")
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {x.shape[-1]}")

    def _check_state(self, what: str, t: Tensor, expected: tuple) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{type(self).__name__}: {what} must be a Tensor, got {type(t).__name__}")
        if tuple(t.shape) != expected:
            raise RuntimeError(f"{type(self).__name__}: expected {what} of size {expected} "
                               f"(num_layers * num_directions, batch, features), got {list(t.shape)}")

    def _initial_states(self, hx, x: Tensor, batched: bool, packed: bool):
        """(h0 [L*D, B, S], c0 [L*D, B, H] or None), as torch's hx in the user's batch order."""
        name, lstm = type(self).__name__, self.mode == "LSTM"
        layers = self.num_layers * (2 if self.bidirectional else 1)
        batch = x.shape[1]
        state = self.proj_size if self.proj_size > 0 else self.hidden_size
        if hx is None:
            h0 = x.new_zeros(layers, batch, state)
            return h0, (x.new_zeros(layers, batch, self.hidden_size) if lstm else None)
        if lstm:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        rank = 3 if batched else 2
        for what, t in (("hx", h0), ("cx", c0)):
            if t is not None and not isinstance(t, Tensor):
                raise TypeError(f"{name}: {what} must be a Tensor, got {type(t).__name__}")
            if t is not None and t.dim() != rank and not packed:
                raise RuntimeError(f"{name}: for {'batched 3-D' if batched else 'unbatched 2-D'} input, {what} "
                                   f"should also be {rank}-D but got {t.dim()}-D tensor")
            if t is not None and (t.dtype != x.dtype and not _autocast(x) or t.device != x.device):
                raise RuntimeError(f"{name}: input and {what} must have the same dtype and device, got input "
                                   f"{x.dtype} on {x.device} and {what} {t.dtype} on {t.device}")
        if not batched:
            h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if c0 is not None else None)
        self._check_state("hidden[0]" if lstm else "hidden", h0, (layers, batch, state))
        if lstm:
            self._check_state("hidden[1]", c0, (layers, batch, self.hidden_size))
        return h0, c0

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, input, hx=None, *, lengths: Optional[Tensor] = None):
        """torch.nn's forward: (output, h_n) or, for LSTM, (output, (h_n, c_n)); a PackedSequence in
        gives a PackedSequence out.

        ``lengths`` (an extension, keyword only): [B] ints (an int64 / int32 tensor or a list, as
        pack_padded_sequence takes them), for a padded batched input: sequence b
        runs over its first lengths[b] steps, exactly as if packed (h_n is the state after its own
        last step; the reverse direction starts there), and its output is zero past its length.
        The same result as pack_padded_sequence -> forward -> pad_packed_sequence, without the sort
        and copies, and traceable by torch.compile(fullgraph=True)."""
        if (lengths is None and self.backend is None and type(input) in PLAIN_TENSORS and input.dim() == 3
                and self.proj_size == 0 and not (self.training and self.dropout > 0)):
            lane = self._lane(input, hx)  # a plain inference call: ops.rnn.stack_lane
            if lane is not None:
                return lane
        name = type(self).__name__
        packed = isinstance(input, PackedSequence)
        sorted_indices = unsorted_indices = None
        if lengths is not None:
            lengths = self._check_lengths(input, lengths)
        elif self._runs_torch(input):
            return super().forward(input, hx)
        batched = True
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if data.dim() != 2:
                raise RuntimeError(f"{name}: packed input data must have 2 dimensions, got {data.dim()}")
            self._check_input(data)
            x, lengths = _unpack(data, batch_sizes)  # [T, B, F], in the sorted order
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            self._check_input(input)
            batched = input.dim() == 3
            if not batched:
                x = input.unsqueeze(1)  # [T, 1, F]: batch_first does not apply to unbatched input
            else:
                x = input.transpose(0, 1) if self.batch_first else input  # [T, B, F]
        if x.shape[0] == 0:
            raise ValueError(f"{name}: input has no time steps (shape {tuple(x.shape)})")

        h0, c0 = self._initial_states(hx, x, batched, packed)
        if sorted_indices is not None:  # the states of the user's sequences, in the packed order
            h0 = h0.index_select(1, sorted_indices)
            c0 = c0.index_select(1, sorted_indices) if c0 is not None else None

        output, h_n, c_n = self._layers(x, h0, c0, lengths)

        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
            c_n = c_n.index_select(1, unsorted_indices) if c_n is not None else None
        if packed:
            output = PackedSequence(_pack(output, batch_sizes), batch_sizes, sorted_indices, unsorted_indices)
        elif not batched:
            output, h_n = output.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, ((h_n, c_n) if c_n is not None else h_n)

    def _lane(self, input: Tensor, hx):
        """forward's result by ops.rnn.stack_lane for a batched 3-d input, or None (the general path)."""
        self._check_input(input)
        x = input.transpose(0, 1) if self.batch_first else input  # [T, B, F]
        h0, c0 = self._initial_states(hx, x, True, False)
        out = stack_lane(_MODES[self.mode], x, [getattr(self, n) for n in self._flat_weights_names], h0, c0,
                         self.num_layers, self.bidirectional)
        if out is None:
            return None
        output, h_n, c_n = out
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, ((h_n, c_n) if c_n is not None else h_n)

    def _check_lengths(self, input, lengths) -> Tensor:
        return _check_lengths(type(self).__name__, self.batch_first, input, lengths)

    def _runs_torch(self, input) -> bool:
        """Whether this call goes to torch.nn's own forward: when no fused backend takes the input's
        dtype on its device (float64, float16 on the CPU), torch's implementation rather than the
        project's reference (a Python loop over steps, 1.6-2.4x slower than it), recorded as a
        fallback. A backend asked for by name is left to raise (or, "torch", to run the reference)."""
        data = input.data if isinstance(input, PackedSequence) else input
        if not isinstance(data, Tensor) or data.dtype != self.weight_ih_l0.dtype or _autocast(data):
            return False  # (a dtype mismatch is refused by the checks, with the module's message)
        name, named, reasons = _backend.plan(RNN_OP, data.device, data.dtype, self.backend)
        if name is not None or named:
            return False
        _backend.record_fallback(RNN_OP.name, reasons[0][0] if reasons else "-",
                                 f"{reasons[0][1] if reasons else data.device}: ran torch.nn.{type(self).__name__}'s "
                                 "own forward")
        return True

    def _layers(self, x: Tensor, h0: Tensor, c0: Optional[Tensor], lengths: Optional[Tensor]):
        """The stack on time-major x [T, B, F]: (output [T, B, D*S], h_n [L*D, B, S], c_n or None)."""
        # the parameters by name, not the cached self._flat_weights: torch.func.functional_call swaps them
        weights = [getattr(self, name) for name in self._flat_weights_names]
        return recurrent_stack(_MODES[self.mode], x, weights, h0, c0, lengths, self.num_layers, self.bidirectional,
                               self.dropout, self.training, self.backend)

    @classmethod
    def from_torch(cls, module, *, backend: Optional[str] = None):
        """A bignlp_fast module sharing ``module``'s parameters (the same Parameter objects)."""
        kwargs = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                      dropout=module.dropout, bidirectional=module.bidirectional)
        if module.mode == "LSTM":
            kwargs["proj_size"] = module.proj_size
        if module.mode.startswith("RNN_"):
            kwargs["nonlinearity"] = module.nonlinearity
        with warnings.catch_warnings():  # torch warned about dropout with one layer when `module` was built
            warnings.simplefilter("ignore")
            new = cls(module.input_size, module.hidden_size, **kwargs, device="meta", backend=backend)
        for name in module._flat_weights_names:
            setattr(new, name, getattr(module, name))
        new._init_flat_weights()
        return new.train(module.training)


class LSTM(_FusedRNNBase, torch.nn.LSTM):
    """torch.nn.LSTM with the same constructor (``proj_size`` included), parameters, state_dict keys
    and forward (batch_first, unbatched 2-D input, PackedSequence, bidirectional, dropout), running
    bignlp_fast.ops.rnn_layer per layer and direction. ``backend`` (keyword only) pins the op's
    backend; None chooses automatically. Dropout draws its masks from torch's generator but not in
    torch's order, so training with dropout does not reproduce torch's numbers. torch.compile with
    ``fullgraph=True`` needs ``torch._dynamo.config.allow_rnn = True`` (see the module docstring)."""


class GRU(_FusedRNNBase, torch.nn.GRU):
    """torch.nn.GRU, running bignlp_fast.ops.rnn_layer (see :class:`LSTM`)."""


class RNN(_FusedRNNBase, torch.nn.RNN):
    """torch.nn.RNN (nonlinearity "tanh" or "relu"), running bignlp_fast.ops.rnn_layer (see :class:`LSTM`)."""


# ---- cells: one step, through the same op with T = 1 --------------------------------------------------
class _FusedCellBase:
    _mode: str = ""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def _mode_name(self) -> str:
        return self._mode if self._mode else f"rnn_{self.nonlinearity}"

    def _step(self, input: Tensor, hx, lstm: bool):
        if self.backend is None:  # a plain inference call: one call of the extension (ops.rnn.cell_lane)
            lane = cell_lane(self._mode_name(), input, hx, lstm, self.weight_ih, self.weight_hh, self.bias_ih,
                             self.bias_hh)
            if lane is not None:
                return lane
        name = type(self).__name__
        if not isinstance(input, Tensor) or input.dim() not in (1, 2):
            shape = f"{input.dim()}D" if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {shape} instead")
        if lstm and hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError(f"{name}: hx must be a tuple (h, c), got {type(hx).__name__}")
        states = (tuple(hx) if lstm else (hx,)) if hx is not None else None
        if states is not None:
            for i, t in enumerate(states):
                if not isinstance(t, Tensor) or t.dim() not in (1, 2):
                    shape = f"{t.dim()}D" if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"{name}: Expected hx[{i}] to be 1D or 2D, got {shape} instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if x.shape[1] != self.input_size:
            raise RuntimeError(f"{name}: input has inconsistent input_size: got {x.shape[1]} expected "
                               f"{self.input_size}")
        if x.dtype != self.weight_ih.dtype and not _autocast(x):
            raise ValueError(f"{name}: input dtype ({x.dtype}) does not match weight dtype ({self.weight_ih.dtype})")
        b = x.shape[0]
        if states is None:
            zeros = x.new_zeros(b, self.hidden_size)
            states = (zeros, zeros) if lstm else (zeros,)
        elif not batched:
            states = tuple(t.unsqueeze(0) for t in states)
        for i, t in enumerate(states):
            if tuple(t.shape) != (b, self.hidden_size):
                raise RuntimeError(f"{name}: hx[{i}] must have shape {(b, self.hidden_size)} (batch, hidden_size), "
                                   f"got {tuple(t.shape)}")
            if t.dtype != x.dtype and not _autocast(x) or t.device != x.device:
                raise RuntimeError(f"{name}: input and hx[{i}] must have the same dtype and device, got input "
                                   f"{x.dtype} on {x.device} and hx[{i}] {t.dtype} on {t.device}")
        # [1, B, G*H], on the faster GEMM for this input (the rule of the layers' projections)
        xw = input_projection(x, self.weight_ih, self.bias_ih, self.backend, defer_bias=False)[0].unsqueeze(0)
        w_hh, b_hh = self.weight_hh, self.bias_hh
        if _autocast(xw):  # the step runs in the dtype autocast gave the projection
            w_hh, b_hh = _cast(w_hh, xw.dtype), _cast(b_hh, xw.dtype)
            states = tuple(_cast(t, xw.dtype) for t in states)
        _, h, c = rnn_layer(self._mode_name(), xw, w_hh, b_hh, states[0], states[1] if lstm else None,
                            backend=self.backend)
        if not batched:
            h, c = h.squeeze(0), (c.squeeze(0) if c is not None else None)
        return (h, c) if lstm else h

    @classmethod
    def from_torch(cls, module, *, backend: Optional[str] = None):
        """A bignlp_fast cell sharing ``module``'s parameters."""
        kwargs = {"nonlinearity": module.nonlinearity} if hasattr(module, "nonlinearity") else {}
        new = cls(module.input_size, module.hidden_size, module.bias, **kwargs, device="meta", backend=backend)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            setattr(new, name, getattr(module, name))
        return new.train(module.training)


class LSTMCell(_FusedCellBase, torch.nn.LSTMCell):
    """torch.nn.LSTMCell: forward(input, (h, c) or None) -> (h', c'), through rnn_layer with T = 1."""

    _mode = "lstm"

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        return self._step(input, hx, lstm=True)


class GRUCell(_FusedCellBase, torch.nn.GRUCell):
    """torch.nn.GRUCell: forward(input, h or None) -> h', through rnn_layer with T = 1."""

    _mode = "gru"

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx, lstm=False)


class RNNCell(_FusedCellBase, torch.nn.RNNCell):
    """torch.nn.RNNCell (tanh or relu): forward(input, h or None) -> h', through rnn_layer with T = 1."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx, lstm=False)


# ---- LayerNormLSTM ----------------------------------------------------------------------------------
class LayerNormLSTM(torch.nn.Module):
    """An LSTM with layer normalisation (Ba et al., 2016) on the gate pre-activations and the cell::

        gates = ln_ih(x W_ih^T) + ln_hh(h W_hh^T)          # [B, 4H]: i, f, g, o as in torch.nn.LSTM
        c'    = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h'    = sigmoid(o) * tanh(ln_c(c'))

    The shifts of ln_ih and ln_hh play the role of the gate biases (``bias=False``: LayerNorms without
    a shift). Parameters per layer ``k`` and direction (suffix ``_reverse``): ``weight_ih_l{k}``
    [4H, in], ``weight_hh_l{k}`` [4H, H], and LayerNorm modules ``ln_ih_l{k}``, ``ln_hh_l{k}`` (4H)
    and ``ln_c_l{k}`` (H). forward(input, hx=None) takes [T, B, F] ([B, T, F] with batch_first) or an
    unbatched [T, F], and hx = (h_0, c_0) each [L*D, B, H] (or [L*D, H] unbatched); it returns
    (output [T, B, D*H], (h_n, c_n)) like torch.nn.LSTM; a PackedSequence, or ``lengths=`` on a padded
    batch, runs each sequence over its own steps (as :class:`LSTM`).

    Each layer and direction is one GEMM and one LayerNorm over every step for the input side
    (``ops.linear``, ``ops.add_layer_norm``), then one ``ops.layer_norm_lstm_layer`` call that runs the
    time loop with both other LayerNorms fused into each step (the cpu kernel; elsewhere the torch
    reference, a Python loop over steps, recorded as a fallback).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, eps: float = 1e-5,
                 device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__()
        if not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(f"LayerNormLSTM: dropout must be a probability in [0, 1], got {dropout}")
        if hidden_size <= 0 or num_layers <= 0 or input_size <= 0:
            raise ValueError(f"LayerNormLSTM: input_size, hidden_size and num_layers must be positive, got "
                             f"{input_size}, {hidden_size}, {num_layers}")
        factory = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.backend = bidirectional, backend
        directions = 2 if bidirectional else 1
        self._suffixes = []
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size * directions
            for direction in range(directions):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                self._suffixes.append(sfx)
                self.register_parameter("weight_ih" + sfx,
                                        torch.nn.Parameter(torch.empty(4 * hidden_size, in_size, **factory)))
                self.register_parameter("weight_hh" + sfx,
                                        torch.nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **factory)))
                self.add_module("ln_ih" + sfx, torch.nn.LayerNorm(4 * hidden_size, eps, bias=bias, **factory))
                self.add_module("ln_hh" + sfx, torch.nn.LayerNorm(4 * hidden_size, eps, bias=bias, **factory))
                self.add_module("ln_c" + sfx, torch.nn.LayerNorm(hidden_size, eps, bias=bias, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights uniform in +-1/sqrt(hidden_size) as torch.nn.LSTM; LayerNorms at scale 1, shift 0."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if name.startswith("weight_"):
                torch.nn.init.uniform_(p, -bound, bound)
        for m in self.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.reset_parameters()

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for k, default in (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0),
                           ("bidirectional", False)):
            if getattr(self, k) != default:
                s += f", {k}={getattr(self, k)}"
        return s

    def _direction(self, sfx: str, xs: Tensor, h: Tensor, c: Tensor, lengths: Optional[Tensor], reverse: bool):
        """One layer, one direction over time-major xs [T, B, F]: (out [T, B, H], h_n, c_n)."""
        ln_ih, ln_hh, ln_c = (getattr(self, n + sfx) for n in ("ln_ih", "ln_hh", "ln_c"))
        # [T, B, 4H]: every step
        xw, _ = input_projection(xs, getattr(self, "weight_ih" + sfx), None, self.backend, defer_bias=False)
        xw, _ = add_layer_norm(xw, None, ln_ih.weight, ln_ih.bias, ln_ih.eps, backend=self.backend)
        return layer_norm_lstm_layer(xw, getattr(self, "weight_hh" + sfx), ln_hh.weight, ln_hh.bias, ln_c.weight,
                                     ln_c.bias, h, c, ln_hh.eps, reverse, lengths, backend=self.backend)

    def forward(self, input, hx: Optional[tuple[Tensor, Tensor]] = None, *, lengths: Optional[Tensor] = None):
        """As torch.nn.LSTM's forward: (output, (h_n, c_n)); a PackedSequence in gives a PackedSequence
        out. ``lengths`` (keyword only, as for :class:`LSTM`): [B] ints for a padded batched input,
        the same result as packing it, without the sort and copies."""
        name = "LayerNormLSTM"
        packed = isinstance(input, PackedSequence)
        sorted_indices = unsorted_indices = None
        if lengths is not None:
            lengths = _check_lengths(name, self.batch_first, input, lengths)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if data.dim() != 2:
                raise RuntimeError(f"{name}: packed input data must have 2 dimensions, got {data.dim()}")
            input = data
        if not isinstance(input, Tensor) or input.dim() not in (2, 3):
            got = f"{input.dim()}D tensor" if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {got} instead")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {input.shape[-1]}")
        batched = packed or input.dim() == 3
        if packed:
            x, lengths = _unpack(data, batch_sizes)  # [T, B, F], in the sorted order
        else:
            x = (input.transpose(0, 1) if self.batch_first else input) if batched else input.unsqueeze(1)  # [T, B, F]
        if x.shape[0] == 0:
            raise ValueError(f"{name}: input has no time steps (shape {tuple(input.shape)})")
        layers = len(self._suffixes)
        shape = (layers, x.shape[1], self.hidden_size)
        if hx is None:
            h0 = c0 = x.new_zeros(shape)
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
            h0, c0 = hx
            for what, t in (("hidden[0]", h0), ("hidden[1]", c0)):
                if not isinstance(t, Tensor) or t.dim() != (3 if batched else 2):
                    raise RuntimeError(f"{name}: {what} must be a {3 if batched else 2}-D tensor for "
                                       f"{'batched 3-D' if batched else 'unbatched 2-D'} input")
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            for what, t in (("hidden[0]", h0), ("hidden[1]", c0)):
                if tuple(t.shape) != shape:
                    raise RuntimeError(f"{name}: expected {what} of size {shape}, got {list(t.shape)}")
            if sorted_indices is not None:  # the states of the user's sequences, in the packed order
                h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
        layer_input, h_n, c_n = stack_layers(
            x, self.num_layers, 2 if self.bidirectional else 1, self.dropout, self.training,
            lambda k, inp, reverse: self._direction(self._suffixes[k], inp, h0[k], c0[k], lengths, reverse=reverse))
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if unsorted_indices is not None:
            h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
        if packed:
            return PackedSequence(_pack(layer_input, batch_sizes), batch_sizes, sorted_indices, unsorted_indices), \
                (h_n, c_n)
        if not batched:
            return layer_input.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (layer_input.transpose(0, 1) if self.batch_first else layer_input), (h_n, c_n)
