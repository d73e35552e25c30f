"""The eager lanes of add_layer_norm, scaled_dot_product_attention and the recurrent cells: plain
inference calls on CPU tensors go straight to the CPU kernel, skipping the general path's checks,
choice and route.

Two things are tested: where a lane is taken it gives exactly what the general path gives (which
test_add_layer_norm.py and test_attention.py compare with float64 references); and every condition
it rests on sends a call back to the general path when it does not hold."""

import importlib

import pytest
import torch

import bignlp_fast
from bignlp_fast import _backend
from bignlp_fast.nn.normalization import TORCH_BELOW_NUMEL
from bignlp_fast.ops import add_layer_norm, scaled_dot_product_attention

pytestmark = pytest.mark.skipif(_backend.unavailable("cpu", torch.device("cpu")) is not None,
                                reason="needs the CPU kernels")
aln = importlib.import_module("bignlp_fast.ops.add_layer_norm")
attn = importlib.import_module("bignlp_fast.ops.attention")
rnn = importlib.import_module("bignlp_fast.ops.rnn")
nn_rnn = importlib.import_module("bignlp_fast.nn.rnn")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- add_layer_norm ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (1, 1, 768), (2, 3, 129)], ids=str)
@pytest.mark.parametrize("residual,weight,bias", [(True, True, True), (False, True, True), (True, False, False),
                                                  (False, True, False)])
def test_add_layer_norm_lane_equals_the_general_path(dtype, shape, residual, weight, bias):
    g = _g()
    h = shape[-1]
    x = torch.randn(shape, generator=g).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    w = torch.randn(h, generator=g).to(dtype) if weight else None
    b = torch.randn(h, generator=g).to(dtype) if bias else None
    with torch.no_grad():
        assert aln._lane(x, r, w, b, 1e-5, None) is not None
        lane = add_layer_norm(x, r, w, b, 1e-5)
        general = add_layer_norm(x, r, w, b, 1e-5, backend="cpu")  # named: the lane is not taken
    assert lane[0].shape == x.shape and torch.equal(lane[0], general[0])
    assert torch.equal(lane[1], general[1])
    if r is None:
        assert lane[1] is x  # the second output is x itself, as on the general path


