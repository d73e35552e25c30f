"""Empty batches through the CPU kernels: torch's shapes, values and (zero) gradients, never a crash.

A batch of zero rows used to reach task planners that divide by the number of row blocks (the packed
GEMM behind ops.linear's backward and the RNN layers' weight gradients: SIGFPE), and a view of zero
elements with a -1 size (nn.LayerNorm reshaped with one until session 27). conv1d / conv2d are covered in test_conv.py (test_cpu_empty_inputs). The
distillation loss, a mean over rows, refuses an empty batch with a clear error (torch's gives NaN).
"""
import pytest
import torch

from bignlp_fast import ops
from bignlp_fast.nn import GELU, GRU, LSTM, LayerNorm, MultiheadAttention
from conftest import backend_params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_zero_rows(dtype):
    x = torch.randn(0, 512, dtype=dtype, requires_grad=True)
    w = torch.randn(256, 512, dtype=dtype, requires_grad=True)
    b = torch.randn(256, dtype=dtype, requires_grad=True)
    y = ops.linear(x, w, b, backend="cpu")
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("cls,ref", [(LSTM, torch.nn.LSTM), (GRU, torch.nn.GRU)])
def test_rnn_zero_batch(cls, ref):
    ours, theirs = cls(16, 12, num_layers=2, bidirectional=True), ref(16, 12, num_layers=2, bidirectional=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 0, 16, requires_grad=True)
    y, state = ours(x)
    y_ref, state_ref = theirs(x)
    assert y.shape == y_ref.shape
    for a, c in zip(state if isinstance(state, tuple) else [state], state_ref if isinstance(state_ref, tuple) else [state_ref]):
        assert a.shape == c.shape
    y.sum().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in ours.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape_q,shape_k", [((0, 2, 16, 32), (0, 2, 16, 32)), ((2, 2, 0, 32), (2, 2, 5, 32))])
def test_attention_empty(shape_q, shape_k, dtype):
    """An empty batch made the backward's chunk planner divide by zero heads (SIGFPE in bf16)."""
    q = torch.randn(shape_q, dtype=dtype, requires_grad=True)
    k = torch.randn(shape_k, dtype=dtype, requires_grad=True)
    v = torch.randn(shape_k, dtype=dtype, requires_grad=True)
    y = ops.scaled_dot_product_attention(q, k, v, backend="cpu")
    torch.testing.assert_close(y, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    y.sum().backward()
    assert q.grad.shape == q.shape and torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("shape_q,shape_k", [((3, 2, 2, 0, 8), (3, 2, 2, 5, 8)), ((3, 2, 2, 4, 8), (3, 2, 2, 0, 8)),
                                             ((2, 0, 8), (2, 5, 8))])
def test_attention_broadcast_empty(backend, shape_q, shape_k):
    """Leading dimensions other than [B, H] folded into the batch with reshape(-1, ...), which a tensor
    of zero elements cannot infer: no queries, or no keys (torch's answer: zeros), with a mask too."""
    q = torch.randn(shape_q, requires_grad=True)
    k, v = torch.randn(shape_k, requires_grad=True), torch.randn(shape_k, requires_grad=True)
    mask = torch.ones(shape_q[-2], shape_k[-2], dtype=torch.bool)
    for m in (None, mask):
        y = ops.scaled_dot_product_attention(q, k, v, m, backend=backend)
        torch.testing.assert_close(y, torch.nn.functional.scaled_dot_product_attention(q, k, v, m))
        y.sum().backward()
        assert q.grad.shape == q.shape and not k.grad.any() and not v.grad.any()


def test_multihead_attention_empty_batch_under_autocast():
    """bf16 autocast sends an empty batch through the bf16 kernels, forward and backward."""
    mha = MultiheadAttention(32, 4, batch_first=True, backend="cpu")
    x = torch.randn(0, 6, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = mha(x, x, x, need_weights=False)
    assert y.shape == (0, 6, 32)
    y.float().sum().backward()
    assert x.grad.shape == x.shape and torch.equal(mha.in_proj_weight.grad, torch.zeros_like(mha.in_proj_weight))


@pytest.mark.parametrize("shape,normalized_shape", [((0, 8), 8), ((2, 0, 8), 8), ((0, 3, 4), (3, 4))])
def test_layer_norm_module_empty(shape, normalized_shape):
    ref = torch.nn.LayerNorm(normalized_shape)
    ours = LayerNorm(normalized_shape, backend="cpu")
    x = torch.randn(shape, requires_grad=True)
    y = ours(x)
    torch.testing.assert_close(y, ref(x))
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(ours.weight.grad, torch.zeros_like(ours.weight))
    out, total = ours(x, torch.randn(shape))
    assert out.shape == total.shape == x.shape


@pytest.mark.parametrize("backend,device", backend_params("cpu", "cuda", "triton", "torch"))
@pytest.mark.parametrize("shape", [(3, 0), (0, 8), (2, 0, 0)])
def test_bias_gelu_empty(backend, device, shape):
    """A hidden size of 0 divided the CPU kernel's row grain by zero (SIGFPE)."""
    x = torch.randn(shape, device=device, requires_grad=True)
    bias = torch.randn(shape[-1], device=device, requires_grad=True)
    y = ops.bias_gelu(x, bias, backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and bias.grad.shape == bias.shape and not bias.grad.any()
    assert GELU(backend=backend)(x.detach()).shape == x.shape


def test_distillation_loss_empty_is_a_clear_error():
    s, t = torch.randn(0, 50, requires_grad=True), torch.randn(0, 50)
    with pytest.raises(ValueError, match="empty logits"):
        ops.distillation_loss(s, t, torch.zeros(0, dtype=torch.long), backend="cpu")
