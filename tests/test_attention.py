"""scaled_dot_product_attention and varlen_attention on every backend, against a float64 reference.

The reference is the torch backend run in float64; "PyTorch's own error" is that of
torch.nn.functional.scaled_dot_product_attention in the test's dtype (with its NaN rows, for fully
masked queries, read as the zeros that bignlp_fast documents)."""

import math

import pytest
import torch
import torch.nn.functional as F

import bignlp_fast
from bignlp_fast._backend import amx_bf16, bf16_dot, bf16_tiles, use_amx_bf16, use_bf16_dot
from bignlp_fast.ops import scaled_dot_product_attention as sdpa
from bignlp_fast.ops import varlen_attention
from bignlp_fast.ops.attention import dropout_keep, philox4x32
from conftest import backend_params, tile_paths
from reference import assert_within_torch_error

FUSED = backend_params("cpu", "cuda", "triton")
ALL = backend_params("cpu", "cuda", "triton", "torch")
DTYPES = {"cpu": (torch.float32, torch.bfloat16), "torch": (torch.float32, torch.bfloat16),
          "cuda": (torch.float16, torch.bfloat16), "triton": (torch.float32, torch.bfloat16)}


def _small(backend, device):
    """The Triton interpreter and the CUDA emulation are slow: Triton and cuda on CPU tensors get the
    small shapes only."""
    return backend in ("triton", "cuda") and device.type == "cpu"


def _inputs(shape_q, shape_k, dv, dtype, device, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    b, hq, lq, d = shape_q
    _, hk, lk, _ = shape_k
    if noncontiguous:  # [B, L, H, D] storage seen as [B, H, L, D], the layout projections produce
        make = lambda b_, h_, l_, d_: torch.randn(b_, l_, h_, d_, generator=g).transpose(1, 2)  # noqa: E731
    else:
        make = lambda b_, h_, l_, d_: torch.randn(b_, h_, l_, d_, generator=g)  # noqa: E731
    q, k, v = make(b, hq, lq, d), make(b, hk, lk, d), make(b, hk, lk, dv)
    go = torch.randn(b, hq, lq, dv, generator=g)
    conv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return conv(q), conv(k), conv(v), conv(go)


def _grads(fn, q, k, v, go):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, go)]


def _check(backend, device, dtype, shape_q, shape_k, dv=None, *, causal=False, mask=None, noncontiguous=False,
           grads=True):
    dv = dv or shape_q[-1]
    q, k, v, go = _inputs(shape_q, shape_k, dv, dtype, device, noncontiguous=noncontiguous)
    if noncontiguous:
        assert not q.is_contiguous()
    gqa = shape_q[1] != shape_k[1]
    mask_d = mask.to(device) if mask is not None else None
    ours_fn = lambda q, k, v: sdpa(q, k, v, mask_d, is_causal=causal, enable_gqa=gqa, backend=backend)  # noqa: E731

    def theirs_fn(q, k, v):
        m = mask_d
        if causal:
            tri = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=device).tril()
            m = tri if m is None else (m & tri if m.dtype == torch.bool else m.masked_fill(~tri, -math.inf))
        if m is not None and m.is_floating_point():
            m = m.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, m, enable_gqa=gqa)

    run = _grads if grads else (lambda fn, q, k, v, go: [fn(q, k, v)])
    theirs = [t.nan_to_num(0.0) for t in run(theirs_fn, q, k, v, go)]
    ref = run(lambda q, k, v: sdpa(q, k, v, mask_d, is_causal=causal, enable_gqa=gqa, backend="torch"),
              q.double(), k.double(), v.double(), go.double())
    for path, context in tile_paths(backend, dtype):
        with context():
            ours = run(ours_fn, q, k, v, go)
        assert ours[0].stride() == ours[0].transpose(1, 2).contiguous().transpose(1, 2).stride()
        for name, a, c, r in zip(["out", "grad_q", "grad_k", "grad_v"], ours, theirs, ref):
            assert torch.isfinite(a).all(), f"{name}: not finite"
            assert_within_torch_error(f"{backend} {path} {dtype} q{shape_q} k{shape_k} causal={causal} {name}",
                                      a, c, r, dtype)


