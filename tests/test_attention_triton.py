"""The Triton attention kernels (kernels/attention.py) against the reference backend of
bignlp_fast/ops/attention.py computed in float64 on the same inputs.

Without a GPU they run through the Triton interpreter (TRITON_INTERPRET=1, set by conftest) with
16x16 tiles, so the small shapes here still cross several query and key tiles. Shapes stay tiny:
the interpreter is slow.
"""

import math

import pytest
import torch

from bignlp_fast import _backend
from bignlp_fast.ops import attention as ops
from bignlp_fast.ops.attention import attention_bwd_torch, attention_fwd_torch
from conftest import HAS_CUDA
from reference import assert_within_torch_error

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
_REASON = _backend.unavailable("triton", DEVICE)
pytestmark = [pytest.mark.triton, pytest.mark.skipif(_REASON is not None, reason=f"triton backend: {_REASON}")]

if _REASON is None:
    import triton
    import triton.language as tl

    from bignlp_fast.kernels.attention import (_philox_word, attention_bwd_triton, attention_fwd_triton,
                                               attention_triton_supports)

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
    def _philox_words_kernel(N, OUT, seed_lo, seed_hi, BLOCK: tl.constexpr):
        """OUT[i] = _philox_word(N[i]) (as int64), to test the in-kernel Philox alone."""
        offs = tl.arange(0, BLOCK)
        tl.store(OUT + offs, _philox_word(tl.load(N + offs), seed_lo, seed_hi).to(tl.int64))

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEED = torch.tensor(0x0123_4567_89AB_CDEF, dtype=torch.int64)  # both key words non-zero, the low one >= 2**31
SEED2 = torch.tensor(0x7FFF_FFFF_8000_0001, dtype=torch.int64)


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def _qkv(b, hq, hk, lq, lk, d, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (_randn(g, b, hq, lq, d, dtype=dtype), _randn(g, b, hk, lk, d, dtype=dtype),
            _randn(g, b, hk, lk, dv, dtype=dtype))


def _assert_lse(name, ours, theirs, ref64):
    """lse: +inf exactly where the reference has it, the finite values within the float32 rule."""
    inf = torch.isinf(ref64)
    assert torch.equal(torch.isinf(ours), inf), f"{name}: +inf rows differ"
    assert not torch.isnan(ours).any(), f"{name}: NaN"
    assert_within_torch_error(name, ours[~inf], theirs[~inf], ref64[~inf], torch.float32)


def _compare(q, k, v, *, bias=None, cu_q=None, cu_k=None, max_q=None, max_k=None, causal=0, dropout_p=0.0,
             seed=SEED, scale=None, grad_out=None, rows=None):
    """Forward and backward of the triton kernels against the float64 reference on the same inputs, with
    PyTorch's own error (the reference run in q's dtype) as the yardstick. ``rows`` restricts the check
    of the per-query outputs (out, lse, dq) to those rows of the L axis. Returns the triton results."""
    dtype = q.dtype
    max_q = q.shape[2] if max_q is None else max_q
    max_k = k.shape[2] if max_k is None else max_k
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    args = (bias, cu_q, cu_k, max_q, max_k, scale, causal, dropout_p, seed if dropout_p > 0 else None)
    out, lse = attention_fwd_triton(q, k, v, *args)
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[-1]) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous(), "out must be allocated as [B, Lq, Hq, Dv]"
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    dq, dk, dv = attention_bwd_triton(grad_out, q, k, v, out, lse, *args)
    for name, t in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"{name}: NaN"
    for grad, x in ((dq, q), (dk, k), (dv, v)):
        assert grad.shape == x.shape and grad.dtype == x.dtype

    theirs = attention_fwd_torch(q, k, v, *args)
    theirs_g = attention_bwd_torch(grad_out, q, k, v, *theirs, *args)
    q64, k64, v64, go64 = (t.double() for t in (q, k, v, grad_out))
    ref = attention_fwd_torch(q64, k64, v64, *args)
    ref_g = attention_bwd_torch(go64, q64, k64, v64, *ref, *args)

    r = slice(None) if rows is None else rows
    tag = f"{dtype} causal={causal} p={dropout_p}"
    assert_within_torch_error(f"{tag} out", out[:, :, r], theirs[0][:, :, r], ref[0][:, :, r], dtype)
    _assert_lse(f"{tag} lse", lse[:, :, r], theirs[1][:, :, r], ref[1][:, :, r])
    assert_within_torch_error(f"{tag} dq", dq[:, :, r], theirs_g[0][:, :, r], ref_g[0][:, :, r], dtype)
    assert_within_torch_error(f"{tag} dk", dk, theirs_g[1], ref_g[1], dtype)
    assert_within_torch_error(f"{tag} dv", dv, theirs_g[2], ref_g[2], dtype)
    return out, lse, dq, dk, dv


