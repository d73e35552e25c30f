"""linear (x @ W^T + b) on the project's packed GEMM, against float64."""

import pytest
import torch
import torch.nn.functional as F

from bignlp_fast.ops import linear
from conftest import backend_params, tile_paths
from reference import assert_within_torch_error

BACKENDS = backend_params("cpu", "torch")


@pytest.mark.parametrize("backend,device", BACKENDS)
# (1100, 601, 70): K past one 512-deep slice of the packed A (forward: 601, odd for the bf16 pairs;
# grad_w: 1100 rows), and ragged row blocks and column panels
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 13, 29), (3, 5, 70, 33), (300, 257, 65), (80, 300, 40),
                                   (1100, 601, 70)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64(backend, device, shape, dtype, with_bias):
    *lead, k, n = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    gy = torch.randn(*lead, n, generator=g).to(dtype)

    def run(fn, x, w, b, gy):
        leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
        y = fn(*leaves) if b is not None else fn(*leaves, None)
        return [y, *torch.autograd.grad(y, leaves, gy)]

    theirs = run(F.linear, x, w, b, gy)
    ref = run(F.linear, x.double(), w.double(), b.double() if b is not None else None, gy.double())
    for path, context in tile_paths(backend, dtype):  # bf16: the packed GEMM's dot-product and fp32 tiles
        with context():
            ours = run(lambda x, w, b: linear(x, w, b, backend=backend), x, w, b, gy)
        for name, a, c, r in zip(["y", "grad_x", "grad_w", "grad_b"], ours, theirs, ref):
            assert_within_torch_error(f"linear {backend} {path} {shape} {dtype} {name}", a, c, r, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 15, 16, 17], ids=lambda m: f"M{m}")  # the skinny kernels up to 16 rows