CASES = [  # (q shape, k shape, dv, causal)
    ((1, 1, 1, 16), (1, 1, 1, 16), None, False),
    ((2, 4, 1, 64), (2, 4, 97, 64), None, False),     # Lq <= 4: the CPU kernel's decode path
    ((1, 3, 4, 40), (1, 3, 300, 40), 24, True),
    ((2, 2, 3, 80), (2, 2, 2, 80), None, True),       # decode path, causal with Lq > Lk
    ((2, 3, 7, 40), (2, 3, 7, 40), None, True),
    ((1, 2, 97, 64), (1, 2, 97, 64), None, False),
    ((2, 2, 97, 80), (2, 2, 33, 80), None, True),    # causal with Lq > Lk: rows before the diagonal see nothing
    ((1, 2, 33, 96), (1, 2, 300, 96), None, True),    # causal with Lq < Lk
    ((1, 1, 300, 128), (1, 1, 300, 128), None, True),
    ((2, 4, 65, 20), (2, 4, 65, 20), 36, False),      # head dims not a multiple of 8 and Dv != D
    ((1, 3, 45, 33), (1, 3, 71, 33), 17, True),       # odd head dims and lengths: the bf16 tiles' pair padding
    ((1, 2, 1025, 64), (1, 2, 1025, 64), None, True),
]


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{c[0]}-k{c[1]}-dv{c[2]}-causal{c[3]}")
def test_matches_float64(backend, device, case):
    shape_q, shape_k, dv, causal = case
    if _small(backend, device) and (shape_q[2] > 100 or shape_k[2] > 100):
        pytest.skip("the Triton interpreter and the CUDA emulation are slow: small shapes only on the CPU")
    for dtype in DTYPES[backend]:
        _check(backend, device, dtype, shape_q, shape_k, dv, causal=causal)


@pytest.mark.parametrize("backend,device", ALL)
def test_masks_gqa_and_noncontiguous(backend, device):
    lq, lk = (9, 37) if _small(backend, device) else (97, 300)
    g = torch.Generator().manual_seed(1)
    padding = torch.rand(3, 1, 1, lk, generator=g) > 0.3
    padding[1] = False  # batch 1: every key masked, so every row of it is fully masked
    general = torch.rand(3, 4, lq, lk, generator=g) > 0.2
    additive = torch.randn(1, 4, lq, lk, generator=g)
    additive[0, 0, 2] = -math.inf  # one fully masked row
    for dtype in DTYPES[backend]:
        for mask in (padding, general, additive):
            _check(backend, device, dtype, (3, 4, lq, 40), (3, 4, lk, 40), mask=mask)
        _check(backend, device, dtype, (3, 4, lq, 40), (3, 2, lk, 40), causal=True, mask=padding)  # GQA
        _check(backend, device, dtype, (3, 4, lq, 40), (3, 4, lk, 40), noncontiguous=True, mask=padding)
        # the decode path (Lq <= 4) with every mask kind, GQA and a non-contiguous cache-like layout
        for mask in (padding, general[:, :, :2], additive[:, :, :2]):
            _check(backend, device, dtype, (3, 4, 2, 40), (3, 4, lk, 40), mask=mask)
        _check(backend, device, dtype, (3, 4, 2, 40), (3, 2, lk, 40), causal=True, mask=padding, noncontiguous=True)


@pytest.mark.parametrize("backend,device", FUSED)
def test_key_padding_spanning_whole_key_tiles(backend, device):
    """Right and left padding over whole key tiles (the CPU kernel's tiles are 256 keys: it skips the
    tiles masked for every query, forward and backward): same results as torch, and padded keys get
    exactly zero gradients. Key-padding masks, per-head additive ones, the padding written out for every
    query (transformers' [B, 1, Lq, Lk]) with causality, and the decode path (Lq <= 4)."""
    if _small(backend, device):
        pytest.skip("the Triton interpreter and the CUDA emulation are slow: small shapes only on the CPU")
    lk = 600
    valid = [(0, 100), (300, 600), (10, 520), (0, 600), (0, 0)]  # keys [lo, hi) of each batch; the last: none
    padding = torch.zeros(len(valid), 1, 1, lk, dtype=torch.bool)
    for b, (lo, hi) in enumerate(valid):
        padding[b, ..., lo:hi] = True
    per_head = torch.randn(len(valid), 2, 1, lk).masked_fill(~padding, -math.inf)  # [B, H, 1, Lk] additive
    per_head[2, 1, :, :300] = -math.inf  # head 1 of batch 2 sees fewer keys than head 0
    for dtype in DTYPES[backend]:
        for lq in (70, 3):
            full = padding.expand(len(valid), 1, lq, lk).contiguous()
            full[2, :, 1:] = False  # batch 2: only query 0 sees keys
            for mask in (padding, per_head, full):
                _check(backend, device, dtype, (len(valid), 2, lq, 32), (len(valid), 2, lk, 32), mask=mask)
            _check(backend, device, dtype, (len(valid), 2, lq, 32), (len(valid), 2, lk, 32), mask=full, causal=True)
            _check(backend, device, dtype, (len(valid), 4, lq, 32), (len(valid), 2, lk, 32),
                   mask=per_head.repeat(1, 2, 1, 1))  # grouped-query attention
    q, k, v, go = _inputs((len(valid), 2, 70, 32), (len(valid), 2, lk, 32), 32, DTYPES[backend][0], device)
    _, _, gk, gv = _grads(lambda q, k, v: sdpa(q, k, v, padding.to(device), backend=backend), q, k, v, go)
    masked = ~padding.view(len(valid), 1, lk, 1).to(device).expand_as(gk)
    assert (gk[masked] == 0).all() and (gv[masked] == 0).all() and (gk[~masked] != 0).any()


