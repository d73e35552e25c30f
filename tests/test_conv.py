import pytest
import torch
import torch.nn.functional as F

from bignlp_fast import _C, _backend, ops
from bignlp_fast.ops._activation import activation_torch, check_activation
from conftest import backend_params
from reference import assert_within_torch_error

BACKENDS = backend_params("cpu", "cuda", "triton", "torch")
DTYPES = {"cpu": (torch.float32, torch.bfloat16), "torch": (torch.float32, torch.bfloat16),
          "cuda": (torch.float32, torch.float16, torch.bfloat16),
          "triton": (torch.float32, torch.float16, torch.bfloat16)}
ACTIVATIONS = [None, "relu", "gelu", "silu", "tanh"]
# (x shape, weight shape, stride, padding, dilation, groups)
CONV1D = [((2, 4, 13), (6, 4, 3), 1, 1, 1, 1), ((1, 6, 17), (4, 3, 5), 2, 2, 1, 2),
          ((3, 5, 9), (7, 5, 2), 1, 0, 3, 1), ((2, 4, 1), (4, 1, 1), 1, 0, 1, 4)]
CONV2D = [((2, 3, 7, 9), (5, 3, 3, 3), 1, 1, 1, 1), ((1, 4, 8, 6), (6, 2, 3, 2), (2, 1), (1, 0), (1, 2), 2)]


def _eager(nd, stride, padding, dilation, groups, activation):
    conv = F.conv1d if nd == 1 else F.conv2d

    def f(x, w, b, r):
        y = activation_torch(conv(x, w, b, stride, padding, dilation, groups), check_activation("t", activation))
        return y + r if r is not None else y
    return f


def _check(backend, device, dtype, xs, ws, stride, padding, dilation, groups, activation, bias=True, residual=False,
           channels_last=False):
    nd = len(xs) - 2
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last and nd == 2 else torch.contiguous_format

    def mk(*s):
        t = torch.randn(*s, generator=g).to(device=device, dtype=dtype)
        return (t.contiguous(memory_format=fmt) if t.dim() == 4 else t).requires_grad_()
    if channels_last and nd == 1:  # a [B, L, C] activation transposed to [B, C, L], as sequence models hold it
        x = mk(xs[0], xs[2], xs[1]).detach().transpose(1, 2).requires_grad_()
    else:
        x = mk(*xs)
    w, b = (torch.randn(*ws, generator=g) * 0.3).to(device=device, dtype=dtype).requires_grad_(), \
        (mk(ws[0]) if bias else None)
    eager = _eager(nd, stride, padding, dilation, groups, activation)
    out_shape = eager(x, w, b, None).shape
    r = mk(*out_shape) if residual else None
    gy = torch.randn(out_shape, generator=g).to(device=device, dtype=dtype)
    gy = gy.contiguous(memory_format=fmt)
    fused = ops.conv1d if nd == 1 else ops.conv2d

    def run(fn, *args):
        y = fn(*args)
        return [y, *torch.autograd.grad(y, [t for t in args if t is not None], gy.to(y.dtype))]

    ours = run(lambda x, w, b, r: fused(x, w, b, stride, padding, dilation, groups, activation, residual=r,
                                        backend=backend), x, w, b, r)
    if channels_last and nd == 2:  # torch's convolution keeps the layout; so must ours, gradient included
        for name, t in (("y", ours[0]), ("grad_x", ours[1])):
            assert t.is_contiguous(memory_format=fmt) and not t.is_contiguous(), f"{backend} {name}: {t.stride()}"
    elif channels_last:  # conv1d: torch's output is contiguous whatever x's layout, and so is ours
        assert ours[0].is_contiguous(), f"{backend} y: {ours[0].stride()}"
    theirs = run(eager, x, w, b, r)
    ref = run(eager, *[t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, r)])
    names = ["y", "grad_x", "grad_w"] + (["grad_b"] if bias else []) + (["grad_r"] if residual else [])
    for name, a, c, e in zip(names, ours, theirs, ref):
        assert_within_torch_error(f"{backend} {dtype} {xs} {activation} {name}", a, c, e, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CONV1D + CONV2D, ids=lambda c: f"x{c[0]}-w{c[1]}")
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_float64(backend, device, case, activation):
    for dtype in DTYPES[backend]:
        _check(backend, device, dtype, *case, activation)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_residual_and_no_bias(backend, device):
    for case in (CONV1D[0], CONV2D[1]):
        _check(backend, device, torch.float32, *case, "gelu", bias=True, residual=True)
        _check(backend, device, torch.float32, *case, None, bias=False, residual=True)
        _check(backend, device, torch.float32, *case, "relu", bias=False, residual=False)
        _check(backend, device, torch.float32, *case, None, bias=False, residual=False)  # nothing after the conv