# K 1000: 8 chunks, a short last one; N 512: the partial sums' rows padded off a multiple of 1 KiB;
# (600, 96) at 17 rows: the packed GEMM reading a [K, N] weight in place, in two slices of K
@pytest.mark.parametrize("kn", [(5, 3), (70, 33), (768, 50), (1000, 70), (72, 512), (600, 96)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["w[N,K]", "w=wt[K,N].t()"])
def test_decode_sized_inputs_in_both_weight_layouts(backend, device, m, kn, dtype, transposed):
    k, n = kn
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(dtype)
    wt = (torch.randn(k, n, generator=g) * k ** -0.5).to(dtype)  # transformers' Conv1D layout [K, N]
    w = wt.t() if transposed else wt.t().contiguous()
    b = torch.randn(n, generator=g).to(dtype)
    ref = F.linear(x.double(), w.double(), b.double())
    assert_within_torch_error(f"linear {backend} M{m} {kn} {dtype}", linear(x, w, b, backend=backend),
                              F.linear(x, w, b), ref, dtype)
    # the backward takes the transposed weight too (as a contiguous copy)
    w_leaf = wt.detach().requires_grad_()
    linear(x, w_leaf.t() if transposed else w_leaf.t().contiguous(), b, backend=backend).sum().backward()
    torch.testing.assert_close(w_leaf.grad.double(), x.double().sum(0)[:, None].expand(k, n),
                               **({"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.02, "atol": 0.05}))


@pytest.mark.parametrize("m", [17, 40, 64], ids=lambda m: f"M{m}")  # one row block of the packed GEMM
# K 1100: three slices of K, the last short; N 70: two whole panels and a partial one (6 columns)
@pytest.mark.parametrize("kn", [(1100, 70), (513, 64), (40, 33)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_row_block_packs_the_weight_slice_by_slice(m, kn, dtype):
    """Up to one row block, the packed GEMM packs each panel's slice of a [N, K] weight as its tile
    needs it (gemm.h's local_b), not the whole weight first: every slice and the partial panel count."""
    k, n = kn
    g = torch.Generator().manual_seed(2)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    ref = F.linear(x.double(), w.double(), b.double())
    for path, context in tile_paths("cpu", dtype):
        with context():
            ours = linear(x, w, b, backend="cpu")
        assert_within_torch_error(f"linear M{m} {kn} {dtype} {path}", ours, F.linear(x, w, b), ref, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    x, w, b = torch.randn(5, 7, requires_grad=True), torch.randn(3, 7, requires_grad=True), torch.randn(3)
    torch.library.opcheck(torch.ops.bignlp_fast.linear_fwd, (x, w, b, backend))
    torch.library.opcheck(torch.ops.bignlp_fast.linear_fwd, (x, w, None, backend))
    torch.library.opcheck(torch.ops.bignlp_fast.linear_bwd, (torch.randn(5, 3), x.detach(), w.detach(), True, backend))
    if backend == "cpu":  # with a packed weight, past the streaming kernels' rows
        x40, w = torch.randn(40, 7, requires_grad=True), torch.randn(3, 7, requires_grad=True)
        packed = _cpu_kernels().linear_pack_cpu(w.detach())
        torch.library.opcheck(torch.ops.bignlp_fast.linear_fwd, (x40, w, b, backend, packed))


def test_gradcheck_float64():
    """The reference's gradients (float64 runs there; the cpu kernel is float32 / bfloat16 and is
    compared with float64 above)."""
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 3, 6), (5, 6), (5,)))
    assert torch.autograd.gradcheck(lambda x, w, b: linear(x, w, b, backend="torch"), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: linear(x, w, backend="torch"), (x, w))


def test_compiles_without_graph_breaks():
    def block(x, w1, b1, w2):
        return linear(F.relu(linear(x, w1, b1, backend="cpu")), w2, backend="cpu")

    x = torch.randn(40, 64, requires_grad=True)
    w1, b1, w2 = (torch.randn(*s, requires_grad=True) for s in ((48, 64), (48,), (16, 48)))
    compiled = torch.compile(block, fullgraph=True)
    got, want = compiled(x, w1, b1, w2), block(x, w1, b1, w2)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.square().sum(), (x, w1, b1, w2))
    for g, r in zip(grads, torch.autograd.grad(want.square().sum(), (x, w1, b1, w2))):
        torch.testing.assert_close(g, r)


def test_bad_input():
    with pytest.raises(ValueError, match=r"weight must be \[N, 4\]"):
        linear(torch.randn(2, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(2))


# ---- nn.Linear: torch.nn.Linear's drop-in on the faster GEMM ---------------------------------------
# (rows per batch of 2, in, out): decoding-sized (2 rows, 6 rows) with a small and with a large weight;
# a small and a larger product
@pytest.mark.parametrize("rows,k,n", [(1, 1024, 768), (3, 96, 40), (3, 1024, 512), (200, 96, 40), (200, 256, 160)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nn_linear_is_a_drop_in_for_torch_nn_linear(rows, k, n, dtype):
    import bignlp_fast.nn as bnn
    from bignlp_fast import _backend
    from bignlp_fast.ops.linear import linear_is_faster
    torch.manual_seed(0)
    ref = torch.nn.Linear(k, n).to(dtype)
    ours = bnn.Linear(k, n).to(dtype)
    assert isinstance(ours, torch.nn.Linear)
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, rows, k).to(dtype)
    # the GEMM it takes (the rule's branches: test_the_rule_for_float32_products_per_build below):
    # decoding sizes with a large weight on ops.linear (but 2 rows of this weight in float32 where MKL's
    # matrix-vector kernels are the faster); float32 products of 400 rows by a 160 KiB
    # weight too, unless torch's sgemm is the faster one or the CPU kernels are an AVX2 build (Zen 1 /
    # Zen 2, where the packed GEMM wins only from a 1 MiB weight); bfloat16 products beyond 2 rows
    # where torch's bf16 GEMM has no vector kernels (a CPU without AVX-512); F.linear otherwise
    fp32, blas_fast, avx2 = dtype == torch.float32, _backend.blas_sgemm_is_fast(), _backend.cpu_kernels_avx2()
    bf16_generic = not fp32 and not _backend.blas_bf16_gemm_is_fast()
    mkl_gemv = fp32 and blas_fast and not avx2  # 2 rows of a [N, K] weight on MKL's gemv (an Intel CPU)
    expect_ours = {(1, 1024, 768): not mkl_gemv, (3, 96, 40): False, (3, 1024, 512): fp32 or bf16_generic,
                   (200, 96, 40): bf16_generic,
                   (200, 256, 160): (fp32 and not blas_fast and not avx2) or bf16_generic}[(rows, k, n)]
    assert linear_is_faster(x, ours.weight) == expect_ours
    x64, ref64 = x.double().requires_grad_(), torch.nn.Linear(k, n).double()
    ref64.load_state_dict(ref.state_dict())
    leaves = lambda m, t: [t, *m.parameters()]  # noqa: E731
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [m(t) for m, t in ((ours, xs[0]), (ref, xs[1]))]
    g = torch.randn_like(outs[0])
    got, theirs = ([o, *torch.autograd.grad(o, leaves(m, t), g)] for o, m, t in ((outs[0], ours, xs[0]), (outs[1], ref, xs[1])))
    y64 = ref64(x64)
    want = [y64, *torch.autograd.grad(y64, leaves(ref64, x64), g.double())]
    for name, a, c, r in zip(["y", "grad_x", "grad_w", "grad_b"], got, theirs, want):
        assert_within_torch_error(f"nn.Linear rows {rows} {dtype} {name}", a, c, r, dtype)


@pytest.mark.parametrize("avx2", [False, True], ids=["avx512-build", "avx2-build"])
def test_the_rule_for_float32_products_per_build(monkeypatch, avx2):
    """linear_is_faster's float32 branches, the machine's answers replaced: decoding sizes by the
    weight's size; past them, MIN_MACS in an AVX-512 build; in an AVX2 build (Zen 1 / Zen 2) the
    streaming kernels up to linear_streaming_rows() rows (SHORT_ROWS_AVX2 with a backward to come or a
    weight stored [K, N]), then the packed GEMM from MIN_ROWS_AVX2 rows with a 1 MiB weight; and F.linear at every
    size past the decoding ones where torch's sgemm is the faster."""
    import importlib
    from bignlp_fast import _backend
    lin = importlib.import_module("bignlp_fast.ops.linear")
    if _backend.unavailable("cpu", torch.device("cpu")) is not None:
        pytest.skip("the CPU kernels are not built: linear_is_faster is False at every size")
    monkeypatch.delenv("BIGNLP_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "blas_sgemm_is_fast", lambda: False)
    monkeypatch.setattr(_backend, "cpu_kernels_avx2", lambda: avx2)
    monkeypatch.setattr(_backend, "linear_streaming_rows",
                        lambda prepacked=False: (32 if prepacked else 64) if avx2 else 16)

    def faster(rows, k, n, grad=False, transposed=False, prepacked=False):
        return lin.linear_is_faster_for(torch.device("cpu"), torch.float32, rows, k, n, grad, transposed, prepacked)

    assert faster(16, 512, 512) and not faster(16, 256, 256)  # 1 MiB of weight, and 256 KiB
    if avx2:
        assert faster(17, 512, 512) and faster(64, 768, 3072) and not faster(64, 256, 256)
        assert faster(32, 512, 512, grad=True) and not faster(33, 512, 512, grad=True)
        assert faster(32, 768, 2304, transposed=True) and not faster(33, 768, 2304, transposed=True)
        assert not faster(65, 768, 768) and not faster(159, 768, 768) and faster(160, 512, 512)
        assert not faster(1024, 256, 256) and faster(1024, 768, 3072, grad=True)
        # a weight packed already: the streaming kernels to 32 rows, then the packed GEMM from 512 KiB
        assert faster(32, 768, 768, prepacked=True) and faster(33, 768, 768, prepacked=True)
        assert faster(128, 384, 384, prepacked=True) and not faster(128, 256, 256, prepacked=True)
    else:
        assert faster(17, 512, 512) and faster(33, 512, 512, grad=True)  # 4.5M multiply-adds and up
        assert not faster(64, 128, 128) and faster(64, 256, 256) and faster(1024, 256, 256)
    monkeypatch.setattr(_backend, "blas_sgemm_is_fast", lambda: True)
    assert faster(16, 512, 512) and not faster(17, 512, 512) and not faster(1024, 768, 3072)
    # ... but a weight packed once, on the kernel that reads x in place (where the build has it): to
    # PREPACKED_ROWS rows, from 1 MiB of weight
    for direct in (0, 256):
        monkeypatch.setattr(_backend, "linear_prepacked_direct_rows", lambda direct=direct: direct)
        assert faster(17, 512, 512, prepacked=True) == bool(direct) == faster(48, 768, 3072, prepacked=True)
        assert not faster(49, 768, 3072, prepacked=True) and not faster(32, 256, 512, prepacked=True)
        assert not faster(32, 384, 384, prepacked=True) and not faster(256, 768, 768, prepacked=True)
    # MKL's matrix-vector kernels (an Intel CPU, AVX-512 build): F.linear at 1 row, and 2 of a [N, K] weight
    assert faster(1, 768, 3072) == avx2 and faster(2, 768, 3072) == avx2
    assert faster(2, 768, 3072, transposed=True) and faster(4, 768, 3072)
    x, w = torch.randn(32, 512, requires_grad=True), torch.randn(512, 512)
    monkeypatch.setattr(_backend, "blas_sgemm_is_fast", lambda: False)
    assert lin.linear_is_faster(x, w)  # 32 rows with a backward to come: within every build's limit
    x40 = torch.randn(40, 512, requires_grad=True)
    assert lin.linear_is_faster(x40, w) != avx2
    with torch.no_grad():
        assert lin.linear_is_faster(x40, w)
        assert lin.linear_is_faster(x40, torch.randn(512, 512).t()) != avx2  # a weight stored [K, N]


def test_nn_linear_pins_a_backend_and_converts_from_torch():
    import bignlp_fast.nn as bnn
    ref = torch.nn.Linear(8, 5, bias=False)
    ours = bnn.Linear.from_torch(ref, backend="torch")
    assert ours.weight is ref.weight and ours.bias is None and ours.backend == "torch"
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), ref(x))
    with pytest.raises(Exception, match="cuda"):
        bnn.Linear(8, 5, backend="cuda")(x)


@pytest.mark.parametrize("env", ["triton", "torch"])
def test_a_backend_named_in_the_environment_that_linear_lacks_leaves_the_products_to_f_linear(monkeypatch, env):
    """BIGNLP_FAST_BACKEND=triton (how Triton is tested on a CPU) or torch: nn.Linear and the models'
    products go to F.linear at every size, instead of failing where ops.linear would have been
    chosen (it has no triton kernel) and working where F.linear was."""
    import bignlp_fast.nn as bnn
    from bignlp_fast.ops.linear import linear_is_faster
    monkeypatch.setenv("BIGNLP_FAST_BACKEND", env)
    layer = bnn.Linear(256, 256)
    for rows in (1, 8, 64, 512):
        x = torch.randn(rows, 256)
        assert not linear_is_faster(x, layer.weight)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    big = torch.randn(512, 256)
    monkeypatch.delenv("BIGNLP_FAST_BACKEND")
    automatic = linear_is_faster(big, layer.weight)
    monkeypatch.setenv("BIGNLP_FAST_BACKEND", "cpu")
    assert linear_is_faster(big, layer.weight) == automatic  # naming cpu changes nothing


# ---- prepack: weights packed once ---------------------------------------------------------------
def _cpu_kernels():
    from bignlp_fast import _backend
    if _backend.unavailable("cpu", torch.device("cpu")) is not None:
        pytest.skip("the CPU kernels are not built")
    return _backend.compiled()


@pytest.fixture
def lin():
    """bignlp_fast.ops.linear (the module; bignlp_fast.ops.linear is the function), its registry of
    prepacked weights emptied before and after the test."""
    import importlib
    module = importlib.import_module("bignlp_fast.ops.linear")
    module._PREPACKED.clear()
    yield module
    module._PREPACKED.clear()


@pytest.mark.parametrize("rows", [33, 97, 300], ids=lambda r: f"M{r}")  # past the streaming kernels; 2 row blocks
# N 70: a partial column panel; K 601: two 512-deep slices of A with AVX-512, an odd K for bf16 pairs
@pytest.mark.parametrize("kn", [(64, 96), (601, 70)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["w[N,K]", "w=wt[K,N].t()"])
def test_a_prepacked_weight_gives_the_products_of_the_weight(lin, rows, kn, dtype, transposed):
    """The op on a packed copy against float64, and the same copy corrupted: the kernel reads it."""
    C = _cpu_kernels()
    k, n = kn
    g = torch.Generator().manual_seed(2)
    x = torch.randn(rows, k, generator=g).to(dtype)
    wt = (torch.randn(k, n, generator=g) * k ** -0.5).to(dtype)
    w = wt.t() if transposed else wt.t().contiguous()
    b = torch.randn(n, generator=g).to(dtype)
    ref = F.linear(x.double(), w.double(), b.double())
    for path, context in tile_paths("cpu", dtype):  # bf16: pairs for the dot products, fp32 panels else
        with context():
            packed = C.linear_pack_cpu(w)
            y = C.linear_fwd_cpu(x, w, b, packed)
            assert_within_torch_error(f"prepacked {path} M{rows} {kn} {dtype}", y, F.linear(x, w, b), ref, dtype)
            # both on the packed GEMM: the same sums (float32 up to linear_prepacked_direct_rows() rows of a
            # packed weight take prepacked_rows_gemm, which adds in another order: the float64 check above)
            direct = dtype == torch.float32 and rows <= C.linear_prepacked_direct_rows()
            if rows > C.linear_streaming_rows(False) and not direct:
                torch.testing.assert_close(y, C.linear_fwd_cpu(x, w, b, None), rtol=0, atol=0)
            assert not torch.equal(C.linear_fwd_cpu(x, w, b, torch.zeros_like(packed)), y)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kn", [(300, 70), (64, 32), (1000, 200)], ids=str)
def test_a_prepacked_weight_read_with_x_in_place(lin, bias, kn):
    """The float32 kernel for a packed weight that reads x in place (prepacked_rows_gemm, up to
    linear_prepacked_direct_rows() rows where the build has it, else the packed GEMM): with and without
    a bias, a partial last panel, against float64."""
    C = _cpu_kernels()
    k, n = kn
    g = torch.Generator().manual_seed(4)
    w = torch.randn(n, k, generator=g) * k ** -0.5
    b = torch.randn(n, generator=g) if bias else None
    packed = C.linear_pack_cpu(w)
    for rows in (17, 40, 256):
        x = torch.randn(rows, k, generator=g)
        y = C.linear_fwd_cpu(x, w, b, packed)
        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        assert_within_torch_error(f"prepacked M{rows} {kn}", y, F.linear(x, w, b), ref, torch.float32)


def test_marked_weights_are_packed_once_and_again_when_they_change(lin):
    """ops.linear on a marked weight (nn.Linear's products take it where linear_is_faster says so):
    one copy, made again after an in-place update, load_state_dict, a replaced .data and .to(dtype)."""
    _cpu_kernels()
    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(512, 768)
    x = torch.randn(64, 512, generator=g)

    def check():
        assert_within_torch_error("prepacked", lin.linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias),
                                  F.linear(x.double(), layer.weight.double(), layer.bias.double()), torch.float32)

    assert lin.prepack(layer) == 1 and lin.prepack(layer) == 0  # the bias is no product's weight
    assert lin.prepacked_weights() == 1 and lin.prepacked_bytes() == 0  # marked; packed at first use
    with torch.no_grad():
        check()
        packed = lin._packed(layer.weight)
        assert lin.prepacked_bytes() == packed.numel() * 4 >= layer.weight.numel() * 4
        assert lin._packed(layer.weight) is packed  # kept
        layer.weight.mul_(-1)  # in place
        check()
        assert lin._packed(layer.weight) is not packed
        layer.load_state_dict({"weight": torch.randn(768, 512, generator=g), "bias": layer.bias.clone()})
        check()
        layer.weight.data = torch.randn(768, 512, generator=g)  # a new storage, the same version counter
        check()
        # in place through .data (a version counter of its own, the same storage: no check sees it), then
        # prepack again, as documented: marked already, so its copies are dropped and made anew
        layer.weight.data.mul_(0.5)
        assert lin.prepack(layer) == 0
        assert lin.prepacked_bytes() == 0
        check()
    assert lin.prepacked_bytes() == packed.numel() * 4  # one copy: the stale ones went
    layer.to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    with torch.inference_mode():
        y = lin.linear(x, layer.weight, layer.bias)
    assert_within_torch_error("prepacked bf16", y, F.linear(x, layer.weight, layer.bias),
                              F.linear(x.double(), layer.weight.double(), layer.bias.double()), torch.bfloat16)
    assert lin.prepack(layer, enabled=False) == 1 and lin.prepacked_bytes() == 0 == lin.prepacked_weights()


def test_prepacked_copies_only_outside_autograd_and_compile(lin):
    _cpu_kernels()
    layer = torch.nn.Linear(512, 768)
    lin.prepack(layer.weight)
    x = torch.randn(64, 512)
    lin.linear(x, layer.weight, layer.bias).sum().backward()  # autograd records it for the weight: no copy
    assert lin.prepacked_bytes() == 0 and layer.weight.grad is not None
    layer.weight.requires_grad_(False)  # frozen: packed once, and x's gradient still flows
    xg = x.clone().requires_grad_()
    lin.linear(xg, layer.weight, layer.bias).sum().backward()
    assert lin.prepacked_bytes() > 0
    torch.testing.assert_close(xg.grad, layer.weight.sum(0).expand(64, 512))
    lin.prepack(layer.weight, enabled=False)
    lin.prepack(layer.weight)
    compiled = torch.compile(lambda x: lin.linear(x, layer.weight, layer.bias), fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias))
    assert lin.prepacked_bytes() == 0  # a compiled graph takes the weights as they are


def test_a_traced_prepacked_layer_computes_what_eager_does(lin):
    # torch.jit.trace records the packing kernel's empty output, not what fills it: a trace must take the
    # weight as it is (a traced prepacked layer gave garbage, 1e31 or NaN)
    _cpu_kernels()
    import bignlp_fast.nn as bnn
    layer = bnn.Linear(256, 1024).eval()
    lin.prepack(layer)
    x = torch.randn(100, 256)  # enough rows for the packed GEMM
    with torch.no_grad():
        traced = torch.jit.trace(layer, x)
        torch.testing.assert_close(traced(x), F.linear(x, layer.weight, layer.bias))
        torch.testing.assert_close(traced(2 * x), F.linear(2 * x, layer.weight, layer.bias))


def test_a_weight_unmarked_by_another_thread_meanwhile_packs_per_call(lin):
    # another thread's prepack(w, enabled=False) between the check that w is marked and the use of its
    # copy: the product packs per call (it raised KeyError)
    _cpu_kernels()
    layer = torch.nn.Linear(256, 1024)
    lin.prepack(layer)
    lin.prepack(layer, enabled=False)
    x = torch.randn(100, 256)
    with torch.no_grad():
        y = lin._linear(x, layer.weight, layer.bias, None, True)  # True: what the check had found
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))


def test_exports_with_a_dynamic_row_count():
    # the rule that picks a GEMM by row count would guard the dimension: torch.export refused a range
    # across its thresholds (32, 64, 160 rows)
    import bignlp_fast.nn as bnn
    layer = bnn.Linear(512, 512).eval()
    rows = torch.export.Dim("rows", min=8, max=100)
    program = torch.export.export(layer, (torch.randn(3, 8, 512),), dynamic_shapes=({1: rows},))
    for n in (8, 40, 100):
        x = torch.randn(3, n, 512)
        torch.testing.assert_close(program.module()(x), F.linear(x, layer.weight, layer.bias))


def test_optimize_prepack_keeps_the_outputs_of_a_model(lin):
    """nn.MultiheadAttention passes slices of in_proj_weight (views at offsets) and transposed weights
    go in place: each view its own packed copy."""
    _cpu_kernels()
    import bignlp_fast
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384))
    mha = torch.nn.MultiheadAttention(384, 6, batch_first=True, kdim=384, vdim=384)
    x = torch.randn(2, 40, 384)
    with torch.no_grad():
        want = model(x), mha(x, x + 1, x - 1, need_weights=False)[0]
    report = bignlp_fast.optimize(model, prepack=True)
    assert report.prepacked == 2 and "2 weights marked for prepacking" in report.summary()
    assert bignlp_fast.optimize(mha, prepack=True).prepacked == 2  # in_proj_weight and out_proj.weight
    with torch.no_grad():
        got = model(x), mha(x, x + 1, x - 1, need_weights=False)[0]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        packed_here = lin.linear_is_faster(x, mha.out_proj.weight)  # not where F.linear is the faster (MKL on Intel)
    if packed_here:
        views = sorted(len(entries) for entries in lin._PREPACKED.values())
        assert views == [1, 1, 1, 3]  # the two Linears, out_proj, and in_proj_weight's q, k and v slices