@pytest.mark.parametrize("backend,device", ALL)
def test_masks_at_the_dtype_minimum(backend, device):
    """transformers masks with torch.finfo(dtype).min, not -inf, and that times log2(e) overflows: a row
    masked by it at every key (a left-padded prompt's padding rows) is a uniform average of the values
    in torch's SDPA, and must be here (not zeros, not NaN); partly masked rows and -inf rows as before.
    The gradients of such rows are bounded by torch's own error only, which is large: a log-sum-exp near
    -1e38 cannot hold log(L), so the flash backward (ours and torch's fused one) takes P = 1, not 1/L."""
    lq, lk = (6, 9) if _small(backend, device) else (70, 300)
    for dtype in DTYPES[backend]:
        low = torch.finfo(dtype).min
        mask = torch.zeros(2, 1, lq, lk, dtype=dtype)
        mask[0, :, 0] = low  # every key
        mask[0, :, 1, 3:] = low
        mask[1, :, :, lk // 2:] = low  # right padding of the keys
        mask[1, :, 2] = -math.inf  # fully masked: zeros
        mask[1, :, 3] = -1e30  # every key, by a finite value whose ulp exceeds the scores
        # every key, by values large enough that the rounding of max * log2(e) moved every exponent of the
        # row by up to 0.5 (-1e7: the softmax must not clamp such a common shift) or past 127 (-1e10: NaN
        # on AVX-512, where exp2 of that overflowed)
        mask[0, :, 4] = -1e7
        mask[0, :, 5] = -1e10
        _check(backend, device, dtype, (2, 2, lq, 32), (2, 2, lk, 32), mask=mask)
        left = torch.zeros(2, 1, 1, lk, dtype=dtype)
        left[1, ..., :4] = low  # a left-padded prompt under the causal mask: its first 4 rows see only padding
        _check(backend, device, dtype, (2, 2, lk, 32), (2, 2, lk, 32), mask=left.expand(2, 1, lk, lk), causal=True)


@pytest.mark.parametrize("backend,device", backend_params("cpu", "cuda", "torch"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where", ["key", "query", "mask"])
@pytest.mark.parametrize("shape", [(2, 64, 16), (1, 300, 8)], ids=lambda s: f"H{s[0]}L{s[1]}D{s[2]}")
@pytest.mark.parametrize("decode", [False, True], ids=["", "Lq4"])  # 4 queries: the CPU kernel's decode path
def test_nan_propagates_as_in_torch(backend, device, dtype, where, shape, decode):
    """A NaN score (in a key, a query or a float mask) makes its rows NaN, as torch's SDPA does; the
    running max had passed over it (std::max and fmaxf return the other operand), giving zeros or
    finite rows. (The Triton kernel is not checked: its max's NaN handling on a GPU is not the
    interpreter's.)"""
    if _small(backend, device) and shape[1] > 64:
        pytest.skip("the CUDA emulation runs small shapes")
    if dtype not in DTYPES[backend]:
        pytest.skip(f"the {backend} backend runs {DTYPES[backend]}")
    h, L, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, L, d, generator=g).to(dtype) for _ in range(3))
    mask = None
    if where == "key":
        k[0, 0, 10, 0] = math.nan
    elif where == "query":
        q[0, h - 1, 3, 2] = math.nan
    else:
        mask = torch.zeros(L, L, dtype=dtype)
        mask[3, 5] = math.nan
    if decode:
        q, mask = q[:, :, :4], (mask[:4] if mask is not None else None)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                          attn_mask=None if mask is None else mask.float()).isnan()
    assert want.any()
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    assert torch.equal(sdpa(dev(q), dev(k), dev(v), dev(mask), backend=backend).isnan().cpu(), want)
    if mask is None and backend == "cpu":  # the same through varlen_attention's packed rows
        lq = q.shape[2]
        cu_q, cu = torch.tensor([0, lq], dtype=torch.int32), torch.tensor([0, L], dtype=torch.int32)
        out = varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_q, cu, lq, L,
                               backend="cpu")
        assert torch.equal(out.transpose(0, 1)[None].isnan(), want)