# ---- shapes that break tiling --------------------------------------------------------------------
# (B, Hq, Hk, Lq, Lk, D, Dv, causal)
SHAPES = [
    (1, 2, 2, 37, 37, 16, 16, 1),  # odd length, several tiles, top-left causal
    (2, 1, 1, 7, 37, 40, 40, 2),  # Lq < Lk, bottom-right causal, head dim not a power of two
    (1, 2, 2, 37, 7, 40, 24, 2),  # Lq > Lk bottom-right: the first 30 rows see no key at all
    (2, 2, 1, 1, 7, 16, 40, 0),  # one query, Dv != D, GQA
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape, dtype):
    b, hq, hk, lq, lk, d, dv, causal = shape
    out, lse, dq, dk, dv_ = _compare(*_qkv(b, hq, hk, lq, lk, d, dv, dtype), causal=causal)
    if causal == 2 and lq > lk:  # rows with no visible key: zeros, +inf, zero gradient
        dead = slice(0, lq - lk)
        assert (out[:, :, dead] == 0).all() and torch.isinf(lse[:, :, dead]).all() and (dq[:, :, dead] == 0).all()


@pytest.mark.parametrize("causal", [0, 1, 2])
def test_gqa_causal_modes_float32(causal):
    _compare(*_qkv(1, 4, 2, 23, 19, 16, 16, torch.float32, seed=1), causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(dtype):
    """q, k, v as [B, H, L, D] views of [B, L, H, D] (as varlen and HF models pass them), grad_out too."""
    g = torch.Generator().manual_seed(2)
    q = _randn(g, 2, 21, 2, 40, dtype=dtype).transpose(1, 2)
    k = _randn(g, 2, 19, 1, 40, dtype=dtype).transpose(1, 2)
    v = _randn(g, 2, 19, 1, 48, dtype=dtype)[..., :24].transpose(1, 2)  # row stride 48 != Dv
    grad_out = _randn(g, 2, 21, 2, 24, dtype=dtype).transpose(1, 2)
    assert not q.is_contiguous() and not v.is_contiguous()
    _compare(q, k, v, causal=1, grad_out=grad_out)


# ---- bias -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_key_padding_mask(dtype):
    """A [B, 1, 1, Lk] mask broadcast with zero strides; batch 1 has every key masked (dead rows)."""
    b, h, lq, lk = 2, 2, 19, 35
    keep = torch.ones(b, lk, dtype=torch.bool)
    keep[0, 29:] = False
    keep[1, :] = False
    bias = torch.zeros(b, 1, 1, lk).masked_fill(~keep[:, None, None, :], -math.inf).to(DEVICE)
    bias = bias.expand(b, h, lq, lk)
    assert bias.stride() == (lk, 0, 0, 1)
    out, lse, dq, dk, dv = _compare(*_qkv(b, h, h, lq, lk, 16, 16, dtype, seed=3), bias=bias)
    assert (out[1] == 0).all() and torch.isinf(lse[1]).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()


def test_general_bias_with_dead_row():
    """A full [B, Hq, Lq, Lk] float bias with scattered -inf and one row masked entirely, plus causal."""
    b, h, lq, lk = 1, 2, 21, 33
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(b, h, lq, lk, generator=g) * 2
    bias = bias.masked_fill(torch.rand(b, h, lq, lk, generator=g) < 0.2, -math.inf)
    bias[0, 1, 5] = -math.inf
    out, lse, dq, _, _ = _compare(*_qkv(b, h, h, lq, lk, 40, 40, torch.float32, seed=4), bias=bias.to(DEVICE),
                                  causal=2)
    assert (out[0, 1, 5] == 0).all() and math.isinf(lse[0, 1, 5].item()) and (dq[0, 1, 5] == 0).all()


# ---- varlen -------------------------------------------------------------------------------------
def _packed(lens_q, lens_k, hq, hk, d, dv, dtype, seed=5):
    """[1, H, T, D] views of packed [T, H, D] tensors (as varlen_attention passes them) and the offsets."""
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = _randn(g, tq, hq, d, dtype=dtype).unsqueeze(0).transpose(1, 2)
    k = _randn(g, tk, hk, d, dtype=dtype).unsqueeze(0).transpose(1, 2)
    v = _randn(g, tk, hk, dv, dtype=dtype).unsqueeze(0).transpose(1, 2)
    cu = [torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
          for lens in (lens_q, lens_k)]
    return q, k, v, *cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [0, 2])
