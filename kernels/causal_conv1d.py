"""Depthwise causal conv1d (widths 2-4) with bias, activation and an initial state, in Triton;
contract in bignlp_fast/ops/causal_conv1d.py.

Positions are numbered in x's coordinates: xx(s) = x[b, c, s] for 0 <= s < L and
initial_state[b, c, W-1+s] (or 0) for -(W-1) <= s < 0, so that

    pre(t) = bias[c] + sum_j weight[c, j] * xx(t + j - (W-1)),    y(t) = act(pre(t)).

Forward: a program per (row = b * C + c, block of BLOCK_T positions) loads the W shifted windows of
its row (the halo from initial_state at the start) and writes y once.

Backward: with gp(t) = grad_y(t) * act'(pre(t)) (pre recomputed, 0 outside [0, L)), the gradient of
xx(s) is sum_i weight[c, W-1-i] * gp(s + i) for s in [-(W-1), L): a program per (row, block of s)
recomputes the W values of gp it needs and writes grad_x (s >= 0) and grad_initial_state (s < 0).
The same program sums gp(s) * xx(s + j - (W-1)) and gp(s) over its block (each t in [0, L) lies in
exactly one block) into fp32 partials [B, C, blocks, W] and [B, C, blocks] that torch then reduces
over the batch and the blocks: grad_weight and grad_bias are deterministic (no atomics).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from bignlp_fast.kernels._activation import act, act_grad
from bignlp_fast.kernels._common import flat_ids as _flat_ids

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_WIDTHS = (2, 3, 4)


def causal_conv1d_triton_supports(width: int, dtype) -> Optional[str]:
    """None when the triton backend runs this kernel width and dtype, else the reason why not."""
    if dtype not in _DTYPES:
        return f"triton causal_conv1d supports float32, float16 and bfloat16, not {dtype}"
    if width not in _WIDTHS:
        return f"triton causal_conv1d supports kernel widths 2, 3 and 4, not {width}"
    return None


@triton.jit
def _xx(X, INIT, row, s, L, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """xx(s) of one row as fp32 (s: int64 positions, any values; 0 outside [-(W-1), L))."""
    v = tl.load(X + row * L + s, mask=(s >= 0) & (s < L), other=0.0).to(tl.float32)
    if HAS_INIT:
        v += tl.load(INIT + row * (W - 1) + (s + W - 1), mask=(s < 0) & (s >= 1 - W), other=0.0).to(tl.float32)
    return v


@triton.jit
def _pre(X, INIT, WT, BIAS, row, c, t, L, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr):
    """pre(t) of one row as fp32 (t: int64 positions; meaningful for 0 <= t < L)."""
    acc = tl.zeros(t.shape, dtype=tl.float32)
    for j in tl.static_range(W):
        acc += tl.load(WT + c * W + j).to(tl.float32) * _xx(X, INIT, row, t + (j - (W - 1)), L, W, HAS_INIT)
    if HAS_BIAS:
        acc += tl.load(BIAS + c).to(tl.float32)
    return acc


@triton.jit
def _causal_conv1d_fwd_kernel(
    X,  # [B, C, L]
    WT,  # [C, W] weight
    BIAS,  # [C] (read only if HAS_BIAS)
    INIT,  # [B, C, W-1] initial state (read only if HAS_INIT)
    Y,  # [B, C, L] act(pre), x.dtype
    C,  # int: channels
    L,  # int: positions
    W: tl.constexpr,  # kernel width, 2..4
    BLOCK_T: tl.constexpr,  # positions per program
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    ACT: tl.constexpr,  # activation code (ops/_activation.py)
):
    row, blk = _flat_ids(tl.cdiv(L, BLOCK_T))  # row: b * C + c
    row = row.to(tl.int64)
    c = row % C
    t = blk.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    y = act(_pre(X, INIT, WT, BIAS, row, c, t, L, W, HAS_BIAS, HAS_INIT), ACT)
    tl.store(Y + row * L + t, y.to(Y.dtype.element_ty), mask=t < L)


@triton.jit
def _causal_conv1d_bwd_kernel(
    DY,  # [B, C, L] grad_y
    X,  # [B, C, L]
    WT,  # [C, W] weight
    BIAS,  # [C] (read only if HAS_BIAS)
    INIT,  # [B, C, W-1] initial state (read only if HAS_INIT)
    DX,  # [B, C, L] grad_x, x.dtype
    DINIT,  # [B, C, W-1] grad_initial_state, x.dtype (written only if HAS_INIT)
    DW_PART,  # [B, C, NB, W] float32 partial sums of gp(t) * xx(t + j - (W-1)) per block
    DB_PART,  # [B, C, NB] float32 partial sums of gp(t) per block (written only if HAS_BIAS)
    C,  # int: channels
    L,  # int: positions
    NB,  # int: position blocks (programs per row)
    W: tl.constexpr,  # kernel width, 2..4
    BLOCK_T: tl.constexpr,  # positions per program
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    ACT: tl.constexpr,
):
    row, blk = _flat_ids(NB)
    row = row.to(tl.int64)
    c = row % C
    s = blk.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T) - (W - 1)  # positions in [-(W-1), L)
    dxx = tl.zeros([BLOCK_T], dtype=tl.float32)
    for i in tl.static_range(W):
        t = s + i
        valid = (t >= 0) & (t < L)
        dy = tl.load(DY + row * L + t, mask=valid, other=0.0).to(tl.float32)
        gp = dy * act_grad(_pre(X, INIT, WT, BIAS, row, c, t, L, W, HAS_BIAS, HAS_INIT), ACT)  # 0 where invalid
        dxx += tl.load(WT + c * W + (W - 1 - i)).to(tl.float32) * gp
        if i == 0:  # the block's own gp(s): the weight and bias partial sums
            part = row * NB + blk
            for j in tl.static_range(W):
                xs = _xx(X, INIT, row, s + (j - (W - 1)), L, W, HAS_INIT)
                tl.store(DW_PART + part * W + j, tl.sum(gp * xs, axis=0))
            if HAS_BIAS:
                tl.store(DB_PART + part, tl.sum(gp, axis=0))
    tl.store(DX + row * L + s, dxx.to(DX.dtype.element_ty), mask=(s >= 0) & (s < L))
    if HAS_INIT:
        tl.store(DINIT + row * (W - 1) + (s + W - 1), dxx.to(DINIT.dtype.element_ty), mask=s < 0)


def _block_t(n: int, device) -> int:
    if device.type != "cuda":  # TRITON_INTERPRET=1: small blocks, so that the CPU tests cross several
        return 16
    return min(1024, max(16, triton.next_power_of_2(n)))


def _check(width, dtype):
    reason = causal_conv1d_triton_supports(width, dtype)
    if reason is not None:
        raise ValueError(reason)


def causal_conv1d_fwd_triton(x, weight, bias, initial_state, activation):
    """x [B, C, L], weight [C, W], bias [C] or None, initial_state [B, C, W-1] or None -> y [B, C, L]."""
    B, C, L = x.shape
    W = weight.shape[1]
    _check(W, x.dtype)
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    block_t = _block_t(L, x.device)
    _causal_conv1d_fwd_kernel[(B * C * triton.cdiv(L, block_t),)](  # flat: _common.flat_ids
        x, weight, bias if bias is not None else weight, initial_state if initial_state is not None else x, y, C, L,
        W=W, BLOCK_T=block_t, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, ACT=int(activation),
        num_warps=max(1, min(8, block_t // 128)),
    )
    return y


def causal_conv1d_bwd_triton(grad_y, x, weight, bias, initial_state, activation):
    """-> (grad_x [B, C, L], grad_weight [C, W], grad_bias [C] or [0], grad_initial_state [B, C, W-1] or [0])."""
    B, C, L = x.shape
    W = weight.shape[1]
    _check(W, x.dtype)
    has_bias, has_init = bias is not None, initial_state is not None
    grad_x = torch.empty_like(x)
    grad_init = torch.empty_like(initial_state) if has_init else x.new_empty(0)
    block_t = _block_t(L + W - 1, x.device)
    nb = triton.cdiv(L + W - 1, block_t)
    dw_part = torch.zeros(B, C, nb, W, device=x.device, dtype=torch.float32)
    db_part = torch.zeros(B, C, nb, device=x.device, dtype=torch.float32) if has_bias else None
    if B * C > 0:
        _causal_conv1d_bwd_kernel[(B * C * nb,)](
            grad_y, x, weight, bias if has_bias else weight, initial_state if has_init else x,
            grad_x, grad_init if has_init else grad_x, dw_part, db_part if has_bias else dw_part, C, L, nb,
            W=W, BLOCK_T=block_t, HAS_BIAS=has_bias, HAS_INIT=has_init, ACT=int(activation),
            num_warps=max(1, min(8, block_t // 128)),
        )
    # fixed order: over the blocks, then the batch
    grad_w = dw_part.sum(2).sum(0).to(weight.dtype)
    grad_b = db_part.sum(2).sum(0).to(bias.dtype) if has_bias else x.new_empty(0)
    return grad_x, grad_w, grad_b, grad_init
