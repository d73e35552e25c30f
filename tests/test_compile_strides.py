"""torch.compile (inductor) of the ops on non-contiguous inputs, forward and backward.

The kernels make their inputs contiguous and return contiguous outputs; each op's fake (meta)
function must say so (ops._common.fresh_like), since inductor's compiled code checks every real
output against the fake's sizes and strides. Fakes that copied a non-contiguous input's strides
(torch.empty_like) made these fail with "expected size ... stride ..." while eager ran: a transposed
weight reaches ops.linear from every GPT-2 Conv1D ([in, out] weights), so a compiled GPT training
step failed on CPUs where ops.linear is the faster GEMM.
"""
import pytest
import torch

from bignlp_fast import ops


def _leaf(*shape):
    return torch.randn(*shape, requires_grad=True)


CASES = {
    # name: (leaves, function of the leaves; every op gets a transposed view)
    "bias_gelu": (lambda: [_leaf(32, 9), _leaf(32)], lambda x, b: ops.bias_gelu(x.t(), b)),
    "add_layer_norm": (lambda: [_leaf(32, 9), _leaf(9, 32), _leaf(32)],
                       lambda x, r, w: torch.cat(ops.add_layer_norm(x.t(), r, w, None), 1)),
    "linear": (lambda: [_leaf(5, 32), _leaf(32, 48), _leaf(48)], lambda x, w, b: ops.linear(x, w.t(), b)),
    "rnn_layer": (lambda: [_leaf(3, 5, 64), _leaf(16, 64), _leaf(3, 16)],
                  lambda xw, w, h0: ops.rnn_layer("lstm", xw.transpose(0, 1), w.t(), None, h0, h0 * 0.5)[0]),
    "layer_norm_lstm_layer": (lambda: [_leaf(3, 5, 64), _leaf(16, 64), _leaf(3, 16)],
                              lambda xw, w, h0: ops.layer_norm_lstm_layer(xw.transpose(0, 1), w.t(), None, None, None,
                                                                          None, h0, h0 * 0.5)[0]),
    "distillation_loss": (lambda: [_leaf(11, 4)], lambda s: ops.distillation_loss(s.t(), s.t().detach().flip(0))),
    "conv1d": (lambda: [_leaf(2, 6, 9), _leaf(3, 4, 6)], lambda x, w: ops.conv1d(x, w.permute(1, 2, 0), padding=1)),
    "depthwise_conv1d_x_as_blc": (lambda: [_leaf(2, 9, 6), _leaf(6, 1, 3)],  # x read [B, L, C] as it is
                                  lambda x, w: ops.conv1d(x.transpose(1, 2), w, padding=1, groups=6,
                                                          activation="silu")),
    "conv2d_channels_last": (lambda: [_leaf(2, 6, 5, 7), _leaf(4, 6, 3, 3), _leaf(4)],  # kept channels_last
                             lambda x, w, b: ops.conv2d(x.contiguous(memory_format=torch.channels_last), w, b,
                                                        padding=1, activation="gelu")),
    "causal_conv1d": (lambda: [_leaf(2, 6, 9), _leaf(4, 6)], lambda x, w: ops.causal_conv1d(x, w.t(), None, "silu")),
    "causal_conv1d_x_as_blc": (lambda: [_leaf(2, 9, 6), _leaf(3, 6)],  # read and answered [B, L, C]
                               lambda x, w: ops.causal_conv1d(x.transpose(1, 2), w.t(), None, "silu")),
    "text_cnn_pool": (lambda: [_leaf(2, 9, 6), _leaf(3, 6, 5)],
                      lambda x, w: ops.text_cnn_pool(x, [w.permute(2, 1, 0)], None)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_op_on_non_contiguous_inputs_matches_eager(name):
    make, fn = CASES[name]
    leaves = make()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    got, want = compiled(*leaves), fn(*leaves)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), leaves)
    for g, r in zip(grads, torch.autograd.grad(want.square().sum(), leaves)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_compiled_gpt_training_step_with_ops_linear_on_conv1d_weights(monkeypatch):
    """GPT-2's projections are [in, out] weights multiplied as weight.t(); with ops.linear chosen for
    them (as on a CPU where it is the faster GEMM) a compiled training step matches eager."""
    import importlib

    from bignlp_fast.models import GPTConfig, GPTLMHeadModel
    linear_module = importlib.import_module("bignlp_fast.ops.linear")
    monkeypatch.setattr(linear_module, "linear_is_faster", lambda x, w, prepacked=None: x.device.type == "cpu")
    torch.manual_seed(0)
    model = GPTLMHeadModel(GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=4, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0))  # training mode, no dropout
    ids = torch.randint(0, 50, (2, 8))
    torch._dynamo.reset()
    loss = torch.compile(model, fullgraph=True)(ids, labels=ids).loss
    loss.backward()
    grad = model.transformer.h[0].attn.c_attn.weight.grad.clone()
    model.zero_grad()
    want = model(ids, labels=ids).loss
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, model.transformer.h[0].attn.c_attn.weight.grad, rtol=1e-4, atol=1e-5)