def test_fully_masked_rows_give_zeros_and_zero_gradients():
    q, k, v, go = _inputs((2, 2, 5, 16), (2, 2, 6, 16), 16, torch.float32, "cpu")
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1] = False
    for backend in ("cpu", "torch"):
        out, gq, gk, gv = _grads(lambda q, k, v: sdpa(q, k, v, mask, backend=backend), q, k, v, go)
        assert torch.isfinite(out).all() and (out[1] == 0).all()
        assert (gq[1] == 0).all() and (gk[1] == 0).all() and (gv[1] == 0).all()
        assert (out[0] != 0).any()


def test_key_padding_mask_is_not_expanded(monkeypatch):
    """The [B, 1, 1, Lk] mask reaches the kernel as a stride-0 view of B*Lk values: the bool mask
    itself for the CPU kernels, which read it in place (no float copy)."""
    from bignlp_fast.ops import attention
    seen = {}
    real = attention.attention_fwd

    def spy(q, k, v, bias, *args):
        seen["bias"] = bias
        return real(q, k, v, bias, *args)

    monkeypatch.setattr(attention, "attention_fwd", spy)
    q = torch.randn(2, 3, 50, 16)
    mask = torch.rand(2, 1, 1, 70) > 0.5
    sdpa(q, torch.randn(2, 3, 70, 16), torch.randn(2, 3, 70, 16), mask, backend="cpu")
    bias = seen["bias"]
    assert bias.shape == (2, 3, 50, 70) and bias.stride() == (70, 0, 0, 1)
    assert bias.dtype == torch.bool and bias.data_ptr() == mask.data_ptr()


def test_three_dimensional_inputs_and_default_scale():
    q, k, v = torch.randn(3, 10, 16), torch.randn(3, 12, 16), torch.randn(3, 12, 8)
    mask = torch.rand(3, 10, 12) > 0.2
    mask[..., 0] = True
    torch.testing.assert_close(sdpa(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, mask))
    torch.testing.assert_close(sdpa(q, k, v, scale=0.3, backend="cpu"),
                               F.scaled_dot_product_attention(q, k, v, scale=0.3))