def test_varlen(dtype, causal):
    lens_q, lens_k = [5, 17, 1], [9, 17, 3]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 2, 1, 40, 24, dtype)
    _compare(q, k, v, cu_q=cu_q, cu_k=cu_k, max_q=max(lens_q), max_k=max(lens_k), causal=causal)


def test_varlen_empty_sequences():
    """A sequence with no queries and no keys, and one with 3 queries and no keys (rows: zeros, +inf, zero
    gradients). The reference cannot run empty sequences (torch's amax refuses an empty row), so the
    others are compared with the reference run on the same tokens without them (no dropout: the
    numbering of sequences does not matter)."""
    lens_q, lens_k = [5, 0, 17, 3], [7, 0, 23, 0]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 2, 2, 16, 16, torch.float32, seed=6)
    args = dict(max_q=17, max_k=23, causal=2)
    out, lse, dq, dk, dv = _compare_varlen_subset(q, k, v, cu_q, cu_k, **args)
    assert (out[:, :, 22:] == 0).all() and torch.isinf(lse[:, :, 22:]).all() and (dq[:, :, 22:] == 0).all()


def _compare_varlen_subset(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    out, lse = attention_fwd_triton(q, k, v, None, cu_q, cu_k, max_q, max_k, 0.25, causal, 0.0, None)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE, q.dtype)
    dq, dk, dv = attention_bwd_triton(grad_out, q, k, v, out, lse, None, cu_q, cu_k, max_q, max_k, 0.25, causal,
                                      0.0, None)
    nonempty = (cu_q[1:] > cu_q[:-1]) & (cu_k[1:] > cu_k[:-1])
    sub_q = torch.cat([cu_q[:1], cu_q[1:][nonempty]])
    sub_k = torch.cat([cu_k[:1], cu_k[1:][nonempty]])
    tq = int(sub_q[-1])  # the sequences with keys come first here
    args = (None, sub_q, sub_k, max_q, max_k, 0.25, causal, 0.0, None)
    q64, k64, v64 = q[:, :, :tq].double(), k.double(), v.double()
    ref = attention_fwd_torch(q64, k64, v64, *args)
    ref_g = attention_bwd_torch(grad_out[:, :, :tq].double(), q64, k64, v64, *ref, *args)
    tol = 1e-5
    torch.testing.assert_close(out[:, :, :tq].double(), ref[0], atol=tol, rtol=tol)
    torch.testing.assert_close(lse[:, :, :tq].double(), ref[1].double(), atol=tol, rtol=tol)
    for name, ours, theirs in zip(("dq", "dk", "dv"), (dq[:, :, :tq], dk, dv), ref_g):
        torch.testing.assert_close(ours.double(), theirs, atol=tol, rtol=tol, msg=name)
    return out, lse, dq, dk, dv


# ---- dropout --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_same_mask_as_reference(dtype):
    """With the same seed the kernels draw dropout_keep's mask exactly (one flipped element would move the
    output by O(1)), in the forward and in both backward kernels."""
    _compare(*_qkv(2, 2, 1, 19, 37, 16, 24, dtype, seed=9), causal=1, dropout_p=0.3)


