"""conv1d / conv2d with a fused epilogue in Triton; contract in bignlp_fast/ops/conv.py.

The main loop is torch's convolution (``aten::convolution`` without its bias: cuDNN on the GPU),
which a hand-written kernel does not beat for general strides, groups and dilations. Around it:

- forward: one elementwise kernel over the output viewed as [R = B * C_out, S = prod(spatial)]
  computes ``v = conv + bias[row % C_out]`` and ``act(v) + residual`` in fp32 and writes ``out``
  (into the convolution's own buffer when pre need not be saved; else v goes back there, as pre);
- backward: one kernel computes ``gp = grad_out * act'(pre)`` (stored in x.dtype for
  ``aten::convolution_backward``) and, with a bias, fp32 row sums of gp: program (m, n) owns a fixed
  group of column tiles and writes its partial sums to a [column programs, R] buffer, which torch
  reduces over the programs and the batch afterwards, so grad_bias is deterministic (no atomics).

A channels_last output is viewed as [R = B * H * W, S = C_out] instead, the bias indexed by column
(BIAS_ON_COLS): program (m, n) then writes the column sums of its tiles to a [row blocks, C_out] buffer.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from bignlp_fast.kernels._activation import act, act_grad
from bignlp_fast.kernels._common import flat_ids as _flat_ids
from bignlp_fast.kernels._common import sm_count as _sm_count

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE = 4096  # elements per program tile


def conv_triton_supports(dtype) -> Optional[str]:
    """None when the triton backend handles x of this dtype, else the reason why not."""
    if dtype not in _DTYPES:
        return f"triton conv supports float32, float16 and bfloat16, not {dtype}"
    return None


@triton.jit
def _conv_epilogue_fwd_kernel(
    PRE,  # [R, S] convolution output without bias, x.dtype (R = B * C_out, S = output positions); with
    #       SAVE_PRE, v = conv + bias is written back over it
    BIAS,  # [C_out] (read only if HAS_BIAS)
    RES,  # [R, S] residual (read only if HAS_RES)
    OUT,  # [R, S] act(v) + residual, x.dtype; may be PRE itself (then not SAVE_PRE)
    R,  # int: rows
    S,  # int: row length
    C_OUT,  # int: channels; the bias of row r is bias[r % C_OUT]
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    ACT: tl.constexpr,  # activation code (ops/_activation.py)
    BIAS_ON_COLS: tl.constexpr,  # channels_last: [R = positions, S = C_OUT], the bias of column c is bias[c]
    SAVE_PRE: tl.constexpr,
):
    pid_m, pid_n = _flat_ids(tl.cdiv(S, BLOCK_N))
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < R
    mask = row_mask[:, None] & (cols[None, :] < S)
    offs = rows[:, None] * S + cols[None, :]
    v = tl.load(PRE + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        if BIAS_ON_COLS:
            v += tl.load(BIAS + cols, mask=cols < S, other=0.0).to(tl.float32)[None, :]
        else:
            v += tl.load(BIAS + rows % C_OUT, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    if SAVE_PRE:
        tl.store(PRE + offs, v.to(PRE.dtype.element_ty), mask=mask)
    y = act(v, ACT)
    if HAS_RES:
        y += tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _conv_epilogue_bwd_kernel(
    DY,  # [R, S] grad_out
    PRE,  # [R, S] the activation's input, conv + bias (the forward's pre)
    GP,  # [R, S] grad_out * act'(pre), x.dtype
    DB_PART,  # [P, R] float32 row sums of GP per column program, or with BIAS_ON_COLS [row blocks, S]
    #           column sums of GP per row block (written only if HAS_BIAS)
    R,  # int: rows
    S,  # int: row length
    TILES_PER_PROGRAM,  # int: program (m, n) handles column tiles [n * TILES_PER_PROGRAM, (n+1) * TILES_PER_PROGRAM)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
    HAS_BIAS: tl.constexpr,  # write DB_PART
    ACT: tl.constexpr,
    BIAS_ON_COLS: tl.constexpr,  # channels_last: as in the forward kernel
):
    pid_m, pid_n = _flat_ids(tl.cdiv(tl.cdiv(S, BLOCK_N), TILES_PER_PROGRAM))  # column programs run fastest
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < R
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first_tile = pid_n.to(tl.int64) * TILES_PER_PROGRAM
    for t in range(TILES_PER_PROGRAM):
        cols = (first_tile + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols[None, :] < S)
        offs = rows[:, None] * S + cols[None, :]
        v = tl.load(PRE + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        gp = dy * act_grad(v, ACT)  # dy is 0 where masked, so gp is too
        tl.store(GP + offs, gp.to(GP.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            if BIAS_ON_COLS:  # this program is the only one that holds these (row block, column) sums
                tl.store(DB_PART + pid_m.to(tl.int64) * S + cols, tl.sum(gp, axis=0), mask=cols < S)
            else:
                db_acc += gp
    if HAS_BIAS and not BIAS_ON_COLS:
        tl.store(DB_PART + pid_n.to(tl.int64) * R + rows, tl.sum(db_acc, axis=1), mask=row_mask)


def _channels_last(x) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _rows_cols(pre, cl: bool):
    """(R, S, C_out) of the epilogue's [R, S] view of pre: [B * C_out, spatial] or, channels_last,
    [B * H * W, C_out]."""
    B, C_out = pre.shape[:2]
    spatial = math.prod(pre.shape[2:])
    return (B * spatial, C_out, C_out) if cl else (B * C_out, spatial, C_out)


def _tiling(R, S):
    block_n = min(max(16, triton.next_power_of_2(S)), 1024)
    block_m = max(1, min(_TILE // block_n, triton.next_power_of_2(max(R, 1))))
    num_warps = max(1, min(8, block_m * block_n // 512))
    return block_m, block_n, num_warps


def _check(dtype):
    reason = conv_triton_supports(dtype)
    if reason is not None:
        raise ValueError(reason)


def conv_fwd_triton(x, weight, bias, residual, stride, padding, dilation, groups, activation, save_pre):
    """x [B, C_in, *spatial], weight [C_out, C_in / groups, *kernel] -> (out, pre or [0]): see ops/conv.py."""
    _check(x.dtype)
    cl = _channels_last(x)
    pre = torch.ops.aten.convolution(x, weight, None, stride, padding, dilation, False, [0] * len(stride),
                                     groups).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    out = torch.empty_like(pre) if save_pre else pre  # in place: each element is read, then written, once
    R, S, C_out = _rows_cols(pre, cl)
    if pre.numel() > 0:
        block_m, block_n, num_warps = _tiling(R, S)
        grid = (triton.cdiv(R, block_m) * triton.cdiv(S, block_n),)  # flat: _common.flat_ids
        _conv_epilogue_fwd_kernel[grid](
            pre, bias if bias is not None else pre, residual if residual is not None else pre, out, R, S, C_out,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
            ACT=int(activation), BIAS_ON_COLS=cl, SAVE_PRE=save_pre, num_warps=num_warps,
        )
    return out, (pre if save_pre else x.new_empty(0))


def conv_bwd_triton(grad_out, x, weight, pre, bias, stride, padding, dilation, groups, activation):
    """-> (grad_x, grad_weight, grad_bias [C_out] or [0]); grad_out and pre shaped like the output."""
    _check(x.dtype)
    has_bias = bias is not None
    cl = _channels_last(x)
    B = pre.shape[0]
    R, S, C_out = _rows_cols(pre, cl)
    gp = torch.empty_like(pre)  # pre's layout (channels_last or contiguous)
    block_m, block_n, num_warps = _tiling(R, S)
    row_blocks, col_tiles = triton.cdiv(R, block_m), triton.cdiv(S, block_n)
    tiles_per_program = 1
    if has_bias and not cl:  # about two programs per SM, each looping over column tiles: a small partial buffer
        col_programs = max(1, min(col_tiles, triton.cdiv(2 * _sm_count(x.device), row_blocks)))
        tiles_per_program = max(1, triton.cdiv(col_tiles, col_programs))
    col_programs = triton.cdiv(col_tiles, tiles_per_program)
    db_shape = (row_blocks, S) if cl else (col_programs, R)
    db_part = torch.zeros(db_shape, device=x.device, dtype=torch.float32) if has_bias else None
    if pre.numel() > 0:
        _conv_epilogue_bwd_kernel[(row_blocks * col_programs,)](
            grad_out, pre, gp, db_part if has_bias else gp,
            R, S, tiles_per_program,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=has_bias, ACT=int(activation), BIAS_ON_COLS=cl,
            num_warps=num_warps,
        )
    if has_bias and cl:  # fixed order: over the row blocks
        grad_bias = db_part.sum(0).to(bias.dtype)
    elif has_bias:  # fixed order: over the column programs, then the batch
        grad_bias = db_part.view(col_programs, B, C_out).sum(0).sum(0).to(bias.dtype)
    else:
        grad_bias = x.new_empty(0)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        gp, x, weight, None, stride, padding, dilation, False, [0] * len(stride), groups, [True, True, False])
    return grad_x, grad_w, grad_bias