# channels_last conv2d: the kernels keep the layout (the CPU's oneDNN convolution writes it, the epilogue
# reads [positions, C_out]): channels past one step of the CPU's vectors and a tail (40 in, 36 out), a
# depthwise stride-2 case, a 1x1 convolution; the layout check in _check runs on each.
CHANNELS_LAST = [((2, 40, 5, 7), (36, 40, 3, 3), 1, 1, 1, 1), ((2, 8, 9, 6), (8, 1, 3, 3), 2, 1, 1, 8),
                 ((1, 24, 4, 5), (19, 24, 1, 1), 1, 0, 1, 1)]


# conv1d with x laid out [B, L, C] (a transposed sequence-model activation): the CPU's depthwise kernels
# read it as it is, kDwGroup = 16 channels at a time (groups split by the threads' ranges and by a C
# that is no multiple of 16: 37), every other path takes it contiguous (a dense, a grouped, a strided
# depthwise convolution); the other backends copy it.
SEQ_CHANNELS_LAST = [((2, 37, 50), (37, 1, 7), 1, 3, 1, 37), ((3, 7, 70), (7, 1, 4), 1, 0, 2, 7),
                     ((1, 20, 130), (20, 1, 3), 1, 4, 3, 20), ((2, 8, 20), (6, 8, 3), 1, 1, 1, 1),
                     ((2, 8, 20), (8, 2, 3), 1, 1, 1, 4), ((2, 8, 21), (8, 1, 3), 2, 1, 1, 8)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CHANNELS_LAST + SEQ_CHANNELS_LAST, ids=lambda c: f"x{c[0]}-w{c[1]}")
@pytest.mark.parametrize("activation", [None, "gelu", "silu"])
def test_channels_last_matches_float64(backend, device, case, activation):
    for dtype in DTYPES[backend]:
        _check(backend, device, dtype, *case, activation, residual=activation == "gelu", channels_last=True)
    _check(backend, device, torch.float32, *case, activation, bias=False, channels_last=True)


def test_cpu_channels_last_bias_gradient_is_deterministic():
    """The channels-last epilogue cuts positions into chunks by shape alone and adds the chunks' column
    sums in order: grad_bias is the same bits with one thread as with two."""
    x = torch.randn(4, 48, 21, 23).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(40, 48, 3, 3), torch.randn(40, requires_grad=True)
    gy = torch.randn(4, 40, 21, 23).contiguous(memory_format=torch.channels_last)
    before, grads = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = ops.conv2d(x, w, b, padding=1, activation="silu", backend="cpu")
            grads.append(torch.autograd.grad(y, b, gy)[0])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0], grads[1])
    assert _C.conv_cpu_path(x, w, [1, 1], [1, 1], [1, 1], 1) == "aten"


# conv1d in float32 with stride 1 and groups 1 runs on the CPU backend's implicit GEMM (csrc/cpu/conv.cpp)
# over at least 128 output positions: shapes that cross its blocking (channel slices of 32, row blocks
# of 8 / 6, tasks of 128 positions, channel groups when tasks are few), with padding and dilation; the
# backward's grad_x takes the same GEMM where d (k - 1) >= p (all but the last case).
IMPLICIT = [((2, 40, 300), (13, 40, 3), 1, 2, 2, 1), ((3, 3, 140), (9, 3, 1), 1, 0, 1, 1),
            ((2, 70, 131), (17, 70, 4), 1, 0, 1, 1), ((1, 8, 129), (8, 8, 5), 1, 4, 1, 1),
            ((1, 33, 200), (24, 33, 5), 1, 2, 3, 1), ((2, 6, 127), (5, 6, 2), 1, 2, 1, 1)]