# ---- varlen -----------------------------------------------------------------------------------
def _varlen_case(lengths_q, lengths_k, hq, hk, d, dtype, device, causal):
    g = torch.Generator().manual_seed(2)
    tq, tk = sum(lengths_q), sum(lengths_k)
    q = torch.randn(tq, hq, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(tk, hk, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(tk, hk, d, generator=g).to(device=device, dtype=dtype)
    go = torch.randn(tq, hq, d, generator=g).to(device=device, dtype=dtype)
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32, device=device)  # noqa
    return q, k, v, go, cu(lengths_q), cu(lengths_k)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_varlen_matches_each_sequence_alone(backend, device, causal, decode):
    """Each packed sequence gives what attention over that sequence alone gives (bottom-right causal).
    "decode": at most 4 queries per sequence against a longer cache (the CPU kernel's decode path)."""
    # includes a sequence without queries and one without keys (its queries give zeros)
    if decode:
        lengths_q, lengths_k = [1, 4, 0, 2, 3], [9, 70 if not _small(backend, device) else 17, 3, 0, 2]
    else:
        lengths_q, lengths_k = ([5, 1, 17, 0, 3], [9, 4, 17, 3, 0]) if _small(backend, device) else \
            ([70, 1, 300, 0, 129, 4], [100, 3, 300, 5, 129, 0])
    for dtype in DTYPES[backend]:
        q, k, v, go, cu_q, cu_k = _varlen_case(lengths_q, lengths_k, 4, 2, 40, dtype, device, causal)
        args = (cu_q, cu_k, max(lengths_q), max(lengths_k))
        ref = _grads(lambda q, k, v: varlen_attention(q, k, v, *args, causal=causal, backend="torch"),
                     q.double(), k.double(), v.double(), go.double())
        # PyTorch's own error: F.scaled_dot_product_attention per sequence, in this dtype
        theirs = [torch.zeros_like(t) for t in (q, q, k, v)]
        qs, ks = cu_q.tolist(), cu_k.tolist()
        for s in range(len(lengths_q)):
            rq, rk = slice(qs[s], qs[s + 1]), slice(ks[s], ks[s + 1])
            lq, lk = rq.stop - rq.start, rk.stop - rk.start
            if lq == 0 or lk == 0:
                continue
            keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
            if causal:
                keep = keep.tril(lk - lq)

            def one(q_, k_, v_):
                return F.scaled_dot_product_attention(q_.transpose(0, 1), k_.transpose(0, 1), v_.transpose(0, 1),
                                                      keep, enable_gqa=True).transpose(0, 1)
            outs = _grads(one, q[rq], k[rk], v[rk], go[rq])
            for t, o, r in zip(theirs, outs, (rq, rq, rk, rk)):
                t[r] = o.nan_to_num(0.0)
        for path, context in tile_paths(backend, dtype):
            with context():
                ours = _grads(lambda q, k, v: varlen_attention(q, k, v, *args, causal=causal, backend=backend),
                              q, k, v, go)
            for name, a, c, r in zip(["out", "grad_q", "grad_k", "grad_v"], ours, theirs, ref):
                assert_within_torch_error(f"varlen {backend} {path} {dtype} causal={causal} {name}", a, c, r, dtype)


def test_varlen_bad_offsets():
    q, k, v, _, cu_q, cu_k = _varlen_case([3, 4], [3, 4], 2, 2, 8, torch.float32, "cpu", False)
    with pytest.raises(ValueError, match="cu_seqlens_q must be a 1-D int32"):
        varlen_attention(q, k, v, cu_q.long(), cu_k, 4, 4)
    with pytest.raises(ValueError, match="end at the token count 7"):
        varlen_attention(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32), cu_k, 4, 4)
    with pytest.raises(ValueError, match="longer than its max_seqlen 3"):
        varlen_attention(q, k, v, cu_q, cu_k, 3, 4)
    varlen_attention(q, k, v, cu_q, cu_k, 4, 4)  # passes: its offsets are remembered as checked...
    cu_q[1] = 5  # ... until they change in place
    with pytest.raises(ValueError, match="longer than its max_seqlen 4"):
        varlen_attention(q, k, v, cu_q, cu_k, 4, 4)
    cu_q[1] = 3
    varlen_attention(q, k, v, cu_q, cu_k, 4, 4)
    with pytest.raises(ValueError, match="longer than its max_seqlen 3"):  # ... or are checked against another bound
        varlen_attention(q, k, v, cu_q, cu_k, 3, 4)
    with pytest.raises(ValueError, match="k/v have 3 heads, which does not divide q's 2"):
        varlen_attention(q, torch.randn(7, 3, 8), torch.randn(7, 3, 8), cu_q, cu_k, 4, 4)
    with pytest.raises(ValueError, match="need at least one head, got 2 and 0"):
        varlen_attention(q, torch.randn(7, 0, 8), torch.randn(7, 0, 8), cu_q, cu_k, 4, 4)
    with pytest.raises(ValueError, match="head_dim must be at least 1"):  # was a ZeroDivisionError
        varlen_attention(q[..., :0], k[..., :0], v, cu_q, cu_k, 4, 4)


# ---- dropout ----------------------------------------------------------------------------------
def test_philox_matches_the_published_answer_and_python_ints():
    """Random123's known answer for Philox-4x32-10 at counter 0, key 0; and random counters against
    a plain-Python version (the int64 tensor arithmetic must not lose the product's high bits)."""
    words = philox4x32(torch.tensor([0]), torch.tensor([0]), 0, 0)
    assert [w.item() for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]

    def plain(c0, c1, k0, k1):
        c2 = c3 = 0
        for _ in range(10):
            p0, p1 = c0 * 0xD2511F53, c2 * 0xCD9E8D57
            c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        return c0, c1, c2, c3

    g = torch.Generator().manual_seed(3)
    c0, c1 = (torch.randint(0, 2 ** 32, (50,), generator=g) for _ in range(2))
    words = philox4x32(c0, c1, 0x12345678, 0x9ABCDEF0)
    for i in range(50):
        assert tuple(w[i].item() for w in words) == plain(c0[i].item(), c1[i].item(), 0x12345678, 0x9ABCDEF0)


@pytest.mark.parametrize("backend,device", ALL)
def test_dropout_same_mask_as_reference_and_reproducible(backend, device):
    """Every backend draws the reference's mask (so outputs and gradients match it), the same
    seed repeats it, and another seed changes it."""
    for shape_q, shape_k in (((2, 2, 9, 16), (2, 2, 9, 16)) if _small(backend, device) else
                             ((2, 3, 70, 40), (2, 3, 70, 40)), ((2, 3, 3, 40), (2, 3, 21, 40))):  # + decode path
        _check_dropout(backend, device, shape_q, shape_k)


