"""Fused y = gelu(x + bias) in Triton, erf or tanh form; contract in csrc/ops.h (bias_gelu block).

Elementwise over [N, H] tiles of [BLOCK_M rows, BLOCK_N columns], so any H works. The backward also
reduces grad_x over rows into grad_bias: each program owns a fixed group of row tiles for one
column block and writes fp32 column sums into a [row_programs, H] buffer that torch then sums,
so the result is deterministic (no atomics).
"""

import torch
import triton
import triton.language as tl

from bignlp_fast.kernels._activation import _tanh
from bignlp_fast.kernels._common import sm_count as _sm_count

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE = 4096  # elements per program tile


def bias_gelu_triton_supports(H, dtype):
    """None when the triton backend handles rows of H elements of dtype, else the reason why not."""
    if dtype not in _DTYPES:
        return f"triton bias_gelu supports float32, float16 and bfloat16, not {dtype}"
    return None


@triton.jit
def _gelu_and_grad(v, TANH: tl.constexpr, NEED_GRAD: tl.constexpr):
    # v: fp32 tile. Returns gelu(v) (NEED_GRAD False) or d gelu / dv (NEED_GRAD True).
    if TANH:
        t = _tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))  # sqrt(2 / pi)
        if NEED_GRAD:
            du_dv = 0.7978845608028654 * (1.0 + 0.134145 * v * v)  # 0.134145 = 3 * 0.044715
            r = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du_dv
        else:
            r = 0.5 * v * (1.0 + t)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476))
        if NEED_GRAD:
            r = cdf + v * 0.3989422804014327 * tl.exp(-0.5 * v * v)  # 1 / sqrt(2 pi)
        else:
            r = v * cdf
    return r


@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # [N, H] input
    B,  # [H] bias (read only if HAS_BIAS)
    Y,  # [N, H] output, x.dtype
    N,  # int: rows
    H,  # int: row length (row stride of X and Y)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
    HAS_BIAS: tl.constexpr,
    TANH: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < N) & (cols[None, :] < H)
    offs = rows[:, None] * H + cols[None, :]
    v = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(B + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    y = _gelu_and_grad(v, TANH, False)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY,  # [N, H] grad_y
    X,  # [N, H] forward input
    B,  # [H] bias (read only if HAS_BIAS)
    DX,  # [N, H] grad_x, grad_y.dtype
    DB_PART,  # [P, H] float32 column sums of grad_x per row program (written only if HAS_BIAS)
    N,  # int: rows
    H,  # int: row length (row stride of every tensor above)
    TILES_PER_PROGRAM,  # int: program (p, c) handles row tiles [p * TILES_PER_PROGRAM, (p+1) * TILES_PER_PROGRAM)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
    HAS_BIAS: tl.constexpr,
    TANH: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first_tile = pid_m.to(tl.int64) * TILES_PER_PROGRAM
    for t in range(TILES_PER_PROGRAM):
        rows = (first_tile + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < N) & col_mask[None, :]
        offs = rows[:, None] * H + cols[None, :]
        v = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += b[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dx = dy * _gelu_and_grad(v, TANH, True)  # dy is 0 where masked, so dx is too
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            db_acc += dx
    if HAS_BIAS:
        tl.store(DB_PART + pid_m.to(tl.int64) * H + cols, tl.sum(db_acc, axis=0), mask=col_mask)


def _tiling(N, H):
    block_n = min(max(16, triton.next_power_of_2(H)), 1024)
    block_m = max(1, min(_TILE // block_n, triton.next_power_of_2(max(N, 1))))
    num_warps = max(1, min(8, block_m * block_n // 512))
    return block_m, block_n, num_warps


def _check(H, dtype):
    reason = bias_gelu_triton_supports(H, dtype)
    if reason is not None:
        raise ValueError(reason)


def bias_gelu_fwd_triton(x, bias, tanh_approx):
    """x: [N, H]; bias: [H] or None -> y = gelu(x + bias) [N, H] in x.dtype."""
    N, H = x.shape
    _check(H, x.dtype)
    y = torch.empty_like(x)
    if N == 0 or H == 0:
        return y
    block_m, block_n, num_warps = _tiling(N, H)
    grid = (triton.cdiv(N, block_m), triton.cdiv(H, block_n))
    _bias_gelu_fwd_kernel[grid](
        x, bias if bias is not None else x, y, N, H,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=bias is not None, TANH=bool(tanh_approx),
        num_warps=num_warps,
    )
    return y


def bias_gelu_bwd_triton(grad_y, x, bias, tanh_approx):
    """grad_y, x: [N, H]; bias: [H] or None -> (grad_x [N, H], grad_bias [H], or [0] without bias)."""
    N, H = x.shape
    _check(H, x.dtype)
    has_bias = bias is not None
    grad_x = torch.empty_like(grad_y)
    if N == 0 or H == 0:
        return grad_x, (torch.zeros_like(bias) if has_bias else x.new_empty(0))
    block_m, block_n, num_warps = _tiling(N, H)
    row_tiles, col_blocks = triton.cdiv(N, block_m), triton.cdiv(H, block_n)
    tiles_per_program = 1
    if has_bias:  # about two programs per SM, each looping over row tiles: a small partial-sum buffer
        row_programs = max(1, min(row_tiles, triton.cdiv(2 * _sm_count(x.device), col_blocks)))
        tiles_per_program = max(1, triton.cdiv(row_tiles, row_programs))
    row_programs = triton.cdiv(row_tiles, tiles_per_program)
    db_part = torch.empty(row_programs, H, device=x.device, dtype=torch.float32) if has_bias else None
    _bias_gelu_bwd_kernel[(row_programs, col_blocks)](
        grad_y, x, bias if has_bias else x, grad_x, db_part if has_bias else grad_x,
        N, H, tiles_per_program,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=has_bias, TANH=bool(tanh_approx),
        num_warps=num_warps,
    )
    grad_bias = db_part.sum(0).to(bias.dtype) if has_bias else x.new_empty(0)
    return grad_x, grad_bias