def test_dropout_varlen_and_bias():
    lens_q, lens_k = [5, 17, 1], [9, 17, 3]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 2, 2, 16, 16, torch.float32, seed=10)
    _compare(q, k, v, cu_q=cu_q, cu_k=cu_k, max_q=17, max_k=17, causal=2, dropout_p=0.3, seed=SEED2)
    b, h, lq, lk = 1, 2, 17, 21
    bias = torch.randn(b, 1, lq, lk, generator=torch.Generator().manual_seed(11)).to(DEVICE).expand(b, h, lq, lk)
    _compare(*_qkv(b, h, h, lq, lk, 16, 16, torch.float32, seed=11), bias=bias, dropout_p=0.3, seed=SEED2)


def test_philox_words_match_reference():
    """The in-kernel Philox against philox4x32 of ops/attention.py, for element numbers past 2**34 too
    (there the high counter word is non-zero; the attention shapes above never get that far)."""
    n = torch.tensor([0, 1, 2, 3, 4, 7, 2**32 - 1, 2**32, 2**34 - 1, 2**34, 2**34 + 6, 2**40 + 3, 2**61 + 1,
                      123456789012, 987654321098765, 5], dtype=torch.int64)
    for seed in (int(SEED), int(SEED2), 0):
        out = torch.empty_like(n, device=DEVICE)
        _philox_words_kernel[(1,)](n.to(DEVICE), out, seed & 0xFFFFFFFF, seed >> 32, BLOCK=n.numel())
        c = n >> 2
        words = torch.stack(ops.philox4x32(c & 0xFFFFFFFF, c >> 32, seed & 0xFFFFFFFF, seed >> 32), -1)
        expected = words.gather(-1, (n & 3).unsqueeze(-1)).squeeze(-1)
        assert torch.equal(out.cpu(), expected), f"seed {seed:#x}"


# ---- structure ----------------------------------------------------------------------------------
@pytest.mark.skipif(DEVICE.type != "cpu", reason="relies on the interpreter's 16x16 tiles")
def test_causal_skips_invisible_key_tiles():
    """16 queries, 64 keys, top-left causal: keys 16.. are visible to no query. Their tiles must be skipped,
    not masked: NaN there would reach the output through P @ V if they were loaded."""
    q, k, v = _qkv(1, 1, 1, 16, 64, 16, 16, torch.float32, seed=12)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, 16:] = math.nan
    v_nan[:, :, 16:] = math.nan
    out, lse = attention_fwd_triton(q, k_nan, v_nan, None, None, None, 16, 64, 0.25, 1, 0.0, None)
    ref_out, ref_lse = attention_fwd_torch(q, k, v, None, None, None, 16, 64, 0.25, 1, 0.0, None)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    grad_out = torch.ones_like(out)
    dq, dk, dv = attention_bwd_triton(grad_out, q, k_nan, v_nan, out, lse, None, None, None, 16, 64, 0.25, 1, 0.0,
                                      None)
    ref_dq, ref_dk, ref_dv = attention_bwd_torch(grad_out, q, k, v, ref_out, ref_lse, None, None, None, 16, 64, 0.25,
                                                 1, 0.0, None)
    torch.testing.assert_close(dq, ref_dq)
    torch.testing.assert_close(dk, ref_dk)
    torch.testing.assert_close(dv, ref_dv)
    assert (dk[:, :, 16:] == 0).all() and (dv[:, :, 16:] == 0).all()


def test_supports():
    assert attention_triton_supports(64, 64) is None
    assert attention_triton_supports(40, 256) is None
    assert "300" in attention_triton_supports(300, 64)
    assert "257" in attention_triton_supports(64, 257)


def test_public_op_runs_the_kernels():
    """scaled_dot_product_attention(backend="triton") reaches these kernels, with autograd."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 9, 11, 16, 16, torch.float32, seed=13))
    out = ops.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
    out.sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ops.scaled_dot_product_attention(q64, k64, v64, is_causal=True, backend="torch")
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-5, rtol=1e-5)