def _check_dropout(backend, device, shape, shape_k):
    q, k, v, go = _inputs(shape, shape_k, shape[-1], torch.float32, device)
    dtype = DTYPES[backend][0]  # float32, but float16 for the cuda kernel (16-bit types only)

    def run(backend_, seed, dtype_):
        torch.manual_seed(seed)
        return _grads(lambda q, k, v: sdpa(q, k, v, dropout_p=0.3, is_causal=True, backend=backend_),
                      q.to(dtype_), k.to(dtype_), v.to(dtype_), go.to(dtype_))

    ours, again, other = run(backend, 0, dtype), run(backend, 0, dtype), run(backend, 1, dtype)
    ref = run("torch", 0, torch.float64)
    # a 16-bit kernel is held to the torch backend's error in that dtype, with the same mask
    theirs = run("torch", 0, dtype) if dtype != torch.float32 else None
    for name, a, b, r, c in zip(["out", "grad_q", "grad_k", "grad_v"], ours, again, ref, theirs or ref):
        assert torch.equal(a, b)
        if theirs is None:
            torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=2e-5)
        else:
            assert_within_torch_error(f"dropout {backend} {name}", a, c, r, dtype)
    assert not torch.equal(ours[0], other[0])


@pytest.mark.parametrize("backend,device", FUSED)
def test_dropout_in_bfloat16_on_every_tile_path(backend, device):
    """bf16 with dropout: the reference's mask, within the error of the same computation done by the
    torch backend in bf16 (torch's own SDPA draws another mask), on every tile path (AMX and not)."""
    shape = (2, 2, 9, 16) if _small(backend, device) else (2, 3, 70, 40)
    q, k, v, go = (t.bfloat16() for t in _inputs(shape, shape, shape[-1], torch.float32, device))

    def run(backend_, dtype):
        torch.manual_seed(0)
        return _grads(lambda q, k, v: sdpa(q, k, v, dropout_p=0.3, is_causal=True, backend=backend_),
                      q.to(dtype), k.to(dtype), v.to(dtype), go.to(dtype))

    theirs, ref = run("torch", torch.bfloat16), run("torch", torch.float64)
    for path, context in tile_paths(backend, torch.bfloat16):
        with context():
            ours = run(backend, torch.bfloat16)
        for name, a, c, r in zip(["out", "grad_q", "grad_k", "grad_v"], ours, theirs, ref):
            assert_within_torch_error(f"dropout {backend} {path} {name}", a, c, r, torch.bfloat16)


def test_use_amx_bf16_switches_the_path_and_restores_it():
    before = amx_bf16()
    with use_amx_bf16(False):
        assert not amx_bf16()
    assert amx_bf16() == before
    with use_amx_bf16(True):
        assert amx_bf16() == bignlp_fast._backend.compiled().amx_bf16_available()


def test_use_bf16_dot_switches_the_path_and_restores_it():
    compiled = bignlp_fast._backend.compiled()
    before = bf16_dot()
    with use_bf16_dot(False):
        assert not bf16_dot()
        with use_amx_bf16(False):
            assert bf16_tiles() == "fp32"
    assert bf16_dot() == before
    with use_bf16_dot(True), use_amx_bf16(False):
        assert bf16_dot() == compiled.bf16_dot_available()
        assert bf16_tiles() == ("avx512_bf16" if compiled.bf16_dot_available() else "fp32")


def test_dropout_statistics():
    """The kept fraction is 1 - p, and the mean output is unbiased (E[Z] = 1)."""
    keep = dropout_keep(1234, torch.arange(2_000_000), 0.3).float()
    assert abs(keep.mean().item() - 0.7) < 3e-3
    q = torch.zeros(1, 1, 64, 8)  # uniform attention: the output is the dropped mean of v
    v = torch.ones(1, 1, 4096, 8)
    torch.manual_seed(0)
    out = sdpa(q, torch.zeros(1, 1, 4096, 8), v, dropout_p=0.3, backend="cpu")
    assert abs(out.mean().item() - 1.0) < 0.01


# ---- autograd, opcheck, compile, errors -------------------------------------------------------
def test_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, n, 5, dtype=torch.float64, generator=g, requires_grad=True) for n in (4, 6, 6))
    mask = torch.rand(1, 1, 1, 6, generator=g) > 0.3
    for causal in (False, True):
        assert torch.autograd.gradcheck(lambda q, k, v: sdpa(q, k, v, mask, is_causal=causal, backend="torch"),
                                        (q, k, v))


