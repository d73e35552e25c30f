"""Fused (x + residual) -> LayerNorm in Triton; contract in csrc/ops.h (add_layer_norm block).

Forward: one program per row, the whole row in one block of BLOCK_H >= H columns (masked), fp32 math.
Backward: each program owns a fixed, contiguous group of rows; it writes grad_s for its rows and one
fp32 row of partial sums of grad_weight / grad_bias into a [programs, H] buffer, which torch then
sums over programs. The grouping depends only on N and the device, so the result is deterministic.
"""

import torch
import triton
import triton.language as tl

from bignlp_fast.kernels._common import sm_count as _sm_count

MAX_H = 16384  # one row must fit in one block (registers); larger H is unsupported
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def add_layer_norm_triton_supports(H, dtype):
    """None when the triton backend handles rows of H elements of dtype, else the reason why not."""
    if dtype not in _DTYPES:
        return f"triton add_layer_norm supports float32, float16 and bfloat16, not {dtype}"
    if H < 1 or H > MAX_H:
        return f"triton add_layer_norm needs 1 <= hidden size <= {MAX_H} (one row per block), got {H}"
    return None


@triton.jit
def _add_layer_norm_fwd_kernel(
    X,  # [N, H] input, x.dtype
    R,  # [N, H] residual, x.dtype (read only if HAS_RESIDUAL)
    W,  # [H] weight (read only if HAS_WEIGHT)
    B,  # [H] bias (read only if HAS_BIAS)
    OUT,  # [N, H] normalized output, x.dtype
    R_OUT,  # [N, H] s = x + residual rounded to x.dtype (written only if HAS_RESIDUAL)
    MEAN,  # [N] float32
    RSTD,  # [N] float32
    H,  # int: row length (all [N, H] tensors are contiguous, row stride H)
    eps,  # float
    BLOCK_H: tl.constexpr,  # power of two >= H
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    offs = row * H + cols
    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s_out = (s + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(R_OUT.dtype.element_ty)
        tl.store(R_OUT + offs, s_out, mask=mask)
        s = s_out.to(tl.float32)  # normalise the rounded sum: the one the backward will see
    mean = tl.sum(s, axis=0) / H
    centered = tl.where(mask, s - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / H
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    y = centered * rstd
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _add_layer_norm_bwd_kernel(
    DY,  # [N, H] grad_out
    DRES,  # [N, H] grad_residual_out (read only if HAS_DRES)
    S,  # [N, H] s from the forward (residual_out, or x)
    MEAN,  # [N] float32
    RSTD,  # [N] float32
    W,  # [H] weight (read only if HAS_WEIGHT)
    DS,  # [N, H] grad_s, grad_out.dtype
    DW_PART,  # [P, H] float32 partial sums of grad_out * xhat (written only if HAS_WEIGHT)
    DB_PART,  # [P, H] float32 partial sums of grad_out (written only if HAS_BIAS)
    N,  # int: rows
    H,  # int: row length (row stride of every [N, H] / [P, H] tensor)
    ROWS_PER_PROGRAM,  # int: program p handles rows [p * ROWS_PER_PROGRAM, (p + 1) * ROWS_PER_PROGRAM)
    BLOCK_H: tl.constexpr,  # power of two >= H
    HAS_DRES: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    row_start = pid.to(tl.int64) * ROWS_PER_PROGRAM
    for i in range(0, tl.minimum(ROWS_PER_PROGRAM, N - row_start)):
        row = row_start + i
        offs = row * H + cols
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (s - mean) * rstd, 0.0)
        g = dy
        if HAS_WEIGHT:
            g = dy * w
        mean_g = tl.sum(g, axis=0) / H
        mean_gx = tl.sum(g * xhat, axis=0) / H
        ds = (g - mean_g - xhat * mean_gx) * rstd
        if HAS_DRES:
            ds += tl.load(DRES + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DS + offs, ds.to(DS.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
    part = pid.to(tl.int64) * H + cols
    if HAS_WEIGHT:
        tl.store(DW_PART + part, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PART + part, db_acc, mask=mask)


def _block_and_warps(H):
    block_h = max(16, triton.next_power_of_2(H))
    return block_h, max(1, min(32, block_h // 512))  # <= 16 elements of a row per thread


def _check(H, dtype):
    reason = add_layer_norm_triton_supports(H, dtype)
    if reason is not None:
        raise ValueError(reason)


def add_layer_norm_fwd_triton(x, residual, weight, bias, eps):
    """x, residual: [N, H]; weight, bias: [H] or None -> (out, residual_out, mean, rstd)."""
    N, H = x.shape
    _check(H, x.dtype)
    out = torch.empty_like(x)
    has_res = residual is not None
    residual_out = torch.empty_like(x) if has_res else x.new_empty(0)
    mean = torch.empty(N, device=x.device, dtype=torch.float32)
    rstd = torch.empty(N, device=x.device, dtype=torch.float32)
    if N == 0:
        return out, residual_out, mean, rstd
    block_h, num_warps = _block_and_warps(H)
    _add_layer_norm_fwd_kernel[(N,)](
        x, residual if has_res else x, weight if weight is not None else x, bias if bias is not None else x,
        out, residual_out if has_res else out, mean, rstd, H, float(eps),
        BLOCK_H=block_h, HAS_RESIDUAL=has_res, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        num_warps=num_warps,
    )
    return out, residual_out, mean, rstd


def add_layer_norm_bwd_triton(grad_out, grad_residual_out, s, mean, rstd, weight, has_bias):
    """grad_out, grad_residual_out (or None), s: [N, H]; mean, rstd: [N] fp32; weight: [H] or None
    -> (grad_s [N, H], grad_weight [H] or [0], grad_bias [H] or [0])."""
    N, H = grad_out.shape
    _check(H, grad_out.dtype)
    has_w = weight is not None
    param_dtype = weight.dtype if has_w else grad_out.dtype
    grad_s = torch.empty_like(grad_out)
    block_h, num_warps = _block_and_warps(H)
    # Enough programs to fill the GPU (about 16 warps per SM), each looping over a group of rows.
    programs = max(1, min(N, _sm_count(grad_out.device) * max(1, 16 // num_warps)))
    rows_per_program = triton.cdiv(N, programs) if N else 1
    programs = triton.cdiv(N, rows_per_program)
    dw_part = torch.empty(programs, H, device=grad_out.device, dtype=torch.float32) if has_w else None
    db_part = torch.empty(programs, H, device=grad_out.device, dtype=torch.float32) if has_bias else None
    if N > 0:
        _add_layer_norm_bwd_kernel[(programs,)](
            grad_out, grad_residual_out if grad_residual_out is not None else grad_out, s, mean, rstd,
            weight if has_w else grad_out, grad_s,
            dw_part if has_w else grad_s, db_part if has_bias else grad_s,
            N, H, rows_per_program,
            BLOCK_H=block_h, HAS_DRES=grad_residual_out is not None, HAS_WEIGHT=has_w, HAS_BIAS=has_bias,
            num_warps=num_warps,
        )
    # absent gradients are distinct empty tensors: a custom op's outputs may not alias each other
    grad_weight = dw_part.sum(0).to(param_dtype) if has_w else grad_out.new_empty(0, dtype=param_dtype)
    grad_bias = db_part.sum(0).to(param_dtype) if has_bias else grad_out.new_empty(0, dtype=param_dtype)
    return grad_s, grad_weight, grad_bias