# Three taps with dilation 1 take Winograd's F(2, 3) on the same tasks (csrc/cpu/conv.cpp): shapes that
# cross its blocking (tiles of two outputs, 16 tiles per vector, slices of 64 input channels, row blocks,
# channel groups): 300 outputs in runs of 128, 128 and 44 (22 tiles: a vector and a scalar tail); an odd
# count (129: the last tile's second output unused) with 70 channels (slices of 64 and 6); one sequence
# (channel groups) padded by 2; padding 3, past the taps (whole tiles of zeros); 256 channels (four
# slices summed). grad_x takes it too where p <= 2.
WINOGRAD = [((2, 40, 300), (13, 40, 3), 1, 1, 1, 1), ((2, 70, 131), (17, 70, 3), 1, 0, 1, 1),
            ((1, 33, 200), (24, 33, 3), 1, 2, 1, 1), ((2, 6, 126), (5, 6, 3), 1, 3, 1, 1),
            ((1, 256, 150), (20, 256, 3), 1, 1, 1, 1)]


def _path(xs, ws, stride, padding, dilation, groups):
    nd = len(xs) - 2
    as_list = lambda v: list(v) if isinstance(v, tuple) else [v] * nd  # noqa: E731
    return _C.conv_cpu_path(torch.empty(xs), torch.empty(ws), as_list(stride), as_list(padding), as_list(dilation),
                            groups)


@pytest.fixture
def own_loops():
    """The project's own CPU main loops wherever their shapes allow: the default with AVX-512; an AVX2
    build takes oneDNN's instead (faster there), so these tests switch them on to reach them."""
    with _backend.use_own_conv_loops(True):
        yield


def test_conv2d_winograd_by_default_from_128_channels_on_avx2():
    """AVX2 builds keep oneDNN by default but take F(2x2, 3x3) from 128 input channels (measured faster
    there, session 35); AVX-512 builds take it from 48."""
    wide = _C.build_info()["cpu_capability"].startswith("AVX512")
    assert _path((2, 128, 32, 32), (64, 128, 3, 3), 1, 1, 1, 1) == "winograd"
    assert _path((2, 127, 32, 32), (64, 127, 3, 3), 1, 1, 1, 1) == ("winograd" if wide else "aten")
    with _backend.use_own_conv_loops(False):
        assert _path((2, 128, 32, 32), (64, 128, 3, 3), 1, 1, 1, 1) == "aten"


def test_own_conv_loops_switch():
    """By default on AVX-512 builds only; the switch turns them on or off whatever the build. Winograd's
    F(2, 3) for conv1d is taken either way."""
    assert _backend.conv_own_loops() == _C.build_info()["cpu_capability"].startswith("AVX512")
    for on in (False, True):
        with _backend.use_own_conv_loops(on):
            assert _backend.conv_own_loops() is on
            assert _path(*IMPLICIT[0]) == ("implicit_gemm" if on else "aten")
            assert _path(*WINOGRAD2[0]) == ("winograd" if on else "aten")
            assert _path(*WINOGRAD[0]) == "winograd"
    assert _backend.conv_own_loops() == _C.build_info()["cpu_capability"].startswith("AVX512")


@pytest.mark.parametrize("case", IMPLICIT, ids=lambda c: f"x{c[0]}-w{c[1]}")
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_cpu_implicit_gemm_matches_float64(case, activation, own_loops):
    assert _path(*case) == "implicit_gemm"
    _check("cpu", torch.device("cpu"), torch.float32, *case, activation, residual=activation is not None)


@pytest.mark.parametrize("case", WINOGRAD, ids=lambda c: f"x{c[0]}-w{c[1]}-p{c[3]}")
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_cpu_winograd_matches_float64(case, activation):
    """Within twice PyTorch's own error of float64 (the output, and grad_x where it takes the same path)."""
    assert _path(*case) == "winograd"
    _check("cpu", torch.device("cpu"), torch.float32, *case, activation, residual=activation is not None)