def test_gradcheck_float_mask_that_requires_grad():
    """A learnable additive bias (T5-style) gets its gradient through the reference, recorded."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 4, 5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, b: sdpa(q, k, v, b), (q, k, v, bias))
    bias32 = bias.detach().float().requires_grad_()
    out = sdpa(q.detach().float(), k.detach().float(), v.detach().float(), bias32)
    torch.autograd.grad(out.sum(), bias32)
    assert any("attn_mask requires grad" in r["reason"] for r in bignlp_fast.report())


@pytest.mark.parametrize("backend,device", ALL)
def test_opcheck(backend, device):
    q, k, v, go = _inputs((2, 4, 9, 16), (2, 2, 11, 16), 8, DTYPES[backend][0], device)
    bias = torch.zeros(2, 1, 1, 11, device=device).masked_fill(torch.rand(2, 1, 1, 11, device=device) > 0.7,
                                                               -math.inf).expand(2, 4, 9, 11)
    seed = torch.tensor(7)
    for args in [(bias, None, None, 9, 11, 0.25, 0, 0.0, None), (None, None, None, 9, 11, 0.25, 1, 0.2, seed)]:
        torch.library.opcheck(torch.ops.bignlp_fast.attention_fwd, (q.requires_grad_(), k, v, *args, backend))
        out, lse = torch.ops.bignlp_fast.attention_fwd(q.detach(), k, v, *args, backend)
        torch.library.opcheck(torch.ops.bignlp_fast.attention_bwd,
                              (go, q.detach(), k, v, out, lse, *args, backend))


def test_compiles_without_graph_breaks():
    """A block that projects, attends with a padding mask, and projects back compiles fullgraph."""
    torch._dynamo.reset()
    proj = torch.nn.Linear(32, 96)

    def block(x, mask):
        q, k, v = proj(x).view(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
        return sdpa(q, k, v, mask, dropout_p=0.0).transpose(1, 2).reshape(2, 10, 32)

    x = torch.randn(2, 10, 32, requires_grad=True)
    mask = torch.rand(2, 1, 1, 10) > 0.2
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, mask), block(x, mask))
    compiled(x, mask).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_varlen_compiles_without_graph_breaks():
    """varlen_attention's offset checks read values: skipped while torch.compile traces (fullgraph)."""
    torch._dynamo.reset()
    x = torch.randn(9, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)

    def block(x, cu):
        return varlen_attention(x * 2, x, x, cu, cu, 6, 6, causal=True)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, cu)
    torch.testing.assert_close(out, block(x, cu))
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(block(x, cu).sum(), x)[0])


