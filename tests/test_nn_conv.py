import pytest
import torch
import torch.nn.functional as F

import bignlp_fast.nn as bnn
from bignlp_fast.ops.text_cnn_pool import text_cnn_pool_eager


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, "same", "valid"])
def test_conv1d_loads_torch_state_dict_and_matches(padding_mode, padding):
    if padding == "valid" and padding_mode != "zeros":
        pytest.skip("no padding to fill")
    torch.manual_seed(0)
    ref = torch.nn.Conv1d(6, 8, 4, padding=padding, padding_mode=padding_mode, dilation=2 if padding == "same" else 1)
    ours = bnn.Conv1d(6, 8, 4, padding=padding, padding_mode=padding_mode,
                      dilation=2 if padding == "same" else 1, activation="gelu")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 6, 17, requires_grad=True)
    r = torch.randn_like(ref(x))
    y = ours(x, r)
    torch.testing.assert_close(y, F.gelu(ref(x)) + r, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    (gx_ref,) = torch.autograd.grad((F.gelu(ref(x)) + r).sum(), [x])
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_conv2d_drop_in_without_activation():
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=2, bias=False)
    ours = bnn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=2, bias=False)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 9, 7)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    relu = bnn.Conv2d.from_torch(ref, activation="relu")
    assert relu.weight is ref.weight
    torch.testing.assert_close(relu(x), F.relu(ref(x)), rtol=1e-5, atol=1e-5)


def test_conv2d_keeps_a_channels_last_layout():
    ref = torch.nn.Conv2d(4, 6, 3, padding=1)
    ours = bnn.Conv2d(4, 6, 3, padding=1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 7, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    got, want = ours(x), ref(x)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(want.square().sum(), x)[0], rtol=1e-4, atol=1e-5)
    assert ours(x.contiguous()).is_contiguous()  # and an NCHW input stays NCHW


def test_text_cnn_block():
    torch.manual_seed(0)
    block = bnn.TextCNN(12, 5, widths=(2, 3, 4))
    assert block.out_features == 15
    assert set(block.state_dict()) == {f"convs.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    x, lengths = torch.randn(4, 10, 12), torch.tensor([10, 4, 7, 6])
    expected = text_cnn_pool_eager(x, [c.weight for c in block.convs], [c.bias for c in block.convs], "relu", lengths)
    torch.testing.assert_close(block(x, lengths), expected, rtol=1e-5, atol=1e-5)
    block(x, lengths).sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        bnn.Conv1d(2, 2, 3, activation="prelu")