# conv2d 3x3 (stride 1, dilation 1, groups 1, 48-256 channels, rows of tiles that fill the vectors) runs
# Winograd's F(2x2, 3x3) (csrc/cpu/conv.cpp): an odd output height (the last tile row half used); rows
# of 128 tiles (segments of 64) and 70 channels (slices of 64 and 6); padding 2 with an odd width;
# 31 tiles a row (a vector and a tail); 56 output channels, so that grad_x (48 channels out) takes it too.
# grad_w takes it with every forward that does.
WINOGRAD2 = [((1, 48, 9, 32), (13, 48, 3, 3), 1, 1, 1, 1), ((1, 70, 6, 258), (9, 70, 3, 3), 1, 0, 1, 1),
             ((2, 48, 8, 29), (16, 48, 3, 3), 1, 2, 1, 1), ((1, 64, 16, 62), (8, 64, 3, 3), 1, 1, 1, 1),
             ((1, 48, 12, 32), (56, 48, 3, 3), 1, 1, 1, 1)]


@pytest.mark.parametrize("case", WINOGRAD2, ids=lambda c: f"x{c[0]}-w{c[1]}-p{c[3]}")
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_cpu_winograd_conv2d_matches_float64(case, activation, own_loops):
    """The output, grad_x (where its convolution takes the same path) and grad_w (always, with the
    forward) within twice PyTorch's own error of float64."""
    assert _path(*case) == "winograd"
    assert _C.conv_cpu_grad_weight_path(torch.empty(case[0]), torch.empty(case[1]), [1, 1], [case[3]] * 2, [1, 1],
                                        1) == "winograd"
    _check("cpu", torch.device("cpu"), torch.float32, *case, activation, residual=activation is not None)


def test_cpu_winograd_conv2d_grad_weight_is_deterministic(own_loops):
    """The chunks of tiles are summed in a fixed order, whatever the number of threads."""
    xs, ws = (2, 48, 12, 32), (16, 48, 3, 3)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(xs, generator=g), torch.randn(ws, generator=g, requires_grad=True)
    before, grads = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            y = ops.conv2d(x, w, None, 1, 1, backend="cpu")
            grads.append(torch.autograd.grad(y, w, torch.ones_like(y))[0])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("xs,ws", [((0, 64, 32, 32), (64, 64, 3, 3)), ((0, 256, 300), (256, 256, 3)),
                                   ((0, 64, 300), (64, 64, 5))])
def test_cpu_empty_inputs(xs, ws):
    """An empty batch gives torch's result and gradients, not a crash: the project's engines plan no
    tasks for it, so ATen's convolution takes it."""
    assert _C.conv_cpu_path(torch.empty(xs), torch.empty(ws), [1] * (len(xs) - 2), [1] * (len(xs) - 2),
                            [1] * (len(xs) - 2), 1) == "aten"
    x, w, b = torch.randn(xs, requires_grad=True), torch.randn(ws, requires_grad=True), torch.randn(ws[0])
    conv, fused = (F.conv1d, ops.conv1d) if len(xs) == 3 else (F.conv2d, ops.conv2d)
    y = fused(x, w, b, 1, 1, activation="gelu", backend="cpu")
    ref = F.gelu(conv(x, w, b, padding=1))
    torch.testing.assert_close(y, ref)
    (y.sum() + 0 * y.numel()).backward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w)) and x.grad.shape == x.shape


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("xs,ws", [((2, 0, 30), (8, 0, 3)), ((2, 0, 6, 6), (8, 0, 3, 3))])
def test_no_input_channels_is_a_clear_error(backend, xs, ws):
    """C_in = 0 is an empty sum, whose answer would be the bias; torch's convolutions answer [B, 0, ...]
    (no output channels) instead, and the backends disagreed (a broadcast error, an invalid gradient)."""
    conv = ops.conv1d if len(xs) == 3 else ops.conv2d
    with pytest.raises(ValueError, match="no input channels"):
        conv(torch.randn(xs), torch.randn(ws), torch.randn(ws[0]), padding=1, backend=backend)


def test_cpu_winograd_conv2d_rule(own_loops):
    """Where the 2-D Winograd measured slower than oneDNN it is not taken (see winograd2_applies)."""
    assert _path((1, 56, 12, 32), (48, 56, 3, 3), 1, 1, 1, 1) == "winograd"  # grad_x of WINOGRAD2[-1]
    assert _path((2, 32, 32, 32), (64, 32, 3, 3), 1, 1, 1, 1) == "aten"  # under 48 input channels
    assert _path((1, 512, 32, 32), (64, 512, 3, 3), 1, 1, 1, 1) == "aten"  # past 256 channels
    assert _path((2, 64, 20, 20), (64, 64, 3, 3), 1, 1, 1, 1) == "aten"  # 10 tiles a row: vectors part empty
    assert _path((2, 64, 32, 32), (64, 64, 3, 3), 2, 1, 1, 1) == "aten"  # strided
    assert _path((2, 64, 32, 32), (64, 64, 5, 5), 1, 2, 1, 1) == "aten"  # 5 x 5