def test_bad_input_names_the_argument():
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    with pytest.raises(ValueError, match="key has head_dim 8 but query has 16"):
        sdpa(q, torch.randn(2, 4, 9, 8), v)
    with pytest.raises(ValueError, match=r"value has shape \(2, 4, 7, 16\)"):
        sdpa(q, k, torch.randn(2, 4, 7, 16))
    with pytest.raises(ValueError, match="query has 4 heads and key/value 2; that needs enable_gqa=True"):
        sdpa(q, k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="query has 4 heads and key/value 3"):
        sdpa(q, k[:, :3], v[:, :3], enable_gqa=True)
    with pytest.raises(ValueError, match="need at least one head, got 0 and 0"):  # not a division by zero
        sdpa(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match=r"head_dim must be at least 1, got query \(2, 4, 8, 0\)"):
        sdpa(q[..., :0], k[..., :0], v)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(8, 8\) does not broadcast"):
        sdpa(q, k, v, torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        sdpa(q, k, v, torch.ones(8, 9, dtype=torch.int64))
    with pytest.raises(TypeError, match="key has dtype torch.bfloat16 but query has torch.float32"):
        sdpa(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\]"):
        sdpa(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match=r"query must be \[B, H, L, D\] \(or any \[\.\.\., L, D\]\)"):
        sdpa(q[0, 0, 0], k[0, 0], v[0, 0])
    with pytest.raises(ValueError, match=r"the leading dimensions of query \(2, 4, 8, 16\), key \(3, 4, 9, 16\)"):
        sdpa(q, torch.randn(3, 4, 9, 16), torch.randn(3, 4, 9, 16))
    with pytest.raises(TypeError, match="query is a nested tensor.*call varlen_attention"):
        nested = torch.nested.nested_tensor([torch.randn(4, 3, 16), torch.randn(4, 5, 16)], layout=torch.jagged)
        sdpa(nested, nested, nested)
    with pytest.raises(bignlp_fast.BackendError, match="head_dim 600 is above the cpu backend's limit"):
        sdpa(torch.randn(1, 1, 2, 600), torch.randn(1, 1, 2, 600), torch.randn(1, 1, 2, 600), backend="cpu")


BROADCASTS = {  # (query, key/value shapes, extra arguments): what torch's SDPA broadcasts
    "key batch 1": ((2, 4, 8, 16), (1, 4, 9, 16), {}),
    "one key head": ((2, 4, 8, 16), (2, 1, 9, 16), {}),
    "key batch 1, one head": ((2, 4, 8, 16), (1, 1, 9, 16), {"is_causal": True}),
    "query batch 1": ((1, 4, 8, 16), (2, 4, 9, 16), {}),
    "one query head": ((2, 1, 8, 16), (2, 4, 9, 16), {}),
    "2-D": ((8, 16), (9, 16), {"is_causal": True}),
    "3-D with a 3-D mask": ((3, 8, 16), (3, 9, 16), {"attn_mask": "float"}),
    "4-D query, 3-D key": ((2, 4, 8, 16), (4, 9, 16), {}),
    "5-D with a mask": ((2, 3, 2, 8, 16), (1, 3, 2, 9, 16), {"attn_mask": "bool"}),
    "5-D GQA": ((2, 3, 4, 8, 16), (2, 3, 2, 9, 16), {"enable_gqa": True}),
    "no keys": ((2, 4, 8, 16), (2, 4, 0, 16), {}),
    "every weight dropped": ((2, 4, 8, 16), (2, 4, 9, 16), {"dropout_p": 1.0}),
}


@pytest.mark.parametrize("case", BROADCASTS)
def test_takes_every_shape_torch_takes(case):
    """Leading dimensions broadcast as in torch's SDPA (any number of them, key/value batch or head 1),
    no keys and dropout_p=1 give zeros: against torch's SDPA in float64, forward and gradients."""
    q_shape, kv_shape, kwargs = BROADCASTS[case]
    gen = torch.Generator().manual_seed(len(case))
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64) for s in (q_shape, kv_shape, kv_shape))
    if "attn_mask" in kwargs:  # a mask over the leading dims but one, and the heads, of the output
        shape = (*q_shape[:-3], 1, q_shape[-2], kv_shape[-2])[-len(q_shape):]
        mask = torch.rand(shape, generator=gen)
        kwargs = {**kwargs, "attn_mask": mask > 0.3 if kwargs["attn_mask"] == "bool" else mask.log()}
    ours_in = [t.float().requires_grad_() for t in (q, k, v)]
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sdpa(*ours_in, **kwargs)
    ref_kwargs = {**kwargs, "dropout_p": 0.0}
    if "attn_mask" in kwargs and kwargs["attn_mask"].is_floating_point():
        # the reference's mask in float64 too: torch 2.14's CPU SDPA misread a float32 mask beside float64
        # queries (3-D inputs, an AVX2 build: errors of 3.8 against softmax(q k^T / sqrt(d) + mask) v)
        ref_kwargs["attn_mask"] = kwargs["attn_mask"].double()
    ref = F.scaled_dot_product_attention(*ref_in, **ref_kwargs)
    if kwargs.get("dropout_p") == 1.0:
        ref = ref * 0  # torch's own dropout at p=1
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), ours_in, allow_unused=True)
    ref_grads = torch.autograd.grad(ref.sum(), ref_in)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double() if g is not None else torch.zeros_like(r), r, atol=1e-5, rtol=1e-4)
    assert not bignlp_fast.report(), "a broadcast call must run the fused kernel, not fall back"


def test_float16_on_the_cpu_runs_the_float32_kernel():
    """float16 CPU tensors: converted to float32 for the CPU kernel and back (no fallback to the
    reference, which took ~9x torch's time), as accurate as torch's float16 CPU attention."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 33, 33, generator=gen) > 0.2
    ref = F.scaled_dot_product_attention(q, k, v, mask)
    halves = [t.half().requires_grad_() for t in (q, k, v)]
    out = sdpa(*halves, mask)
    assert out.dtype == torch.float16 and not bignlp_fast.report()
    torch_err = (F.scaled_dot_product_attention(*(t.half() for t in (q, k, v)), mask).double() - ref).abs().max()
    assert (out.double() - ref).abs().max() <= 1.5 * torch_err + 1e-3
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float16 for t in halves)
    cu = torch.tensor([0, 33], dtype=torch.int32)
    packed = varlen_attention(*(t.detach()[0].transpose(0, 1) for t in halves), cu, cu, 33, 33)
    torch.testing.assert_close(packed.transpose(0, 1), sdpa(*(t.detach()[:1] for t in halves))[0])
    assert not bignlp_fast.report()


def test_unsupported_dtype_falls_back_with_a_record():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    out = sdpa(q, q, q)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
    assert any(r["op"] == "attention" and r["backend"] == "cpu" for r in bignlp_fast.report())
