"""bignlp_fast.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same state_dict."""

import copy
import importlib
import math
import warnings

import pytest
import torch

import bignlp_fast
from bignlp_fast.nn import MultiheadAttention
from reference import assert_within_torch_error

@pytest.fixture(params=["torch", None], ids=["torch", "auto"])
def backend(request):
    return request.param


@pytest.fixture(params=["auto", "ops.linear"])
def gemm(request, monkeypatch):
    """The projections' GEMM: as ops.linear.linear_is_faster decides on this machine (F.linear for
    these small products), or ops.linear forced, so that both paths are checked on every machine."""
    if request.param == "ops.linear":
        linear_module = importlib.import_module("bignlp_fast.ops.linear")  # (ops.linear is also the function)
        monkeypatch.setattr(linear_module, "linear_is_faster", lambda x, w, prepacked=None: x.device.type == "cpu")
    return request.param


def make_pair(backend, embed_dim=24, num_heads=3, **kwargs):
    """torch's module with random (non-zero) biases, and ours loaded from its state_dict; both in eval mode."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(embed_dim, num_heads, **kwargs)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.normal_()
    ours = MultiheadAttention(embed_dim, num_heads, **kwargs, backend=backend)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    return ref.eval(), ours.eval()


def inputs(batch_first, b=2, lq=5, lk=7, e=24, kdim=None, vdim=None, self_attention=False):
    shape = (lambda l_, d: (b, l_, d)) if batch_first else (lambda l_, d: (l_, b, d))
    q = torch.randn(shape(lq, e))
    if self_attention:
        return q, q, q
    return q, torch.randn(shape(lk, kdim or e)), torch.randn(shape(lk, vdim or e))


def both(ref, ours, *args, **kwargs):
    kwargs.setdefault("need_weights", False)
    expected, _ = ref(*args, **kwargs)
    got, weights = ours(*args, **kwargs)
    assert weights is None
    return got, expected


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["self", "cross", "kv_shared", "kdim_vdim"])
def test_matches_torch(backend, batch_first, kind, gemm):
    kdim, vdim = (10, 14) if kind == "kdim_vdim" else (None, None)
    ref, ours = make_pair(backend, kdim=kdim, vdim=vdim, batch_first=batch_first)
    q, k, v = inputs(batch_first, kdim=kdim, vdim=vdim, self_attention=kind == "self")
    if kind == "kv_shared":
        v = k
    torch.testing.assert_close(*both(ref, ours, q, k, v))
    assert not [r for r in bignlp_fast.report() if r["op"] == "multihead_attention"]  # the fused path ran


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_key_padding_mask(backend, batch_first, dtype):
    ref, ours = make_pair(backend, batch_first=batch_first)
    q, k, v = inputs(batch_first)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 4:] = True
    pad[1, 6:] = True
    mask = pad if dtype == torch.bool else torch.randn(2, 7).masked_fill(pad, -math.inf)
    torch.testing.assert_close(*both(ref, ours, q, k, v, key_padding_mask=mask))


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("with_padding", [False, True])
def test_attn_mask(backend, dim, dtype, with_padding):
    ref, ours = make_pair(backend, batch_first=True)
    q, k, v = inputs(True)
    shape = (5, 7) if dim == 2 else (2 * 3, 5, 7)
    blocked = torch.rand(shape) < 0.3
    blocked[..., 0] = False  # every query keeps a key
    mask = blocked if dtype == torch.bool else torch.randn(shape).masked_fill(blocked, -math.inf)
    kpm = None
    if with_padding:
        kpm = torch.zeros(2, 7, dtype=torch.bool)
        kpm[1, 5:] = True
        kpm = kpm if dtype == torch.bool else torch.zeros(2, 7).masked_fill(kpm, -math.inf)
    torch.testing.assert_close(*both(ref, ours, q, k, v, attn_mask=mask, key_padding_mask=kpm))


def test_mixed_mask_types_warn_like_torch(backend):
    ref, ours = make_pair(backend, batch_first=True)
    q, k, v = inputs(True)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, 3:] = True
    mask = torch.randn(5, 7)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        got, _ = ours(q, k, v, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, _ = ref(q, k, v, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_is_causal_with_causal_mask(backend, with_padding, batch_first):
    ref, ours = make_pair(backend, batch_first=batch_first)
    x, _, _ = inputs(batch_first, lq=6)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6)  # float, -inf above the diagonal
    kpm = None
    if with_padding:
        kpm = torch.zeros(2, 6)
        kpm[1, 4:] = -math.inf
    got, expected = both(ref, ours, x, x, x, attn_mask=causal, key_padding_mask=kpm, is_causal=True)
    torch.testing.assert_close(got, expected)
    # without padding torch trusts the hint and does not read the mask: neither do we
    if not with_padding:
        torch.testing.assert_close(ours(x, x, x, attn_mask=torch.zeros(6, 6), is_causal=True, need_weights=False)[0],
                                   expected)
    with pytest.raises(RuntimeError, match="need attn_mask if specifying the is_causal hint"):
        ours(x, x, x, is_causal=True, need_weights=False)


@pytest.mark.parametrize("batch_first", [True, False])
def test_unbatched_input(backend, batch_first):
    ref, ours = make_pair(backend, kdim=10, vdim=14, batch_first=batch_first)  # batch_first is ignored for 2-D
    q, k, v = torch.randn(5, 24), torch.randn(7, 10), torch.randn(7, 14)
    kpm = torch.tensor([False] * 5 + [True] * 2)
    mask = torch.rand(3, 5, 7) < 0.3
    mask[..., 0] = False
    for kwargs in ({}, {"key_padding_mask": kpm}, {"attn_mask": mask, "key_padding_mask": kpm},
                   {"attn_mask": mask[0]}):
        got, expected = both(ref, ours, q, k, v, **kwargs)
        assert got.shape == (5, 24)
        torch.testing.assert_close(got, expected)


def test_need_weights_falls_back_and_is_recorded():
    ref, ours = make_pair(None, batch_first=True)
    q, k, v = inputs(True)
    for average in (True, False):
        expected = ref(q, k, v, average_attn_weights=average)
        got = ours(q, k, v, average_attn_weights=average)  # need_weights=True: torch's default
        torch.testing.assert_close(got, expected)
    (record,) = bignlp_fast.report()
    assert record["op"] == "multihead_attention" and record["count"] == 2
    assert "need_weights=True" in record["reason"]


def test_need_weights_under_strict_mode_or_a_named_backend_raises(monkeypatch):
    _, ours = make_pair(None, batch_first=True)
    q, k, v = inputs(True)
    monkeypatch.setenv("BIGNLP_FAST_STRICT", "1")
    with pytest.raises(bignlp_fast.BackendError, match="need_weights=True.*BIGNLP_FAST_STRICT"):
        ours(q, k, v)
    monkeypatch.delenv("BIGNLP_FAST_STRICT")
    ours.backend = "cpu"
    with pytest.raises(bignlp_fast.BackendError, match="backend 'cpu' cannot run this call: need_weights=True"):
        ours(q, k, v)
    ours.backend = "torch"  # the reference was asked for: torch's module is the reference, nothing to record
    bignlp_fast.reset_report()
    assert ours(q, k, v)[1] is not None and bignlp_fast.report() == []


@pytest.mark.parametrize("option", ["add_bias_kv", "add_zero_attn"])
def test_unsupported_options_fall_back(option):
    ref, ours = make_pair(None, batch_first=True, **{option: True})
    q, k, v = inputs(True)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    torch.testing.assert_close(*both(ref, ours, q, k, v, key_padding_mask=kpm))
    (record,) = bignlp_fast.report()
    assert option in record["reason"]


@pytest.mark.parametrize("kind", ["self", "kdim_vdim"])
def test_gradients_match_torch(backend, kind, gemm):
    """Gradients of the inputs and every parameter, judged by the project's rule against torch's module
    run in float64 (an fp32-to-fp32 comparison would judge the GEMM library's rounding instead)."""
    kdim, vdim = (10, 14) if kind == "kdim_vdim" else (None, None)
    ref, ours = make_pair(backend, kdim=kdim, vdim=vdim, batch_first=False)
    ref64 = copy.deepcopy(ref).double()
    q, k, v = inputs(False, kdim=kdim, vdim=vdim, self_attention=kind == "self")
    kpm = torch.zeros(2, q.shape[0] if kind == "self" else 7, dtype=torch.bool)
    kpm[1, -2:] = True
    grads = []
    for module in (ref, ours, ref64):
        module.train()  # dropout is 0: training mode only switches off torch's inference fast path
        dtype = next(module.parameters()).dtype
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        if kind == "self":
            kk = vv = qq
        out, _ = module(qq, kk, vv, key_padding_mask=kpm, need_weights=False)
        out.square().sum().backward()
        tensors = [qq.grad] + ([] if kind == "self" else [kk.grad, vv.grad])
        grads.append(tensors + [p.grad for p in module.parameters()])
    names = ["q", "k", "v"][: 1 if kind == "self" else 3] + [n for n, _ in ours.named_parameters()]
    for name, g_ref, g_ours, g64 in zip(names, *grads):
        assert_within_torch_error(f"grad {name}", g_ours, g_ref, g64, torch.float32)


def test_dropout_is_off_in_eval_mode(backend):
    ref, ours = make_pair(backend, dropout=0.5, batch_first=True)
    q, k, v = inputs(True)
    torch.testing.assert_close(*both(ref, ours, q, k, v))
    ours.train()
    torch.manual_seed(1)
    a, _ = ours(q, k, v, need_weights=False)
    torch.manual_seed(1)
    b, _ = ours(q, k, v, need_weights=False)
    torch.testing.assert_close(a, b)  # training-mode dropout is drawn from torch's generator: it repeats
    assert not torch.allclose(a, ours.eval()(q, k, v, need_weights=False)[0])


def test_fully_masked_query_gives_zeros_not_nan(backend):
    """A query whose every key is masked: our attention gives zeros, so the module returns out_proj.bias.
    torch's SDPA path (need_weights=False, torch >= 2.5) does the same; its need_weights=True path gives NaN."""
    ref, ours = make_pair(backend, batch_first=True)
    q, k, v = inputs(True)
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[2] = True  # query 2 may attend to nothing
    q = q.requires_grad_()
    got, _ = ours(q, k, v, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(got[:, 2], ours.out_proj.bias.detach().expand(2, -1))
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(q.grad).all()
    torch.testing.assert_close(got, ref(q, k, v, attn_mask=mask, need_weights=False)[0])
    assert torch.isnan(ref(q, k, v, attn_mask=mask)[0][:, 2]).all()  # torch's weights path


def test_from_torch_shares_parameters(backend):
    ref, _ = make_pair(backend, kdim=10, vdim=14, batch_first=True, add_bias_kv=False)
    ours = MultiheadAttention.from_torch(ref, backend=backend)
    assert ours.q_proj_weight is ref.q_proj_weight and ours.out_proj.weight is ref.out_proj.weight
    assert not ours.training and list(ours.state_dict()) == list(ref.state_dict())
    q, k, v = inputs(True, kdim=10, vdim=14)
    torch.testing.assert_close(*both(ref, ours, q, k, v))


def test_inside_transformer_encoder_layer(backend):
    """A drop-in for the self_attn of torch's own layers (training mode: torch's fused encoder path is off)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(24, 3, dim_feedforward=32, dropout=0.0, batch_first=True)
    x = torch.randn(2, 6, 24)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, 4:] = True
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    expected = layer(x, src_mask=causal, src_key_padding_mask=kpm)
    layer.self_attn = MultiheadAttention.from_torch(layer.self_attn, backend=backend)
    torch.testing.assert_close(layer(x, src_mask=causal, src_key_padding_mask=kpm), expected)


def test_compiles_without_graph_breaks():
    _, ours = make_pair(None, batch_first=True)
    x = torch.randn(2, 5, 24)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    run = torch.compile(lambda x, kpm: ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0], fullgraph=True)
    torch.testing.assert_close(run(x, kpm), ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0])


def test_bad_input_names_the_argument():
    _, ours = make_pair("torch", batch_first=True)
    q, k, v = inputs(True)
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        ours(q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool), need_weights=False)
    with pytest.raises(TypeError, match="attn_mask must be bool or floating point"):
        ours(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.int64), need_weights=False)
    with pytest.raises(ValueError, match="3-D attn_mask has shape"):
        ours(q, k, v, attn_mask=torch.zeros(3, 5, 7, dtype=torch.bool), need_weights=False)
    with pytest.raises(ValueError, match="query has 23 features but embed_dim is 24"):
        ours(q[..., :23], k, v, need_weights=False)
    with pytest.raises(ValueError, match="key has batch size 1 but query has 2"):
        ours(q, k[:1], v[:1], need_weights=False)