def test_prepack_bad_input(lin):
    C = _cpu_kernels()
    with pytest.raises(TypeError, match="2-D floating-point"):
        lin.prepack(torch.zeros(3, dtype=torch.float32))
    with pytest.raises(TypeError, match="2-D floating-point"):
        lin.prepack([torch.zeros(3, 3, dtype=torch.int64)])
    w = torch.randn(70, 64)
    with pytest.raises(RuntimeError, match="packed does not hold w"):
        C.linear_fwd_cpu(torch.randn(40, 64), w, None, C.linear_pack_cpu(torch.randn(70, 32)))
    with pytest.raises(RuntimeError, match="packed does not hold w"):
        C.linear_fwd_cpu(torch.randn(40, 64), w, None, C.linear_pack_cpu(w).double())
    # the predicate behind that check, which also tells the registry a copy is stale
    assert C.linear_packed_fits(C.linear_pack_cpu(w), w) and C.linear_packed_fits(C.linear_pack_cpu(w.t().contiguous().t()), w)
    assert not C.linear_packed_fits(C.linear_pack_cpu(torch.randn(70, 32)), w)
    assert not C.linear_packed_fits(C.linear_pack_cpu(w).double(), w)
    assert not C.linear_packed_fits(C.linear_pack_cpu(w)[::2], w[:35])
    bf16 = w.bfloat16()  # fp32 panels, or bf16 pairs (int32) where AVX512_BF16 dot products run
    assert C.linear_packed_fits(C.linear_pack_cpu(bf16), bf16)
    assert C.linear_packed_fits(C.linear_pack_cpu(w), bf16) == (not C.bf16_dot())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rows", [1, 3, 40, 80], ids=lambda r: f"M{r}")  # the streaming kernels and the packed GEMM
def test_an_empty_sum_gives_the_bias(lin, backend, device, rows):
    """K == 0: y is the bias (or zeros), as F.linear gives; it once divided by zero in the streaming
    kernels and killed the process."""
    w, b = torch.randn(70, 0), torch.randn(70)
    lin.prepack(w)
    with torch.no_grad():
        torch.testing.assert_close(linear(torch.randn(2, rows, 0), w, b, backend=backend), b.expand(2, rows, 70))
    x, w = torch.randn(rows, 0, requires_grad=True), w.clone().requires_grad_()
    y = linear(x, w, None, backend=backend)
    assert torch.equal(y, torch.zeros(rows, 70))
    y.sum().backward()
    assert x.grad.shape == (rows, 0) and w.grad.shape == (70, 0)