def test_layer_norm_module_takes_the_lane(monkeypatch):
    ln = bignlp_fast.nn.LayerNorm(64)
    x = torch.randn(2, TORCH_BELOW_NUMEL // 128, 64, generator=_g())  # (smaller: torch's own layer_norm)
    taken = []
    real = aln._lane
    monkeypatch.setattr(aln, "_lane", lambda *a: taken.append(real(*a) is not None) or real(*a))
    with torch.no_grad():
        out = ln(x)
    assert taken == [True]
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (64,), ln.weight, ln.bias), rtol=1e-5,
                               atol=1e-5)
    ln(x)  # parameters that require grad, grad on: the general path, which autograd records
    assert taken[-1] is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_module_leaves_small_cpu_inputs_to_torch(monkeypatch, dtype):
    """Below TORCH_BELOW_NUMEL elements, without a residual or a named backend, nn.LayerNorm is torch's
    own layer_norm: the same tensor bit for bit, gradients included, and our op is not called; from
    that size on, with a residual or with a backend, it is."""
    nn_ln = importlib.import_module("bignlp_fast.nn.normalization")
    calls = []
    real = nn_ln.add_layer_norm
    monkeypatch.setattr(nn_ln, "add_layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = _g(6)
    ln = bignlp_fast.nn.LayerNorm(64).to(dtype)
    ref = torch.nn.LayerNorm(64).to(dtype)
    with torch.no_grad():
        for p, q in zip(ln.parameters(), ref.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
            q.copy_(p)
    x = torch.randn(3, TORCH_BELOW_NUMEL // 64 // 3 - 1, 64, generator=g).to(dtype).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    out, expected = ln(x), ref(xr)
    assert torch.equal(out, expected) and calls == []
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(x.grad, xr.grad) and torch.equal(ln.weight.grad, ref.weight.grad)
    with torch.no_grad():
        ln(torch.randn(2, TORCH_BELOW_NUMEL // 128, 64, generator=g).to(dtype))  # at the bound: ours
        assert len(calls) == 1
        ln(x, residual=x)
        assert len(calls) == 2
        bignlp_fast.nn.LayerNorm(64, backend="cpu").to(dtype)(x)
        assert len(calls) == 3


class _Sub(torch.Tensor):
    pass


def _ln_args():
    g = _g(1)
    return [torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g), torch.randn(16, generator=g),
            torch.randn(16, generator=g), 1e-5, None]


@pytest.mark.parametrize("change", [
    "backend", "eps_negative", "eps_tensor", "x_grad", "weight_grad", "x_noncontiguous", "residual_dtype",
    "residual_shape", "weight_dtype", "weight_size", "x_float64", "x_int", "x_meta", "bias_2d", "eps_nan",
    "x_scalar", "x_empty_rows_ok", "bias_subclass"])
def test_add_layer_norm_lane_refuses(change):
    args = _ln_args()
    x = args[0]
    if change == "backend":
        args[5] = "cpu"
    elif change == "eps_negative":
        args[4] = -1.0
    elif change == "eps_tensor":
        args[4] = torch.tensor(1e-5)
    elif change == "x_grad":
        args[0] = x.requires_grad_()
    elif change == "weight_grad":
        args[2] = args[2].requires_grad_()
    elif change == "x_noncontiguous":
        args[0] = torch.randn(16, 2).t()
    elif change == "residual_dtype":
        args[1] = args[1].double()
    elif change == "residual_shape":
        args[1] = args[1][:1]
    elif change == "weight_dtype":
        args[2] = args[2].bfloat16()
    elif change == "weight_size":
        args[2] = args[2][:8]
    elif change == "x_float64":
        args[0], args[1], args[2], args[3] = (t.double() for t in args[:4])
    elif change == "x_int":
        args[0] = x.long()
    elif change == "x_meta":
        args[0] = x.to("meta")
    elif change == "bias_2d":
        args[3] = args[3][None]
    elif change == "eps_nan":
        args[4] = float("nan")
    elif change == "x_scalar":
        args[0], args[1], args[2], args[3] = torch.tensor(1.0), None, None, None
    elif change == "x_empty_rows_ok":  # no rows is still the plain case: empty outputs from the lane
        args[0], args[1] = x[:0], args[1][:0]
        lane = aln._lane(*args)
        assert lane is not None and lane[0].shape == (0, 16)
        return
    elif change == "bias_subclass":
        args[3] = args[3].as_subclass(_Sub)
    assert aln._lane(*args) is None


def test_add_layer_norm_lane_refuses_by_state(monkeypatch):
    args = _ln_args()
    assert aln._lane(*args) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert aln._lane(*args) is None
    with torch.autograd.profiler.profile():
        assert aln._lane(*args) is None
    monkeypatch.setenv("BIGNLP_FAST_BACKEND", "torch")
    assert aln._lane(*args) is None
    monkeypatch.setenv("BIGNLP_FAST_BACKEND", "cpu")
    assert aln._lane(*args) is not None


def test_add_layer_norm_errors_unchanged_by_the_lane():
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="weight must be a vector"):
        add_layer_norm(x, None, torch.randn(8))
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        add_layer_norm(x, None, None, None, -1.0)


# ---- scaled_dot_product_attention -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lq,lk,causal", [(1, 37, False), (5, 5, True), (9, 16, False), (4, 11, True)])
@pytest.mark.parametrize("scale", [None, 0.3])
# key heads: as many as query heads, or fewer with enable_gqa (a Llama-style model's decoding step)
@pytest.mark.parametrize("hq,hk", [(3, 3), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_attention_lane_equals_the_general_path(dtype, lq, lk, causal, scale, hq, hk):
    g = _g(2)
    q = torch.randn(2, hq, lq, 16, generator=g).to(dtype)
    k = torch.randn(2, hk, lk, 16, generator=g).to(dtype)
    v = torch.randn(2, hk, lk, 24, generator=g).to(dtype)
    gqa = hk < hq
    with torch.no_grad():
        lane = attn._lane(q, k, v, None, 0.0, causal, scale, gqa, None)
        public = scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
        general = scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa, backend="cpu")
    assert lane is not None and torch.equal(lane, general) and torch.equal(public, general)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal,
                                                           scale=scale, enable_gqa=gqa)
    torch.testing.assert_close(lane.double(), ref, **({"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32
                                                      else {"rtol": 2e-2, "atol": 2e-2}))


def test_attention_lane_reads_a_transposed_layout():
    """HF's decoding passes q, k, v as [B, H, L, D] views of [B, L, H, D]: last dim contiguous only."""
    g = _g(3)
    q = torch.randn(1, 1, 4, 8, generator=g).transpose(1, 2)
    k = torch.randn(1, 10, 4, 8, generator=g).transpose(1, 2)
    v = torch.randn(1, 10, 4, 8, generator=g).transpose(1, 2)
    with torch.no_grad():
        assert attn._lane(q, k, v, None, 0.0, False, None, False, None) is not None
        torch.testing.assert_close(scaled_dot_product_attention(q, k, v),
                                   torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def _masks(b, hq, lq, lk, g):
    """The masks a caller passes: transformers' materialised bool [B, 1, Lq, Lk] (BERT's right padding,
    GPT-2's left padding), a bool key-padding [B, 1, 1, Lk], a float32 additive [Lq, Lk] (-inf and
    finite values, transformers' finfo.min among them) and a bool [Hq, Lq, Lk], each with one fully
    masked row where it can."""
    lens = torch.randint(1, lk + 1, (b,), generator=g)
    pad = torch.arange(lk)[None, :] < lens[:, None]  # right padding
    left = torch.arange(lk)[None, :] >= (lk - lens)[:, None]
    additive = torch.randn(lq, lk, generator=g)
    additive[:, -1] = -float("inf")
    additive[0, :] = torch.finfo(torch.float32).min
    heads = torch.rand(hq, lq, lk, generator=g) > 0.3
    heads[0, -1] = False  # a fully masked row: zeros, as on the general path
    return {"right": pad[:, None, None, :].expand(b, 1, lq, lk).contiguous(),
            "left": left[:, None, None, :].expand(b, 1, lq, lk).contiguous(),
            "key_padding": pad[:, None, None, :], "additive": additive, "heads": heads}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lq,lk,causal", [(1, 37, False), (3, 20, False), (9, 40, True), (70, 70, False)])
@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("kind", ["right", "left", "key_padding", "additive", "heads"])
def test_attention_lane_with_a_mask_equals_the_general_path(dtype, lq, lk, causal, hq, hk, kind):
    """A mask is read in place by the kernel (a bool one as the bias torch.where(mask, 0, -inf)); the
    general path converts it to that float bias first: the two must agree to the bit."""
    g = _g(5)
    b = 3
    q = torch.randn(b, hq, lq, 16, generator=g).to(dtype)
    k = torch.randn(b, hk, lk, 16, generator=g).to(dtype)
    v = torch.randn(b, hk, lk, 8, generator=g).to(dtype)
    mask = _masks(b, hq, lq, lk, g)[kind]
    gqa = hk < hq
    with torch.no_grad():
        lane = attn._lane(q, k, v, mask, 0.0, causal, None, gqa, None)
        general = scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa, backend="cpu")
    assert lane is not None and torch.equal(lane, general)
    # against float64 (torch gives NaN where every key is masked; this op zeros, as documented)
    bias = torch.where(mask, 0.0, -torch.inf) if mask.dtype == torch.bool else mask
    bias = bias.double().expand(b, hq, lq, lk)
    if causal:
        bias = bias.masked_fill(torch.ones(lq, lk, dtype=torch.bool).tril().logical_not(), -torch.inf)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), bias,
                                                           enable_gqa=gqa).nan_to_num(0.0)
    torch.testing.assert_close(lane.double(), ref, **({"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32
                                                      else {"rtol": 2e-2, "atol": 2e-2}))


def _attn_args():
    g = _g(4)
    return [torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g),
            torch.randn(1, 2, 5, 8, generator=g), None, 0.0, False, None, False, None]
    # query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend


@pytest.mark.parametrize("change", [
    "backend", "mask_float64", "mask_bfloat16", "mask_int", "mask_grad", "mask_shape", "mask_5d", "mask_meta",
    "mask_list", "dropout", "q_grad", "gqa", "three_d", "dtype_mix", "float16", "float64", "stride",
    "scale_inf", "scale_tensor", "empty_keys", "head_dim_limit", "batch_mismatch", "gqa_not_dividing",
    "gqa_truthy_int", "causal_truthy_int", "v_grad", "on_meta", "lq_of_other_batch", "scale_int"])
def test_attention_lane_refuses(change):
    args = _attn_args()
    q, k, v = args[:3]
    if change == "backend":
        args[8] = "cpu"
    elif change == "mask_float64":  # (a float mask other than float32: the general path converts it)
        args[3] = torch.zeros(1, 1, 3, 5, dtype=torch.float64)
    elif change == "mask_bfloat16":
        args[3] = torch.zeros(3, 5, dtype=torch.bfloat16)
    elif change == "mask_int":  # the general path's TypeError
        args[3] = torch.ones(3, 5, dtype=torch.int32)
    elif change == "mask_grad":  # the general path differentiates the reference for its gradient
        args[3] = torch.zeros(3, 5, requires_grad=True)
    elif change == "mask_shape":  # the general path's error: does not broadcast to [1, 2, 3, 5]
        args[3] = torch.ones(1, 1, 4, 5, dtype=torch.bool)
    elif change == "mask_5d":
        args[3] = torch.ones(1, 1, 1, 3, 5, dtype=torch.bool)
    elif change == "mask_meta":
        args[3] = torch.ones(3, 5, dtype=torch.bool, device="meta")
    elif change == "mask_list":
        args[3] = [[True] * 5] * 3
    elif change == "dropout":
        args[4] = 0.1
    elif change == "q_grad":
        args[0] = q.requires_grad_()
    elif change == "gqa":
        args[1], args[2] = k[:, :1], v[:, :1]
    elif change == "three_d":
        args[0], args[1], args[2] = q[0], k[0], v[0]
    elif change == "dtype_mix":
        args[1] = k.bfloat16()
    elif change == "float16":
        args[0], args[1], args[2] = q.half(), k.half(), v.half()
    elif change == "float64":
        args[0], args[1], args[2] = q.double(), k.double(), v.double()
    elif change == "stride":
        args[0] = torch.randn(1, 2, 8, 3).transpose(2, 3)
    elif change == "scale_inf":
        args[6] = float("inf")
    elif change == "scale_tensor":
        args[6] = torch.tensor(0.5)
    elif change == "empty_keys":
        args[1], args[2] = k[:, :, :0], v[:, :, :0]
    elif change == "head_dim_limit":
        d = attn.CPU_MAX_HEAD_DIM + 1
        args[0], args[1], args[2] = torch.randn(1, 1, 1, d), torch.randn(1, 1, 2, d), torch.randn(1, 1, 2, d)
    elif change == "batch_mismatch":
        args[1], args[2] = k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)
    elif change == "gqa_not_dividing":  # 3 query heads, 2 key heads: the general path's error
        args[0], args[7] = torch.randn(1, 3, 3, 8), True
    elif change == "gqa_truthy_int":  # the lane takes bools only; the general path the rest
        args[1], args[2], args[7] = k[:, :1], v[:, :1], 1
    elif change == "causal_truthy_int":
        args[5] = 1
    elif change == "v_grad":
        args[2] = v.requires_grad_()
    elif change == "on_meta":
        args[1] = k.to("meta")
    elif change == "scale_int":  # (float() of a huge int raises: the general path's error, not the lane's)
        args[6] = 10 ** 400
    elif change == "lq_of_other_batch":
        args[0] = torch.randn(2, 2, 3, 8)
    assert attn._lane(*args) is None


def test_attention_lane_refuses_by_state(monkeypatch):
    args = _attn_args()
    assert attn._lane(*args) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attn._lane(*args) is None
    monkeypatch.setenv("BIGNLP_FAST_BACKEND", "torch")
    assert attn._lane(*args) is None


# ---- the recurrent cells ----------------------------------------------------------------------
def _cell(kind, dtype=torch.float32, bias=True, **kw):
    torch.manual_seed(0)
    return getattr(bignlp_fast.nn, kind)(12, 20, bias=bias, **kw).to(dtype)


def _general(monkeypatch, cell, *args):
    """The cell's general path: the same call with the lane closed."""
    with monkeypatch.context() as m:
        m.setattr(nn_rnn, "cell_lane", lambda *a: None)
        return cell(*args)


@pytest.mark.parametrize("kind,extra", [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {"nonlinearity": "tanh"}),
                                        ("RNNCell", {"nonlinearity": "relu"})], ids=["lstm", "gru", "tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 3, 40])  # 40: past the streaming rows, where F.linear projects
@pytest.mark.parametrize("state", ["none", "given"])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_lane_equals_the_general_path(monkeypatch, kind, extra, dtype, batch, state, bias):
    cell = _cell(kind, dtype, bias, **extra)
    g = _g(6)
    x = torch.randn(batch, 12, generator=g).to(dtype)
    lstm = kind == "LSTMCell"
    hx = None
    if state == "given":
        h = torch.randn(batch, 20, generator=g).to(dtype)
        hx = (h, torch.randn(batch, 20, generator=g).to(dtype)) if lstm else h
    taken = []
    real = rnn.cell_lane
    monkeypatch.setattr(nn_rnn, "cell_lane", lambda *a: taken.append(real(*a) is not None) or real(*a))
    with torch.no_grad():
        lane = cell(x, hx)
        general = _general(monkeypatch, cell, x, hx)
    assert taken == [True]
    for a, b in zip(lane if lstm else (lane,), general if lstm else (general,)):
        assert a.shape == (batch, 20) and a.dtype == dtype and torch.equal(a, b)
    ref = getattr(torch.nn, kind)(12, 20, bias=bias, **extra).double()
    ref.load_state_dict(cell.state_dict())
    hx64 = None if hx is None else (tuple(t.double() for t in hx) if lstm else hx.double())
    expect = ref(x.double(), hx64)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    for a, b in zip(lane if lstm else (lane,), expect if lstm else (expect,)):
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
def test_cell_lane_reads_strided_tensors(monkeypatch, kind):
    """Views a caller may pass (every other column, a transposed weight): the lane copies what its
    kernels need contiguous, as the general path does."""
    cell = _cell(kind)
    g = _g(9)
    x = torch.randn(4, 24, generator=g)[:, ::2]
    h = torch.randn(20, 4, generator=g).t()
    hx = (h, torch.randn(4, 40, generator=g)[:, 1::2]) if kind == "LSTMCell" else h
    with torch.no_grad():
        cell.weight_ih.set_(cell.weight_ih.detach().t().contiguous().t())  # stored [I, G*H], read transposed
        assert rnn.cell_lane(cell._mode_name(), x, hx, kind == "LSTMCell", cell.weight_ih, cell.weight_hh,
                             cell.bias_ih, cell.bias_hh) is not None
        lane = cell(x, hx)
        general = _general(monkeypatch, cell, x, hx)
    for a, b in zip(lane if kind == "LSTMCell" else (lane,), general if kind == "LSTMCell" else (general,)):
        assert torch.equal(a, b)


def test_cell_lane_follows_the_projection_rule(monkeypatch):
    """The lane projects the input on the GEMM input_projection would choose: ops.linear's kernel where
    linear_is_faster says so, else F.linear (their sums differ in order, so the equality above holds
    only if the lane follows the rule)."""
    cell = _cell("LSTMCell")
    x = torch.randn(2, 12, generator=_g(7))
    with torch.no_grad():
        for faster in (True, False):
            monkeypatch.setattr(rnn, "linear_is_faster", lambda *a, faster=faster: faster)
            lane = cell(x)
            general = _general(monkeypatch, cell, x)
            assert torch.equal(lane[0], general[0]) and torch.equal(lane[1], general[1])


def _cell_args(lstm=True):
    cell = _cell("LSTMCell" if lstm else "GRUCell")
    g = _g(8)
    x = torch.randn(3, 12, generator=g)
    h, c = torch.randn(3, 20, generator=g), torch.randn(3, 20, generator=g)
    # (weights that need no grad: the lane takes these calls with grad mode on)
    weights = [p.detach() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]
    return ["lstm" if lstm else "gru", x, (h, c) if lstm else h, lstm, *weights]
    # mode, x, hx, lstm, w_ih, w_hh, b_ih, b_hh


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("change", [
    "unbatched", "x_grad", "weight_grad", "h_grad", "dtype_mix", "float64", "float16", "hx_list", "hx_one",
    "h_shape", "x_width", "empty_batch", "subclass_x", "subclass_h", "on_meta", "gru_with_c", "mode"])
def test_cell_lane_refuses(change):
    args = _cell_args()
    x, (h, c) = args[1], args[2]
    w_ih, w_hh = args[4], args[5]
    if change == "unbatched":
        args[1] = x[0]
    elif change == "x_grad":
        args[1] = x.requires_grad_()
    elif change == "weight_grad":  # the cell's own parameters, which autograd records
        args[5] = w_hh.requires_grad_()
    elif change == "h_grad":
        args[2] = (h.requires_grad_(), c)
    elif change == "dtype_mix":
        args[2] = (h.bfloat16(), c)
    elif change == "float64":
        args[1], args[2] = x.double(), (h.double(), c.double())
        args[4:] = [t.double() for t in args[4:]]
    elif change == "float16":
        args[1], args[2] = x.half(), (h.half(), c.half())
        args[4:] = [t.half() for t in args[4:]]
    elif change == "hx_list":  # the general path takes a list; the lane a tuple only
        args[2] = [h, c]
    elif change == "hx_one":
        args[2] = (h,)
    elif change == "h_shape":
        args[2] = (h[:, :10], c)
    elif change == "x_width":
        args[1] = torch.randn(3, 11)
    elif change == "empty_batch":
        args[1], args[2] = x[:0], (h[:0], c[:0])
    elif change == "subclass_x":
        args[1] = x.as_subclass(_Sub)
    elif change == "subclass_h":
        args[2] = (h.as_subclass(_Sub), c)
    elif change == "on_meta":
        args[1] = x.to("meta")
    elif change == "gru_with_c":  # (the C++ condition: c only for lstm)
        args = _cell_args(lstm=False)
        assert rnn.kernel("rnn_cell", "lane", "cpu")("gru", args[1], args[2], args[2], *args[4:], False) == []
        return
    elif change == "mode":
        assert rnn.kernel("rnn_cell", "lane", "cpu")("lstmx", x, h, c, w_ih, w_hh, None, None, False) == []
        return
    assert rnn.cell_lane(*args) is None
    if change in ("x_grad", "weight_grad", "h_grad"):
        with torch.no_grad():  # with grad mode off the lane takes it: there is nothing to record
            assert rnn.cell_lane(*args) is not None


def test_cell_lane_takes_the_unchanged_arguments():
    """(what test_cell_lane_refuses changes: taken as it is, with grad mode on, and for a GRU too)"""
    assert rnn.cell_lane(*_cell_args()) is not None
    assert rnn.cell_lane(*_cell_args(lstm=False)) is not None


def test_cell_lane_refuses_by_state(monkeypatch):
    args = _cell_args()
    with torch.no_grad():
        assert rnn.cell_lane(*args) is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert rnn.cell_lane(*args) is None
        monkeypatch.setenv("BIGNLP_FAST_BACKEND", "torch")
        assert rnn.cell_lane(*args) is None


def test_cell_with_a_backend_takes_the_general_path(monkeypatch):
    cell = _cell("GRUCell", backend="cpu")
    monkeypatch.setattr(nn_rnn, "cell_lane", lambda *a: pytest.fail("the lane was asked"))
    with torch.no_grad():
        cell(torch.randn(2, 12))


# ---- cells on weights packed once (ops.prepack) ---------------------------------------------------
def _spy_packed(monkeypatch, names=("rnn_cell", "lane", "cpu"), first=9, last=10):
    """Records, per call of an extension function ops.rnn gets through kernel() (the cells' lane by
    default), whether it was given packed weights (its arguments first..last all present)."""
    given = []
    real = rnn.kernel

    def kernel(*asked):
        fn = real(*asked)
        if asked != names:
            return fn
        return lambda *a: given.append(all(t is not None for t in a[first:last + 1])) or fn(*a)

    monkeypatch.setattr(rnn, "kernel", kernel)
    return given


@pytest.mark.parametrize("kind,extra", [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {"nonlinearity": "tanh"}),
                                        ("RNNCell", {"nonlinearity": "relu"})], ids=["lstm", "gru", "tanh", "relu"])
@pytest.mark.parametrize("hidden", [64, 96, 20])  # 20: no whole panels, not packed
@pytest.mark.parametrize("batch", [1, 5, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_prepacked_cell_matches_float64(monkeypatch, kind, extra, hidden, batch, bias):
    """A cell whose weights ops.prepack marked runs on their packed copies (the extension's packed step),
    three steps from a zero state, against torch's cell in float64; unmarked, the same cell is not
    given copies."""
    torch.manual_seed(0)
    cell = getattr(bignlp_fast.nn, kind)(24, hidden, bias=bias, **extra)
    ref = getattr(torch.nn, kind)(24, hidden, bias=bias, **extra).double()
    ref.load_state_dict(cell.state_dict())
    x = torch.randn(3, batch, 24, generator=_g(11))
    given = _spy_packed(monkeypatch)
    lstm = kind == "LSTMCell"
    whole = hidden % rnn._cell_packed_units() == 0
    assert bignlp_fast.ops.prepack(cell) == 2  # (the two weights; biases are 1-d)
    try:
        with torch.no_grad():
            state, expect = None, None
            for t in range(3):
                state, expect = cell(x[t], state), ref(x[t].double(), expect)
                for a, b in zip(state if lstm else (state,), expect if lstm else (expect,)):
                    assert a.dtype == torch.float32 and a.shape == (batch, hidden)
                    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
        assert given == [whole] * 3
        if whole:
            from bignlp_fast.ops.linear import prepacked_bytes
            assert prepacked_bytes() == 4 * (24 + hidden) * cell.weight_hh.shape[0]
    finally:
        bignlp_fast.ops.prepack(cell, enabled=False)
    given.clear()
    with torch.no_grad():
        cell(x[0])
    assert given == [False]


def test_prepacked_cell_follows_weight_changes(monkeypatch):
    """An in-place change of a marked weight (an optimizer step, load_state_dict) repacks it before the
    next step."""
    torch.manual_seed(0)
    cell = bignlp_fast.nn.LSTMCell(16, 32)
    ref = torch.nn.LSTMCell(16, 32).double()
    x = torch.randn(4, 16, generator=_g(12))
    given = _spy_packed(monkeypatch)
    bignlp_fast.ops.prepack(cell)
    try:
        with torch.no_grad():
            cell(x)
            cell.weight_hh.mul_(-0.5)
            cell.weight_ih.add_(0.25)
            ref.load_state_dict(cell.state_dict())
            h0 = (torch.randn(4, 32, generator=_g(13)), torch.randn(4, 32, generator=_g(14)))
            out = cell(x, h0)
            expect = ref(x.double(), tuple(t.double() for t in h0))
        for a, b in zip(out, expect):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
        assert given == [True, True]
    finally:
        bignlp_fast.ops.prepack(cell, enabled=False)


def test_prepacked_cell_trains_on_the_general_path(monkeypatch):
    """With autograd recording the weights, the packed copies are not used (the product must be
    differentiated): the general path runs, with torch's gradients."""
    torch.manual_seed(0)
    cell = bignlp_fast.nn.GRUCell(16, 32)
    ref = torch.nn.GRUCell(16, 32)
    ref.load_state_dict(cell.state_dict())
    given = _spy_packed(monkeypatch)
    bignlp_fast.ops.prepack(cell)
    try:
        x = torch.randn(3, 16, generator=_g(15))
        cell(x).square().sum().backward()
        ref(x).square().sum().backward()
        torch.testing.assert_close(cell.weight_hh.grad, ref.weight_hh.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cell.weight_ih.grad, ref.weight_ih.grad, rtol=1e-5, atol=1e-6)
        assert True not in given
    finally:
        bignlp_fast.ops.prepack(cell, enabled=False)


def test_prepacked_bfloat16_cell_is_not_given_copies(monkeypatch):
    """bfloat16 weights keep the unpacked step (their packed copies, if any, are not the fp32 panels)."""
    torch.manual_seed(0)
    cell = bignlp_fast.nn.LSTMCell(16, 32).bfloat16()
    ref = torch.nn.LSTMCell(16, 32).double()
    ref.load_state_dict(cell.state_dict())
    given = _spy_packed(monkeypatch)
    bignlp_fast.ops.prepack(cell)
    try:
        x = torch.randn(2, 16, generator=_g(16)).bfloat16()
        with torch.no_grad():
            out = cell(x)
            expect = ref(x.double())
        for a, b in zip(out, expect):
            torch.testing.assert_close(a.double(), b, rtol=3e-2, atol=3e-2)
        assert True not in given
    finally:
        bignlp_fast.ops.prepack(cell, enabled=False)


# ---- the recurrent modules (nn.LSTM / GRU / RNN) ------------------------------------------------
def _stack(kind, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return getattr(bignlp_fast.nn, kind)(12, 20, **kw).to(dtype)


def _stack_general(monkeypatch, module, *args):
    """The module's general path: the same call with the lane closed."""
    with monkeypatch.context() as m:
        m.setattr(nn_rnn, "stack_lane", lambda *a: None)
        return module(*args)


def _spy_stack_lane(monkeypatch):
    taken = []
    real = rnn.stack_lane
    monkeypatch.setattr(nn_rnn, "stack_lane", lambda *a: taken.append(real(*a) is not None) or real(*a))
    return taken


def _flat(out):
    """(output, h_n[, c_n]) of a module's result."""
    output, state = out
    return (output, *state) if isinstance(state, tuple) else (output, state)


@pytest.mark.parametrize("kind,extra", [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"}),
                                        ("RNN", {"nonlinearity": "relu"})], ids=["lstm", "gru", "tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)], ids=["1layer", "2layers-bidi"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("state", ["none", "given"])
@pytest.mark.parametrize("bias", [True, False])
def test_stack_lane_equals_the_general_path(monkeypatch, kind, extra, dtype, layers, bidirectional, batch_first,
                                            state, bias):
    module = _stack(kind, dtype, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                    bias=bias, **extra)
    g = _g(9)
    t, b, d = 7, 3, 2 if bidirectional else 1
    x = torch.randn(*((b, t) if batch_first else (t, b)), 12, generator=g).to(dtype)
    hx = None
    if state == "given":
        h = torch.randn(layers * d, b, 20, generator=g).to(dtype)
        hx = (h, torch.randn(layers * d, b, 20, generator=g).to(dtype)) if kind == "LSTM" else h
    taken = _spy_stack_lane(monkeypatch)
    with torch.no_grad():
        lane = _flat(module(x, hx))
        general = _flat(_stack_general(monkeypatch, module, x, hx))
    assert taken == [True]
    assert len(lane) == len(general) == (3 if kind == "LSTM" else 2)
    for a, e in zip(lane, general):
        assert a.shape == e.shape and a.dtype == dtype and torch.equal(a, e)
    ref = getattr(torch.nn, kind)(12, 20, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                                  bias=bias, **extra).double()
    ref.load_state_dict(module.state_dict())
    hx64 = None if hx is None else (tuple(s.double() for s in hx) if kind == "LSTM" else hx.double())
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 5e-2}
    for a, e in zip(lane, _flat(ref(x.double(), hx64))):
        torch.testing.assert_close(a.double(), e, **tol)


def test_stack_lane_is_not_taken_where_the_general_path_has_work(monkeypatch):
    """Lengths, packed input, unbatched input, a projection, dropout in training mode and a backend by
    name take the general path without asking the lane; a call autograd records and float64 (torch's
    own forward) ask it and are refused."""
    g = _g(10)
    x = torch.randn(5, 2, 12, generator=g)
    monkeypatch.setattr(nn_rnn, "stack_lane", lambda *a: pytest.fail("the lane was asked"))
    lstm = _stack("LSTM")
    with torch.no_grad():
        lstm(x, lengths=torch.tensor([5, 3]))
        lstm(torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3])))
        lstm(x[:, 0])  # unbatched
        _stack("LSTM", proj_size=8)(x)
        _stack("GRU", num_layers=2, dropout=0.5).train()(x)
        _stack("GRU", backend="cpu")(x)
    taken = _spy_stack_lane(monkeypatch)
    out = lstm(x)  # grad mode on, parameters that require grad: asked, refuses (autograd records it)
    assert out[0].requires_grad
    with torch.no_grad():
        _stack("GRU", num_layers=2, dropout=0.5).eval()(x)  # dropout off in eval mode: the lane
        out = _stack("RNN").double()(x.double())  # asked, refuses: torch.nn.RNN's own forward
    assert taken == [False, True, False] and out[0].dtype == torch.float64


@pytest.mark.parametrize("change", [
    "x_grad", "weight_grad", "h_grad", "float64", "float16", "dtype_mix", "h_shape", "c_missing", "c_for_gru",
    "weight_shape", "weight_count", "subclass_x", "subclass_weight", "on_meta", "empty_batch", "empty_time"])
def test_stack_lane_refuses(change):
    module = _stack("LSTM", num_layers=2)
    g = _g(11)
    x = torch.randn(4, 3, 12, generator=g)
    h, c = torch.randn(2, 3, 20, generator=g), torch.randn(2, 3, 20, generator=g)
    weights = [p.detach() for p in module.parameters()]
    mode = "lstm"
    if change == "x_grad":
        x.requires_grad_()
    elif change == "weight_grad":
        weights[1].requires_grad_()
    elif change == "h_grad":
        h.requires_grad_()
    elif change == "float64":
        x, h, c, weights = x.double(), h.double(), c.double(), [w.double() for w in weights]
    elif change == "float16":
        x, h, c, weights = x.half(), h.half(), c.half(), [w.half() for w in weights]
    elif change == "dtype_mix":
        h = h.bfloat16()
    elif change == "h_shape":
        h = h[:1]
    elif change == "c_missing":
        c = None
    elif change == "c_for_gru":
        mode = "gru"
    elif change == "weight_shape":
        weights[0] = weights[0][:, :11]  # layer 1's w_ih for 11 input features, x has 12
    elif change == "weight_count":
        weights = weights[:-1]
    elif change == "subclass_x":
        x = x.as_subclass(_Sub)
    elif change == "subclass_weight":
        weights[2] = weights[2].as_subclass(_Sub)
    elif change == "on_meta":
        x = x.to("meta")
    elif change == "empty_batch":
        x, h, c = x[:, :0], h[:, :0], c[:, :0]
    elif change == "empty_time":
        x = x[:0]
    assert rnn.stack_lane(mode, x, weights, h, c, 2, False) is None
    if change in ("x_grad", "weight_grad", "h_grad"):
        with torch.no_grad():  # with grad mode off the lane takes it: there is nothing to record
            assert rnn.stack_lane(mode, x, weights, h, c, 2, False) is not None


def test_stack_lane_takes_the_unchanged_arguments_and_refuses_by_state(monkeypatch):
    module = _stack("LSTM", num_layers=2)
    g = _g(11)
    args = ["lstm", torch.randn(4, 3, 12, generator=g), [p.detach() for p in module.parameters()],
            torch.randn(2, 3, 20, generator=g), torch.randn(2, 3, 20, generator=g), 2, False]
    assert rnn.stack_lane(*args) is not None  # grad mode on, nothing requiring grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rnn.stack_lane(*args) is None
    monkeypatch.setenv("BIGNLP_FAST_BACKEND", "torch")
    assert rnn.stack_lane(*args) is None


def test_stack_module_errors_are_the_general_paths(monkeypatch):
    """Bad input and bad hx raise the module's messages whether or not the lane is open."""
    lstm = _stack("LSTM")
    for x, hx, match in [(torch.randn(5, 2, 11), None, "input.size\\(-1\\) must be equal to input_size"),
                         (torch.randn(5, 2, 12), (torch.zeros(1, 3, 20), torch.zeros(1, 3, 20)), "hidden\\[0\\]"),
                         (torch.randn(5, 2, 12).double(), None, "dtype")]:
        for closed in (False, True):
            with monkeypatch.context() as m, torch.no_grad():
                if closed:
                    m.setattr(nn_rnn, "stack_lane", lambda *a: None)
                with pytest.raises((RuntimeError, ValueError), match=match):
                    lstm(x, hx)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("hidden", [64, 20])  # 20: no whole panels, packed per call as before
def test_stack_lane_reads_a_prepacked_w_hh(monkeypatch, kind, hidden):
    """A recurrent module whose weights ops.prepack marked multiplies by W_hh's packed copy (the same
    panels forward() packs per call, so the very same numbers), and the copy follows a change."""
    torch.manual_seed(0)
    module = getattr(bignlp_fast.nn, kind)(12, hidden, num_layers=2, bidirectional=True)
    x = torch.randn(7, 3, 12, generator=_g(17))
    with torch.no_grad():
        before = _flat(module(x))
        passed = _spy_packed(monkeypatch, ("rnn", "fwd", "cpu"), 10, 10)
        assert bignlp_fast.ops.prepack(module) == 8  # per layer and direction, W_ih and W_hh
        try:
            packed = _flat(module(x))
            for a, b in zip(packed, before):
                assert torch.equal(a, b)
            assert passed == [hidden % rnn._cell_packed_units() == 0] * 4
            module.weight_hh_l1.mul_(0.5)
            changed = _flat(module(x))
            bignlp_fast.ops.prepack(module, enabled=False)
            for a, b in zip(changed, _flat(module(x))):
                assert torch.equal(a, b)
        finally:
            bignlp_fast.ops.prepack(module, enabled=False)
