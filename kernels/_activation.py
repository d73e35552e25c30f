"""The fused epilogues' activations in Triton: ``act`` and its derivative ``act_grad`` on fp32 tiles.

The codes and the functions are those of bignlp_fast/ops/_activation.py (the specification):
0 identity, 1 relu, 2 gelu (erf form), 3 silu, 4 tanh. ``ACT`` is a constexpr, so each kernel is
compiled with only its own activation.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(u):
    # tanh(u) = sign(u) * (1 - e) / (1 + e) with e = exp(-2|u|) in (0, 1]: no overflow for any u.
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _sigmoid(v):
    # with e = exp(-|v|) in (0, 1]: 1 / (1 + e) for v >= 0, e / (1 + e) below: no overflow for any v.
    e = tl.exp(-tl.abs(v))
    return tl.where(v < 0, e, 1.0) / (1.0 + e)


@triton.jit
def act(v, ACT: tl.constexpr):
    """act(v) elementwise; v: fp32 tile."""
    if ACT == 1:
        r = tl.where(v < 0.0, 0.0, v)
    elif ACT == 2:
        r = v * 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476))  # 1 / sqrt(2)
    elif ACT == 3:
        r = v * _sigmoid(v)
    elif ACT == 4:
        r = _tanh(v)
    else:
        r = v
    return r


@triton.jit
def act_grad(v, ACT: tl.constexpr):
    """d act(v) / dv elementwise (relu' is 0 at 0, as torch's); v: fp32 tile."""
    if ACT == 1:
        r = tl.where(v > 0.0, 1.0, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476))
        r = cdf + v * 0.3989422804014327 * tl.exp(-0.5 * v * v)  # 1 / sqrt(2 pi)
    elif ACT == 3:
        s = _sigmoid(v)
        r = s * (1.0 + v * (1.0 - s))
    elif ACT == 4:
        # 1 - tanh(v)^2 = 4e / (1 + e)^2 with e = exp(-2|v|): no cancellation where tanh(v) is near +-1
        e = tl.exp(-2.0 * tl.abs(v))
        r = 4.0 * e / ((1.0 + e) * (1.0 + e))
    else:
        r = tl.zeros_like(v) + 1.0
    return r