# The backward's grad_w on the CPU backend's own GEMM (implicit_grad_weight in csrc/cpu/conv.cpp) where
# the reduction over B * L_out positions makes at least two chunks of four slices (of >= 256 positions,
# one sequence each) per thread: with one thread, eight slices. The shapes cross its blocking: input
# channels past a block of 64, output channels past a panel of 32, sequences cut into several slices,
# zero padding on both sides, dilation.
IMPLICIT_GRAD_W = [((8, 40, 300), (13, 40, 3), 1, 2, 2, 1), ((4, 70, 1100), (33, 70, 4), 1, 0, 1, 1),
                   ((8, 8, 260), (8, 8, 5), 1, 4, 1, 1), ((9, 33, 270), (70, 33, 5), 1, 2, 3, 1)]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grad_w_path(xs, ws, stride, padding, dilation, groups):
    return _C.conv_cpu_grad_weight_path(torch.empty(xs), torch.empty(ws), [stride], [padding], [dilation], groups)


@pytest.mark.parametrize("case", IMPLICIT_GRAD_W, ids=lambda c: f"x{c[0]}-w{c[1]}")
def test_cpu_implicit_grad_weight_matches_float64(case, one_thread):
    assert _grad_w_path(*case) == "implicit_gemm"
    _check("cpu", torch.device("cpu"), torch.float32, *case, "gelu", residual=True)


def test_cpu_implicit_grad_weight_is_deterministic_and_chosen_by_size(one_thread):
    xs, ws, stride, padding, dilation, groups = IMPLICIT_GRAD_W[1]
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(xs, generator=g, requires_grad=True), torch.randn(ws, generator=g, requires_grad=True)
    grads = []
    for _ in range(2):
        y = ops.conv1d(x, w, None, stride, padding, dilation, groups, backend="cpu")
        grads.append(torch.autograd.grad(y, w, torch.ones_like(y))[0])
    assert torch.equal(grads[0], grads[1])  # the chunks' sums are added in a fixed order
    # too few slices (one thread: fewer than eight), slices under 256 positions, or not the implicit
    # forward: oneDNN's backward-weights
    assert _grad_w_path((7, 40, 300), (13, 40, 3), 1, 2, 2, 1) == "aten"
    assert _grad_w_path((16, 40, 200), (13, 40, 3), 1, 1, 1, 1) == "aten"
    assert _grad_w_path((16, 40, 300), (13, 40, 3), 2, 1, 1, 1) == "aten"


def _avx512_core() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = next((line.split() for line in f if line.startswith("flags")), [])
    return "avx512f" in flags and "avx512bw" in flags


def test_cpu_conv_path_choice(own_loops):
    """Short outputs, strides, groups and bfloat16 keep oneDNN's convolution (and the fused epilogue)."""
    assert _path((2, 16, 63), (16, 16, 1), 1, 0, 1, 1) == "aten"  # less than one task (128 / 64 with AVX-512 / AVX2)
    assert _path((2, 16, 300), (16, 16, 3), 2, 1, 1, 1) == "aten"
    assert _path((2, 16, 300), (16, 8, 3), 1, 1, 1, 2) == "aten"
    # bfloat16: oneDNN's convolution where it has bf16 kernels (AVX-512); below that, the fp32 paths on
    # converted tensors (oneDNN's bf16 reference loops took 2.2 s where fp32 took 38 ms)
    bf16 = _C.conv_cpu_path(torch.empty(2, 16, 300, dtype=torch.bfloat16), torch.empty(16, 16, 3, dtype=torch.bfloat16),
                            [1], [1], [1], 1)
    assert bf16 == ("aten" if _avx512_core() else _path((2, 16, 300), (16, 16, 3), 1, 1, 1, 1))
    assert _path((2, 16, 40, 40), (16, 16, 3, 3), 1, 1, 1, 1) == "aten"  # conv2d, 16 channels: oneDNN (conv.cpp)
    # the backward's grad_x of IMPLICIT[0]: gp [2, 13, 300] with the weight transposed, padded d (k - 1) - p
    assert _path((2, 13, 300), (40, 13, 3), 1, 2, 2, 1) == "implicit_gemm"
    # and of WINOGRAD[0], padded 2 - 1
    assert _path((2, 13, 300), (40, 13, 3), 1, 1, 1, 1) == "winograd"
    for case in CONV1D + CONV2D:  # the small shapes above run the ATen path on the CPU, but depthwise ones
        depthwise = case[5] == case[0][1] == case[1][0] and case[1][1] == 1 and case[2] == 1
        assert _path(*case) == ("depthwise" if depthwise else "aten")


