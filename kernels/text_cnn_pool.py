"""TextCNN block (multi-width conv1d + bias + activation + max over valid positions) in Triton;
contract in bignlp_fast/ops/text_cnn_pool.py.

Forward, one launch per width k (weights [C, E, k]), writing columns [off, off + C) of the
[B, sum C] outputs: a program per (sequence b, block of BLOCK_C channels) walks the sequence's
valid positions p in [0, len_b - k] in tiles of BLOCK_P. A tile is a GEMM

    acc[p, c] = sum_j sum_e x[b, p + j, e] * W[c, e, j]       (tl.dot per j and block of E)

with x's window rows read in place (no unfolding) and W[:, :, j] read as a [BLOCK_E, BLOCK_C] tile.
The bias and activation follow, positions past the end are -inf, and a running max keeps, per
channel, the first position of the maximum (a later tile wins only when strictly greater) and the
pre-activation there. Sequences without a window (len_b < k) give out 0, argmax -1, pre 0.

Backward, gp[b, c] = grad_out * act'(pre) (0 where argmax < 0), recomputed where needed:
- grad_w[c, e, j] = sum_b gp[b, c] x[b, argmax + j, e] and grad_b[c] = sum_b gp[b, c]: a program
  per (channel block, E block) loops over b in order;
- grad_x[b, p, e] += gp[b, c] W[c, e, p - argmax[b, c]] for the k rows of each channel's window: a
  program per (sequence b, E block) loops over the channels in order, adding each window's
  [k, BLOCK_E] tile into an fp32 buffer (load, add, store; a barrier after each store, because the
  next channel's window may put the same row in another thread). Only that program touches those
  elements, and the widths run in order, so grad_x is deterministic (no atomics).

Products are accumulated in fp32. Under TRITON_INTERPRET=1 (CPU tensors) the tiles are 16 wide and
bf16 tiles are multiplied in fp32 (the interpreter's tl.dot mishandles bf16; see _common.mma).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from bignlp_fast.kernels._activation import act, act_grad
from bignlp_fast.kernels._common import dot_precision as _dot_precision
from bignlp_fast.kernels._common import mma as _mma

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def text_cnn_pool_triton_supports(dtype) -> Optional[str]:
    """None when the triton backend handles x of this dtype, else the reason why not."""
    if dtype not in _DTYPES:
        return f"triton text_cnn_pool supports float32, float16 and bfloat16, not {dtype}"
    return None


@triton.jit
def _text_cnn_pool_fwd_kernel(
    X,  # [B, L, E]
    WT,  # [C, E, K] this width's weight
    BIAS,  # [C] (read only if HAS_BIAS)
    LENS,  # [B] int64 valid lengths (read only if HAS_LENS)
    OUT,  # [B, CT] max of act(pre), x.dtype; this width's columns [OFF, OFF + C)
    ARGMAX,  # [B, CT] int32 first position of the max, -1 without a window
    PRE,  # [B, CT] float32 pre-activation at the max
    L,  # int: positions per sequence
    E,  # int: embedding size
    C,  # int: this width's channels
    K,  # int: this width
    CT,  # int: all widths' channels (row stride of the outputs)
    OFF,  # int: this width's first output column
    BLOCK_P: tl.constexpr,  # positions per tile
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_E: tl.constexpr,  # embedding columns per dot
    HAS_BIAS: tl.constexpr,
    HAS_LENS: tl.constexpr,
    ACT: tl.constexpr,  # activation code (ops/_activation.py)
    DOT_PRECISION: tl.constexpr,  # see _mma
):
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    offs_p = tl.arange(0, BLOCK_P)
    offs_e = tl.arange(0, BLOCK_E)
    if HAS_LENS:
        # valid positions: p + K <= len_b; len_b > L is refused by the op (not under torch.compile, nor
        # when the custom op is called directly): clamped, so that no program reads or writes another's rows
        n_pos = tl.minimum(tl.load(LENS + b).to(tl.int32), L) - K + 1
    else:
        n_pos = L - K + 1
    if HAS_BIAS:
        bias = tl.load(BIAS + cs, mask=c_mask, other=0.0).to(tl.float32)
    x_seq = X + b * L * E
    best = tl.full([BLOCK_C], float("-inf"), tl.float32)
    arg = tl.full([BLOCK_C], -1, tl.int32)
    pre_at = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, n_pos, BLOCK_P):
        ps = p0 + offs_p
        p_mask = ps < n_pos
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for j in range(K):
            for e0 in range(0, E, BLOCK_E):
                es = e0 + offs_e
                e_mask = es < E
                xa = tl.load(x_seq + (ps + j).to(tl.int64)[:, None] * E + es[None, :],
                             mask=p_mask[:, None] & e_mask[None, :], other=0.0)  # [BLOCK_P, BLOCK_E]
                wt = tl.load(WT + cs.to(tl.int64)[None, :] * (E * K) + es[:, None] * K + j,
                             mask=e_mask[:, None] & c_mask[None, :], other=0.0)  # [BLOCK_E, BLOCK_C]
                acc += _mma(xa, wt, DOT_PRECISION)
        if HAS_BIAS:
            acc += bias[None, :]
        y = tl.where(p_mask[:, None], act(acc, ACT), float("-inf"))
        # a NaN window is the maximum, as in torch's amax (tl.max's NaN handling differs by target)
        nan = y != y
        tile_nan = tl.max(nan.to(tl.int32), axis=0) > 0  # [BLOCK_C]
        tile_max = tl.where(tile_nan, float("nan"), tl.max(tl.where(nan, float("-inf"), y), axis=0))
        at_max = tl.where(tile_nan[None, :], nan, y == tile_max[None, :])
        tile_arg = tl.min(tl.where(at_max, ps[:, None], 2147483647), axis=0)
        tile_pre = tl.sum(tl.where(ps[:, None] == tile_arg[None, :], acc, 0.0), axis=0)
        # ties keep the earlier tile's (lower) position; a NaN, once there, stays
        better = (tile_max > best) | (tile_nan & (best == best))
        best = tl.where(better, tile_max, best)
        arg = tl.where(better, tile_arg, arg)
        pre_at = tl.where(better, tile_pre, pre_at)
    out = tl.where(arg >= 0, best, 0.0)
    o = b * CT + OFF + cs
    tl.store(OUT + o, out.to(OUT.dtype.element_ty), mask=c_mask)
    tl.store(ARGMAX + o, arg, mask=c_mask)
    tl.store(PRE + o, pre_at, mask=c_mask)


@triton.jit
def _gp(GO, PRE, ARGMAX, o, mask, ACT: tl.constexpr):
    """gp = grad_out * act'(pre) as fp32, 0 where there is no window (argmax < 0); and argmax."""
    a = tl.load(ARGMAX + o, mask=mask, other=-1)
    go = tl.load(GO + o, mask=mask, other=0.0).to(tl.float32)
    pre = tl.load(PRE + o, mask=mask, other=0.0)
    return tl.where(a >= 0, go * act_grad(pre, ACT), 0.0), a