# Depthwise convolutions (groups = C_in = C_out, stride 1) run on the CPU backend's own per-plane
# kernels (csrc/cpu/conv.cpp), float32 and bfloat16, every activation the cases below name: the
# fixed-tap kernels (3 x 3, and conv1d's 3) and the general one (other sizes, dilation, asymmetric
# kernels); padding past the taps (grad_x then reads a gradient wider than x), an odd number of output
# rows (the kernels take rows two at a time), a single output row, planes narrower than a vector and
# wider than two, one channel (groups 1 is depthwise too).
DEPTHWISE = [((2, 8, 13, 17), (8, 1, 3, 3), 1, 1, 1, 8), ((2, 5, 7, 40), (5, 1, 3, 3), 1, (0, 2), 1, 5),
             ((1, 3, 9, 9), (3, 1, 5, 5), 1, 2, 1, 3), ((2, 4, 10, 11), (4, 1, 3, 2), 1, (0, 1), (2, 1), 4),
             ((1, 6, 5, 6), (6, 1, 3, 3), 1, (3, 2), 1, 6), ((2, 3, 3, 70), (3, 1, 3, 3), 1, 0, 1, 3),
             ((2, 16, 15, 37), (16, 1, 7, 7), 1, 3, 1, 16), ((2, 4, 33), (4, 1, 3), 1, 1, 1, 4),
             ((3, 7, 70), (7, 1, 4), 1, 0, 2, 7), ((1, 5, 100), (5, 1, 3), 1, 4, 3, 5),
             ((1, 1, 8, 8), (1, 1, 3, 3), 1, 1, 1, 1)]


@pytest.mark.parametrize("case", DEPTHWISE, ids=lambda c: f"x{c[0]}-w{c[1]}")
@pytest.mark.parametrize("activation", [None, "silu", "relu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_depthwise_matches_float64(case, activation, dtype):
    """Output, grad_x, grad_w, grad_b (with a bias) and grad_residual (relu: a residual, no bias)."""
    assert _path(*case) == "depthwise"
    nd = len(case[0]) - 2
    as_list = lambda v: list(v) if isinstance(v, tuple) else [v] * nd  # noqa: E731
    assert _C.conv_cpu_grad_weight_path(torch.empty(case[0]), torch.empty(case[1]), *map(as_list, case[2:5]),
                                        case[5]) == "depthwise"
    _check("cpu", torch.device("cpu"), dtype, *case, activation, bias=activation != "relu",
           residual=activation == "relu")


def test_cpu_depthwise_rule_and_determinism():
    """Strides, channel multipliers, groups of several channels and channels_last keep oneDNN's
    convolution; the weight and bias gradients are per-plane sums added over the batch in a fixed
    order, whatever the number of threads; an empty batch gives zeros."""
    assert _path((2, 8, 9, 9), (8, 1, 3, 3), 2, 1, 1, 8) == "aten"
    assert _path((2, 8, 9, 9), (16, 1, 3, 3), 1, 1, 1, 8) == "aten"
    assert _path((2, 8, 9, 9), (4, 2, 3, 3), 1, 1, 1, 4) == "aten"
    cl = torch.empty(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    assert _C.conv_cpu_path(cl, torch.empty(8, 1, 3, 3), [1, 1], [1, 1], [1, 1], 8) == "aten"
    assert _C.conv_cpu_path(torch.empty(2, 8, 9, 9, dtype=torch.bfloat16), torch.empty(8, 1, 3, 3, dtype=torch.bfloat16),
                            [1, 1], [1, 1], [1, 1], 8) == "depthwise"
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(6, 12, 20, 21, generator=g), torch.randn(12, 1, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(12, generator=g, requires_grad=True)
    before, grads = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            y = ops.conv2d(x, w, b, 1, 1, 1, 12, "gelu", backend="cpu")
            grads.append(torch.autograd.grad(y, (w, b), torch.ones_like(y)))
    finally:
        torch.set_num_threads(before)
    for gw, gb in grads[1:]:
        assert torch.equal(gw, grads[0][0]) and torch.equal(gb, grads[0][1])
    # a conv1d's x laid out [B, L, C] is read as it is, the same sums in the same order: the same bits
    xs = torch.randn(3, 300, 40, generator=g)
    w1, b1 = torch.randn(40, 1, 5, generator=g, requires_grad=True), torch.randn(40, generator=g, requires_grad=True)
    assert _C.conv_cpu_path(xs.transpose(1, 2), w1, [1], [2], [1], 40) == "depthwise"
    runs = []
    for x1 in (xs.transpose(1, 2).contiguous(), xs.transpose(1, 2)):
        x1 = x1.requires_grad_()
        y = ops.conv1d(x1, w1, b1, 1, 2, 1, 40, "silu", backend="cpu")
        runs.append([y, *torch.autograd.grad(y, (x1, w1, b1), torch.ones_like(y))])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    x0 = torch.randn(0, 12, 20, 21, requires_grad=True)
    y0 = ops.conv2d(x0, w, b, 1, 1, 1, 12, "gelu", backend="cpu")
    gw0, gb0 = torch.autograd.grad(y0.sum(), (w, b))
    assert y0.shape == (0, 12, 20, 21) and not gw0.any() and not gb0.any()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("nd", [1, 2])
def test_bf16_relu_derivative_is_taken_where_the_forward_took_relu(backend, device, nd):
    # conv(x, w) = 1 + 2^-9, which bf16 rounds to 1, and a bias of -1: relu of the fp32 sum is > 0, relu
    # of bf16(conv) + bias is 0. Forward and backward must take the same side: CPUs without AVX-512
    # convolve bf16 in fp32, and there y came out > 0 with zero gradients
    if torch.bfloat16 not in DTYPES[backend]:
        pytest.skip(f"{backend} has no bf16 convolution")
    shape = (1, 1, 2) if nd == 1 else (1, 1, 1, 2)
    x = torch.ones(shape, dtype=torch.bfloat16, device=device, requires_grad=True)
    w = torch.tensor([1.0, 2.0 ** -9], dtype=torch.bfloat16, device=device).view(1, *shape[1:]).requires_grad_()
    b = torch.tensor([-1.0], dtype=torch.bfloat16, device=device, requires_grad=True)
    y = (ops.conv1d if nd == 1 else ops.conv2d)(x, w, b, activation="relu", backend=backend)
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    slope = 1.0 if y.item() > 0 else 0.0
    assert gb.item() == slope, f"{backend}: y = {y.item()} but d y / d bias = {gb.item()}"
    assert gw.flatten().tolist() == [slope, slope] and gx.flatten().tolist() == [slope * v for v in (1.0, 2.0 ** -9)]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bf16_gradients_with_a_bias_within_torch_error(backend):
    # pre holds the bias (ops/conv.py): a bf16 pre without it, rounded about the convolution's size, put
    # bf16(conv) + bias on the other side of ReLU's kink wherever the bias nearly cancelled the
    # convolution, and the gradients came out 100x torch's own error (grad_b 2.72 for 3.93). The GPU
    # backends add the bias to cuDNN's rounded output, as torch's cudnn path does: their reference is
    # torch on a GPU, not this CPU's fused-bias convolution
    g = torch.Generator().manual_seed(10)
    x, w = torch.randn(1, 16, 8, 9, generator=g), torch.randn(4, 8, 5, 5, generator=g) / (8 * 25) ** 0.5
    b, gy = torch.randn(4, generator=g), torch.randn(1, 4, 6, 7, generator=g)

    def run(dtype, f):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        y = f(*leaves)
        return [y, *torch.autograd.grad(y, leaves, gy.to(dtype))]

    ours = run(torch.bfloat16, lambda x, w, b: ops.conv2d(x, w, b, 1, 1, 1, 2, "relu", backend=backend))
    theirs = run(torch.bfloat16, lambda x, w, b: F.relu(F.conv2d(x, w, b, 1, 1, 1, 2)))
    ref = run(torch.float64, lambda x, w, b: F.relu(F.conv2d(x, w, b, 1, 1, 1, 2)))
    for name, a, c, r in zip(["y", "grad_x", "grad_w", "grad_b"], ours, theirs, ref):
        assert_within_torch_error(f"{backend} {name}", a, c, r, torch.bfloat16)


def test_cpu_larger_bf16():
    _check("cpu", torch.device("cpu"), torch.bfloat16, (4, 32, 200), (48, 32, 3), 1, 1, 1, 1, "gelu", residual=True)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("k,dilation", [(3, 1), (4, 1), (2, 3), (4, 2)])
def test_string_padding_matches_torch(padding, k, dilation):
    x, w, b = torch.randn(2, 3, 11), torch.randn(4, 3, k), torch.randn(4)
    torch.testing.assert_close(ops.conv1d(x, w, b, padding=padding, dilation=dilation),
                               F.conv1d(x, w, b, padding=padding, dilation=dilation), rtol=1e-5, atol=1e-5)
    x2, w2 = torch.randn(1, 3, 7, 8), torch.randn(2, 3, k, 3)
    torch.testing.assert_close(ops.conv2d(x2, w2, None, padding=padding, dilation=dilation),
                               F.conv2d(x2, w2, None, padding=padding, dilation=dilation), rtol=1e-5, atol=1e-5)


def test_unbatched_and_inference_in_place():
    x, w, b = torch.randn(3, 10), torch.randn(5, 3, 3), torch.randn(5)
    torch.testing.assert_close(ops.conv1d(x, w, b, padding=1, activation="silu"),
                               F.silu(F.conv1d(x, w, b, padding=1)))
    with torch.no_grad():  # no pre-activation saved: the epilogue runs in place
        torch.testing.assert_close(ops.conv1d(x[None], w, b, activation="tanh"), torch.tanh(F.conv1d(x[None], w, b)))


def test_gradcheck_float64():
    x, w, b = (torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True),
               torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True),
               torch.randn(6, dtype=torch.float64, requires_grad=True))
    r = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, r: ops.conv1d(x, w, b, 2, 1, 1, 2, "gelu", residual=r, backend="torch"), (x, w, b, r))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    x, w, b = (torch.randn(2, 4, 7, device=device), torch.randn(6, 4, 3, device=device).requires_grad_(),
               torch.randn(6, device=device))
    r = torch.randn(2, 6, 7, device=device)
    args = ([1], [1], [1], 1)
    torch.library.opcheck(torch.ops.bignlp_fast.conv_fwd, (x, w, b, r, *args, 2, True, backend))
    torch.library.opcheck(torch.ops.bignlp_fast.conv_fwd, (x, w.detach(), None, None, *args, 0, False, backend))
    pre = torch.randn(2, 6, 7, device=device)
    torch.library.opcheck(torch.ops.bignlp_fast.conv_bwd, (torch.randn_like(pre), x, w.detach(), pre, b, *args, 3,
                                                          backend))


def test_compiles_fullgraph():
    w, b = torch.randn(8, 4, 3), torch.randn(8)

    def block(x):
        return ops.conv1d(x, w, b, padding="same", activation="gelu", residual=x.repeat(1, 2, 1)).mean(-1)

    x = torch.randn(2, 4, 10, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x))


def test_bad_input():
    x, w = torch.randn(2, 4, 8), torch.randn(6, 4, 3)
    with pytest.raises(ValueError, match="input channels"):
        ops.conv1d(x, torch.randn(6, 3, 3))
    with pytest.raises(ValueError, match="groups"):
        ops.conv1d(x, w, groups=3)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        ops.conv1d(x, w, dilation=4)
    with pytest.raises(ValueError, match="residual"):
        ops.conv1d(x, w, residual=torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="same"):
        ops.conv1d(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match="stride"):
        ops.conv1d(x, w, stride=0)
    with pytest.raises(ValueError, match="activation"):
        ops.conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3), activation="elu")
    with pytest.raises(ValueError, match="4 dims"):
        ops.conv2d(torch.randn(1, 4, 5, 5), w)