@triton.jit
def _text_cnn_pool_bwd_w_kernel(
    GO,  # [B, CT] grad_out
    X,  # [B, L, E]
    ARGMAX,  # [B, CT] int32
    PRE,  # [B, CT] float32
    DW,  # [C, E, K] grad of this width's weight
    DB,  # [C] grad of its bias (written only if HAS_BIAS, by the programs of E block 0)
    B,  # int: sequences
    L,  # int: positions per sequence
    E,  # int: embedding size
    C,  # int: this width's channels
    K,  # int: this width
    CT,  # int: all widths' channels
    OFF,  # int: this width's first column
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_E: tl.constexpr,  # embedding columns per program
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    es = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    c_mask = cs < C
    e_mask = es < E
    for j in range(K):
        acc = tl.zeros([BLOCK_C, BLOCK_E], dtype=tl.float32)
        x_seq = X  # x[b]
        for b in range(B):
            gp, a = _gp(GO, PRE, ARGMAX, b * CT + OFF + cs, c_mask, ACT)
            xw = tl.load(x_seq + (a + j)[:, None] * E + es[None, :], mask=(a >= 0)[:, None] & e_mask[None, :],
                         other=0.0)  # [BLOCK_C, BLOCK_E]: row argmax + j of each channel
            acc += gp[:, None] * xw.to(tl.float32)
            x_seq += L * E
        tl.store(DW + cs.to(tl.int64)[:, None] * (E * K) + es[None, :] * K + j, acc.to(DW.dtype.element_ty),
                 mask=c_mask[:, None] & e_mask[None, :])
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            db = tl.zeros([BLOCK_C], dtype=tl.float32)
            for b in range(B):
                gp, a = _gp(GO, PRE, ARGMAX, b * CT + OFF + cs, c_mask, ACT)
                db += gp
            tl.store(DB + cs, db.to(DB.dtype.element_ty), mask=c_mask)


@triton.jit
def _text_cnn_pool_bwd_x_kernel(
    GO,  # [B, CT] grad_out
    WT,  # [C, E, K] this width's weight
    ARGMAX,  # [B, CT] int32
    PRE,  # [B, CT] float32
    DX,  # [B, L, E] float32 grad_x accumulator (this width's windows are added to it)
    L,  # int: positions per sequence
    E,  # int: embedding size
    C,  # int: this width's channels
    K,  # int: this width
    CT,  # int: all widths' channels
    OFF,  # int: this width's first column
    BLOCK_K: tl.constexpr,  # next power of two >= K: the window's rows
    BLOCK_E: tl.constexpr,  # embedding columns per program
    ACT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    es = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = es < E
    js = tl.arange(0, BLOCK_K)
    j_mask = js < K
    mask = j_mask[:, None] & e_mask[None, :]
    w_c = WT  # W[c]
    for c in range(C):
        gp, a = _gp(GO, PRE, ARGMAX, b * CT + OFF + c, c < C, ACT)
        if a >= 0:
            w = tl.load(w_c + es[None, :] * K + js[:, None], mask=mask, other=0.0)  # [BLOCK_K, BLOCK_E]
            ptrs = DX + (b * L + a + js).to(tl.int64)[:, None] * E + es[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + gp * w.to(tl.float32), mask=mask)
            tl.debug_barrier()  # the next window's load may read these rows in other threads
        w_c += E * K


def _blocks(device):
    """(BLOCK_P, BLOCK_C, BLOCK_E, num_warps) of the forward."""
    if device.type != "cuda":  # TRITON_INTERPRET=1: the smallest tiles tl.dot takes
        return 16, 16, 16, 1
    return 64, 64, 32, 4


def _check(dtype):
    reason = text_cnn_pool_triton_supports(dtype)
    if reason is not None:
        raise ValueError(reason)


def text_cnn_pool_fwd_triton(x, weights, biases, lengths, activation):
    """x [B, L, E], weights [C_i, E, k_i], biases [C_i] or None, lengths int64 [B] or None ->
    (out [B, sum C_i] x.dtype, argmax int32, pre float32)."""
    _check(x.dtype)
    B, L, E = x.shape
    CT = sum(w.shape[0] for w in weights)
    out = x.new_empty(B, CT)
    argmax = torch.empty(B, CT, device=x.device, dtype=torch.int32)
    pre = torch.empty(B, CT, device=x.device, dtype=torch.float32)
    block_p, block_c, block_e, num_warps = _blocks(x.device)
    off = 0
    for i, w in enumerate(weights):
        C, k = w.shape[0], w.shape[2]
        if B * C > 0:
            _text_cnn_pool_fwd_kernel[(B, triton.cdiv(C, block_c))](
                x, w, biases[i] if biases is not None else w, lengths if lengths is not None else x,
                out, argmax, pre, L, E, C, k, CT, off,
                BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_E=block_e, HAS_BIAS=biases is not None,
                HAS_LENS=lengths is not None, ACT=int(activation), DOT_PRECISION=_dot_precision(x),
                num_warps=num_warps,
            )
        off += C
    return out, argmax, pre


def text_cnn_pool_bwd_triton(grad_out, x, weights, biases, argmax, pre, activation):
    """-> [grad_x [B, L, E], grad_w_0 .. grad_w_{n-1}, grad_b_0 .. grad_b_{n-1} (with biases)]."""
    _check(x.dtype)
    B, L, E = x.shape
    CT = argmax.shape[1]
    block_e = 16 if x.device.type != "cuda" else min(128, max(16, triton.next_power_of_2(E)))
    block_c = 16
    grad_x = torch.zeros(B, L, E, device=x.device, dtype=torch.float32)
    grad_ws, grad_bs, off = [], [], 0
    for i, w in enumerate(weights):
        C, k = w.shape[0], w.shape[2]
        grad_w = torch.empty_like(w)
        grad_b = torch.empty_like(biases[i]) if biases is not None else None
        if C > 0:  # at least one E block, so that grad_b is written even when E = 0
            _text_cnn_pool_bwd_w_kernel[(triton.cdiv(C, block_c), max(1, triton.cdiv(E, block_e)))](
                grad_out, x, argmax, pre, grad_w, grad_b if grad_b is not None else grad_w,
                B, L, E, C, k, CT, off,
                BLOCK_C=block_c, BLOCK_E=block_e, HAS_BIAS=grad_b is not None, ACT=int(activation),
                num_warps=max(1, min(4, block_c * block_e // 256)),
            )
        if B * E > 0 and C > 0:
            _text_cnn_pool_bwd_x_kernel[(B, triton.cdiv(E, block_e))](
                grad_out, w, argmax, pre, grad_x, L, E, C, k, CT, off,
                BLOCK_K=triton.next_power_of_2(k), BLOCK_E=block_e, ACT=int(activation),
                num_warps=max(1, min(4, block_e // 32)),
            )
        grad_ws.append(grad_w)
        if grad_b is not None:
            grad_bs.append(grad_b)
        off += C
    return [grad_x.to(x.dtype), *grad_ws, *grad_bs]
