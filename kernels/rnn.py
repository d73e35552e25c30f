"""The time loop of one recurrent layer (LSTM, GRU, RNN tanh/relu) in Triton, forward and backward;
contract in bignlp_fast/ops/rnn.py (``rnn_fwd_torch`` / ``rnn_bwd_torch`` are the specification).

The rows of a batch never interact, so each program owns BLOCK_B rows and walks every step for
them: no synchronisation between programs. Within a step a program computes ``h W_hh^T`` tile by
tile of hidden units (all G gates of a tile together, so the gate update is fused into the GEMM's
epilogue). A step needs all of the previous state, so the fp32 state lives in a two-slot buffer in
global memory: step s reads slot s % 2 and writes the other, with a barrier between steps (the
program's threads share the rows; ``tl.debug_barrier`` makes the writes visible to all of them).

Forward, per step and tile of hidden units: pre = xw[t] + h W_hh^T + b_hh for each gate, the
nonlinearities, the new cell/state, masking of inactive steps (t >= lengths[b]: keep the state,
output zeros). With ``save``, the workspace row [T, B, width] holds what the backward needs:
LSTM (i, f, g, o, h after, c after[, m]), GRU (r, z, n, h after, h W_hn^T + b_hn), RNN (h', h after).

Backward, per step in reverse: phase A computes, tile by tile, the gate gradients from the state
gradient (dx: the gradient of xw; dg: of h W_hh^T + b_hh, which differs from dx only for the GRU's
n gate) and the LSTM's cell gradient; after a barrier, phase B computes the gradient of the previous
state, dg W_hh (+ the GRU's direct z h term), into the other slot. The weight gradients are one
GEMM over all steps at the end (torch.matmul in fp32): d_w_hh = dg^T [h before each step].

With an LSTM projection (proj_size: state S = P < H) the forward writes m = o tanh(c) for the
whole row, then after a barrier computes h' = m W_hr^T tile by tile of the state; the backward first
writes the new state's whole gradient (kept for d_w_hr = dht^T m at the end), then dm = dht W_hr
inside phase A.

The forward's recurrent GEMM runs in the weights' dtype (a 16-bit state is rounded for the GEMM
only, as torch's bf16 LSTM does; sums in fp32); the backward's GEMMs in fp32.

Parallelism is batch blocks only (ceil(B / 16) programs): on a GPU, small batches use few SMs.
Performance on a GPU has not been measured (no GPU was lent while this was written); the kernels
are tested under TRITON_INTERPRET=1.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from bignlp_fast.kernels._activation import _sigmoid, _tanh
from bignlp_fast.kernels._common import dot_precision, mma
from bignlp_fast.ops.rnn import GATES, workspace_width

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MODES = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}


def rnn_triton_supports(dtype) -> Optional[str]:
    """None when the triton backend takes x of this dtype, else the reason why not."""
    if dtype not in _DTYPES:
        return f"triton rnn supports float32, float16 and bfloat16, not {dtype}"
    return None


@triton.jit
def _hw(HP, W, rows, row_mask, gcols, col_mask, K, LDW, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """[BLOCK_B, BLOCK_N] fp32: HP[rows, :K] @ W[gcols, :K]^T (HP fp32 row stride K, W row stride LDW);
    HP is cast to W's dtype for the product."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(HP + rows[:, None] * K + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(W + gcols[None, :] * LDW + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc += mma(a.to(w.dtype), w, DOT_PRECISION)
    return acc


@triton.jit
def _ab(A, a_rows, row_mask, Bm, ldb, cols, col_mask, K, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr):
    """[BLOCK_B, BLOCK_N] fp32: A[row, :K] @ Bm[:K, cols] in fp32, the rows of A at offsets a_rows
    ([BLOCK_B, 1]) and Bm of row stride ldb."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(A + a_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        b = tl.load(Bm + ks[:, None] * ldb + cols[None, :], mask=k_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += mma(a, b, "ieee")
    return acc


@triton.jit
def _active(LENS, rows, row_mask, t, HAS_LENS: tl.constexpr):
    """[BLOCK_B, 1]: whether step t is active for each row (t < lengths[row]; every step without lengths)."""
    if HAS_LENS:
        return (t < tl.load(LENS + rows, mask=row_mask, other=0))[:, None]
    return (rows >= 0)[:, None]


@triton.jit
def _rnn_fwd_kernel(
    XW,  # [T, B, G*H] x.dtype
    W,  # [G*H, S] w_hh
    BHH,  # [G*H] (read only if HAS_BIAS)
    W_HR,  # [S, H] the LSTM's projection (read only if HAS_PROJ)
    LENS,  # int64 [B] (read only if HAS_LENS)
    OUT,  # [T, B, S] x.dtype
    WS,  # [T, B, WSW] fp32 workspace (written only if SAVE)
    HBUF,  # [2, B, S] fp32: slot 0 holds h0 on entry; after the loop slot T % 2 holds h_n
    CBUF,  # [B, H] fp32 (LSTM): c0 on entry, c_n on exit
    MBUF,  # [B, H] fp32 (HAS_PROJ): this step's o * tanh(c), the projection's input
    T, B, H, S, WSW,
    MODE: tl.constexpr,  # 0 lstm, 1 gru, 2 rnn_tanh, 3 rnn_relu
    G: tl.constexpr,  # gates: 4, 3, 1, 1
    REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PROJ: tl.constexpr, HAS_LENS: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    GH = G * H
    for s in range(T):
        if REVERSE:
            t = T - 1 - s
        else:
            t = s
        active = _active(LENS, rows, row_mask, t, HAS_LENS)
        rd = HBUF + (s % 2) * B * S
        wr = HBUF + ((s + 1) % 2) * B * S
        xrow = (t * B + rows)[:, None] * GH  # [BLOCK_B, 1] offsets of xw[t, rows]
        wrow = (t * B + rows)[:, None] * WSW
        orow = (t * B + rows)[:, None] * S
        for j0 in range(0, H, BLOCK_H):
            cols = j0 + tl.arange(0, BLOCK_H)
            col_mask = cols < H
            mask = row_mask[:, None] & col_mask[None, :]
            # gate q's pre-activation: xw[t, rows, q H + cols] + h W_hh[q H + cols]^T + b_hh[q H + cols]
            x0 = tl.load(XW + xrow + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            p0 = x0 + _hw(rd, W, rows, row_mask, cols, col_mask, S, S, BLOCK_B, BLOCK_H, BLOCK_K, DOT_PRECISION)
            if HAS_BIAS:
                p0 += tl.load(BHH + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            ws = WS + wrow + cols[None, :]
            if MODE == 0:
                p1 = tl.load(XW + xrow + H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                p2 = tl.load(XW + xrow + 2 * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                p3 = tl.load(XW + xrow + 3 * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                p1 += _hw(rd, W, rows, row_mask, H + cols, col_mask, S, S, BLOCK_B, BLOCK_H, BLOCK_K, DOT_PRECISION)
                p2 += _hw(rd, W, rows, row_mask, 2 * H + cols, col_mask, S, S, BLOCK_B, BLOCK_H, BLOCK_K,
                          DOT_PRECISION)
                p3 += _hw(rd, W, rows, row_mask, 3 * H + cols, col_mask, S, S, BLOCK_B, BLOCK_H, BLOCK_K,
                          DOT_PRECISION)
                if HAS_BIAS:
                    p1 += tl.load(BHH + H + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
                    p2 += tl.load(BHH + 2 * H + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
                    p3 += tl.load(BHH + 3 * H + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
                i, f, g, o = _sigmoid(p0), _sigmoid(p1), _tanh(p2), _sigmoid(p3)
                st = rows[:, None] * H + cols[None, :]
                c_prev = tl.load(CBUF + st, mask=mask, other=0.0)
                c_new = f * c_prev + i * g
                h_new = o * _tanh(c_new)  # m: the new state, or the projection's input
                c_keep = tl.where(active, c_new, c_prev)
                tl.store(CBUF + st, c_keep, mask=mask)
                if SAVE:
                    tl.store(ws, i, mask=mask)
                    tl.store(ws + H, f, mask=mask)
                    tl.store(ws + 2 * H, g, mask=mask)
                    tl.store(ws + 3 * H, o, mask=mask)
                    tl.store(ws + GH + S, c_keep, mask=mask)
                    if HAS_PROJ:
                        tl.store(ws + GH + S + H, h_new, mask=mask)
                if HAS_PROJ:
                    tl.store(MBUF + st, h_new, mask=mask)
            elif MODE == 1:
                # r and z add the two projections; n = tanh(xw_n + r (h W_hn^T + b_hn))
                x1 = tl.load(XW + xrow + H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                x2 = tl.load(XW + xrow + 2 * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                p1 = x1 + _hw(rd, W, rows, row_mask, H + cols, col_mask, S, S, BLOCK_B, BLOCK_H, BLOCK_K,
                              DOT_PRECISION)
                hn = _hw(rd, W, rows, row_mask, 2 * H + cols, col_mask, S, S, BLOCK_B, BLOCK_H, BLOCK_K,
                         DOT_PRECISION)
                if HAS_BIAS:
                    p1 += tl.load(BHH + H + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
                    hn += tl.load(BHH + 2 * H + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
                r, z = _sigmoid(p0), _sigmoid(p1)
                n = _tanh(x2 + r * hn)
                h_new = (1.0 - z) * n + z * tl.load(rd + rows[:, None] * S + cols[None, :], mask=mask, other=0.0)
                if SAVE:
                    tl.store(ws, r, mask=mask)
                    tl.store(ws + H, z, mask=mask)
                    tl.store(ws + 2 * H, n, mask=mask)
                    tl.store(ws + GH + S, hn, mask=mask)
            elif MODE == 2:
                h_new = _tanh(p0)
            else:
                h_new = tl.where(p0 > 0.0, p0, 0.0)
            if MODE >= 2:
                if SAVE:
                    tl.store(ws, h_new, mask=mask)
            if not HAS_PROJ:  # the state is this tile's h_new (S == H)
                st = rows[:, None] * S + cols[None, :]
                h_keep = tl.where(active, h_new, tl.load(rd + st, mask=mask, other=0.0))
                tl.store(wr + st, h_keep, mask=mask)
                tl.store(OUT + orow + cols[None, :], tl.where(active, h_new, 0.0).to(OUT.dtype.element_ty), mask=mask)
                if SAVE:
                    tl.store(ws + GH, h_keep, mask=mask)
        if HAS_PROJ:  # h' = m W_hr^T, which needs all of m
            tl.debug_barrier()
            for p0_ in range(0, S, BLOCK_H):
                pcols = p0_ + tl.arange(0, BLOCK_H)
                p_mask = pcols < S
                mask = row_mask[:, None] & p_mask[None, :]
                st = rows[:, None] * S + pcols[None, :]
                h_new = _hw(MBUF, W_HR, rows, row_mask, pcols, p_mask, H, H, BLOCK_B, BLOCK_H, BLOCK_K,
                            DOT_PRECISION)
                h_keep = tl.where(active, h_new, tl.load(rd + st, mask=mask, other=0.0))
                tl.store(wr + st, h_keep, mask=mask)
                tl.store(OUT + orow + pcols[None, :], tl.where(active, h_new, 0.0).to(OUT.dtype.element_ty),
                         mask=mask)
                if SAVE:
                    tl.store(WS + wrow + GH + pcols[None, :], h_keep, mask=mask)
        tl.debug_barrier()  # the next step reads every column of the state just written


@triton.jit
def _rnn_bwd_kernel(
    GO,  # [T, B, S] grad of out
    W,  # [G*H, S] w_hh
    W_HR,  # [S, H] (read only if HAS_PROJ)
    H0, C0,  # [B, S], [B, H] fp32: the states before the walk's first step
    LENS,  # int64 [B] (read only if HAS_LENS)
    WS,  # [T, B, WSW] fp32: the forward's workspace
    DX,  # [T, B, G*H] fp32: gradient of xw
    DG,  # [T, B, G*H] fp32: gradient of h W_hh^T + b_hh (the GRU's; else DX is passed)
    DHT,  # [T, B, S] fp32 (HAS_PROJ): the gradient of each step's new state, for d_w_hr
    DH,  # [2, B, S] fp32: slot 0 holds grad h_n on entry; slot T % 2 holds grad h0 on exit
    DC,  # [B, H] fp32 (LSTM): grad c_n on entry, grad c0 on exit
    T, B, H, S, WSW,
    MODE: tl.constexpr, G: tl.constexpr, REVERSE: tl.constexpr, HAS_PROJ: tl.constexpr,
    HAS_LENS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    GH = G * H
    for r in range(T):
        s = T - 1 - r  # the forward's step index, walked backwards
        if REVERSE:
            t = T - 1 - s
            t_prev = t + 1  # the step before s in the forward's order
        else:
            t = s
            t_prev = t - 1
        active = _active(LENS, rows, row_mask, t, HAS_LENS)
        rd = DH + (r % 2) * B * S
        wr = DH + ((r + 1) % 2) * B * S
        wrow = (t * B + rows)[:, None] * WSW
        prow = (t_prev * B + rows)[:, None] * WSW
        grow = (t * B + rows)[:, None] * GH
        orow = (t * B + rows)[:, None] * S
        if HAS_PROJ:  # the new state's gradient, whole, for dm = dht W_hr
            for p0_ in range(0, S, BLOCK_H):
                pcols = p0_ + tl.arange(0, BLOCK_H)
                mask = row_mask[:, None] & (pcols < S)[None, :]
                dh = tl.load(rd + rows[:, None] * S + pcols[None, :], mask=mask, other=0.0)
                go = tl.load(GO + orow + pcols[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(DHT + orow + pcols[None, :], tl.where(active, dh + go, 0.0), mask=mask)
            tl.debug_barrier()
        # phase A: the gate gradients of step t, tile by tile
        for j0 in range(0, H, BLOCK_H):
            cols = j0 + tl.arange(0, BLOCK_H)
            col_mask = cols < H
            mask = row_mask[:, None] & col_mask[None, :]
            if HAS_PROJ:
                dht = _ab(DHT, orow, row_mask, W_HR, H, cols, col_mask, S, BLOCK_B, BLOCK_H, BLOCK_K)  # dm
            else:
                dh = tl.load(rd + rows[:, None] * S + cols[None, :], mask=mask, other=0.0)
                go = tl.load(GO + orow + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                dht = tl.where(active, dh + go, 0.0)  # the gradient of this step's new state
            ws = WS + wrow + cols[None, :]
            if MODE == 0:
                st = rows[:, None] * H + cols[None, :]
                i = tl.load(ws, mask=mask, other=0.0)
                f = tl.load(ws + H, mask=mask, other=0.0)
                g = tl.load(ws + 2 * H, mask=mask, other=0.0)
                o = tl.load(ws + 3 * H, mask=mask, other=0.0)
                tc = _tanh(tl.load(ws + GH + S, mask=mask, other=0.0))  # c after = c_new where active
                if s > 0:
                    c_prev = tl.load(WS + prow + GH + S + cols[None, :], mask=mask, other=0.0)
                else:
                    c_prev = tl.load(C0 + st, mask=mask, other=0.0)
                dc = tl.load(DC + st, mask=mask, other=0.0)
                dct = tl.where(active, dc + dht * o * (1.0 - tc * tc), 0.0)
                tl.store(DC + st, tl.where(active, dct * f, dc), mask=mask)
                dx = DX + grow + cols[None, :]
                tl.store(dx, dct * g * i * (1.0 - i), mask=mask)
                tl.store(dx + H, dct * c_prev * f * (1.0 - f), mask=mask)
                tl.store(dx + 2 * H, dct * i * (1.0 - g * g), mask=mask)
                tl.store(dx + 3 * H, dht * tc * o * (1.0 - o), mask=mask)
            elif MODE == 1:
                st = rows[:, None] * S + cols[None, :]
                rg = tl.load(ws, mask=mask, other=0.0)
                z = tl.load(ws + H, mask=mask, other=0.0)
                n = tl.load(ws + 2 * H, mask=mask, other=0.0)
                hn = tl.load(ws + GH + S, mask=mask, other=0.0)
                if s > 0:
                    h_prev = tl.load(WS + prow + GH + cols[None, :], mask=mask, other=0.0)
                else:
                    h_prev = tl.load(H0 + st, mask=mask, other=0.0)
                dn_pre = dht * (1.0 - z) * (1.0 - n * n)
                dr_pre = dn_pre * hn * rg * (1.0 - rg)
                dz_pre = dht * (h_prev - n) * z * (1.0 - z)
                dx = DX + grow + cols[None, :]
                tl.store(dx, dr_pre, mask=mask)
                tl.store(dx + H, dz_pre, mask=mask)
                tl.store(dx + 2 * H, dn_pre, mask=mask)
                dg = DG + grow + cols[None, :]
                tl.store(dg, dr_pre, mask=mask)
                tl.store(dg + H, dz_pre, mask=mask)
                tl.store(dg + 2 * H, dn_pre * rg, mask=mask)
                tl.store(wr + st, dht * z, mask=mask)  # the direct term of the previous state's gradient
            else:
                h_new = tl.load(ws, mask=mask, other=0.0)
                if MODE == 2:
                    d = dht * (1.0 - h_new * h_new)
                else:
                    d = tl.where(h_new > 0.0, dht, 0.0)
                tl.store(DX + grow + cols[None, :], d, mask=mask)
        tl.debug_barrier()  # phase B reads every gate gradient of the rows just written
        # phase B: the previous state's gradient, dg W_hh (+ z dh for the GRU); inactive rows pass dh on
        for j0 in range(0, S, BLOCK_H):
            cols = j0 + tl.arange(0, BLOCK_H)
            col_mask = cols < S
            mask = row_mask[:, None] & col_mask[None, :]
            st = rows[:, None] * S + cols[None, :]
            acc = _ab(DG, grow, row_mask, W, S, cols, col_mask, GH, BLOCK_B, BLOCK_H, BLOCK_K)
            if MODE == 1:
                acc += tl.load(wr + st, mask=mask, other=0.0)
            dh_old = tl.load(rd + st, mask=mask, other=0.0)
            tl.store(wr + st, tl.where(active, acc, dh_old), mask=mask)
        tl.debug_barrier()  # the next step's phase A reads these columns in other threads


def _blocks(device, hidden: int):
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps)."""
    if device.type != "cuda":  # TRITON_INTERPRET=1: the smallest tiles tl.dot takes
        return 16, 16, 16, 1
    block_h = min(64, max(16, triton.next_power_of_2(hidden)))
    return 16, block_h, 32, 4


def _check(xw, w_hh):
    reason = rnn_triton_supports(xw.dtype)
    if reason is not None:
        raise ValueError(reason)
    # the kernels' offsets into the weights are 32-bit; the same bounds as csrc/cuda/rnn.cu's
    if xw.numel() >= 2 ** 31 or w_hh.numel() >= 2 ** 31:
        raise ValueError(f"rnn (triton): xw {tuple(xw.shape)} or w_hh {tuple(w_hh.shape)} has 2^31 elements or more")


def rnn_fwd_triton(xw, w_hh, b_hh, h0, c0, w_hr, lengths, mode, reverse, save_workspace):
    _check(xw, w_hh)
    T, B, GH = xw.shape
    H, S = GH // GATES[mode], w_hh.shape[1]
    width = workspace_width(mode, H, S, "triton")
    out = xw.new_empty(T, B, S)
    ws = torch.empty((T, B, width) if save_workspace else (0,), device=xw.device, dtype=torch.float32)
    hbuf = torch.empty(2, B, S, device=xw.device, dtype=torch.float32)
    hbuf[0] = h0
    cbuf = c0.to(torch.float32, copy=True) if c0 is not None else hbuf
    mbuf = torch.empty(B, H, device=xw.device, dtype=torch.float32) if w_hr is not None else hbuf
    lens = lengths.to(xw.device) if lengths is not None else None
    block_b, block_h, block_k, num_warps = _blocks(xw.device, H)
    if B * H > 0:
        _rnn_fwd_kernel[(triton.cdiv(B, block_b),)](
            xw, w_hh, b_hh if b_hh is not None else w_hh, w_hr if w_hr is not None else w_hh,
            lens if lens is not None else xw, out, ws, hbuf, cbuf, mbuf, T, B, H, S, width,
            MODE=_MODES[mode], G=GATES[mode], REVERSE=bool(reverse), HAS_BIAS=b_hh is not None,
            HAS_PROJ=w_hr is not None, HAS_LENS=lens is not None, SAVE=bool(save_workspace),
            BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, DOT_PRECISION=dot_precision(w_hh),
            num_warps=num_warps,
        )
    h_n = hbuf[T % 2].to(xw.dtype, copy=True)  # copy: an output may not be a view at an offset
    c_n = cbuf.to(xw.dtype) if c0 is not None else xw.new_empty(0)
    return out, h_n, c_n, ws


def rnn_bwd_triton(grad_out, grad_h_n, grad_c_n, xw, w_hh, b_hh, h0, c0, w_hr, lengths, workspace, mode, reverse):
    _check(xw, w_hh)
    T, B, GH = xw.shape
    H, S = GH // GATES[mode], w_hh.shape[1]
    if workspace.numel() != T * B * workspace_width(mode, H, S, "triton"):
        raise ValueError("rnn_bwd_triton: the workspace does not come from the triton forward with save_workspace")
    dx = torch.zeros(T, B, GH, device=xw.device, dtype=torch.float32)
    dg = torch.zeros_like(dx) if mode == "gru" else dx
    dht = torch.zeros(T, B, S, device=xw.device, dtype=torch.float32) if w_hr is not None else dx
    dh = torch.empty(2, B, S, device=xw.device, dtype=torch.float32)
    dh[0] = grad_h_n
    dc = grad_c_n.to(torch.float32, copy=True) if c0 is not None else dh
    h0f = h0.float().contiguous()
    c0f = c0.float().contiguous() if c0 is not None else h0f
    lens = lengths.to(xw.device) if lengths is not None else None
    block_b, block_h, block_k, num_warps = _blocks(xw.device, H)
    if B * H > 0:
        _rnn_bwd_kernel[(triton.cdiv(B, block_b),)](
            grad_out, w_hh, w_hr if w_hr is not None else w_hh, h0f, c0f, lens if lens is not None else xw,
            workspace, dx, dg, dht, dh, dc, T, B, H, S, workspace.shape[-1],
            MODE=_MODES[mode], G=GATES[mode], REVERSE=bool(reverse), HAS_PROJ=w_hr is not None,
            HAS_LENS=lens is not None, BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, num_warps=num_warps,
        )
    # the state before each step t, in t's indexing: h0 before the walk's first step
    after = workspace[..., GH:GH + S]  # [T, B, S]
    before = torch.cat([after[1:], h0f[None]]) if reverse else torch.cat([h0f[None], after[:-1]])
    d_w_hh = (dg.reshape(T * B, GH).t() @ before.reshape(T * B, S)).to(w_hh.dtype)
    d_b_hh = dg.sum((0, 1)).to(b_hh.dtype) if b_hh is not None else xw.new_empty(0)
    d_c0 = dc.to(c0.dtype) if c0 is not None else xw.new_empty(0)
    if w_hr is not None:  # d_w_hr = sum over steps of dht^T m
        m = workspace[..., GH + S + H:GH + S + 2 * H]
        d_w_hr = (dht.reshape(T * B, S).t() @ m.reshape(T * B, H)).to(w_hr.dtype)
    else:
        d_w_hr = xw.new_empty(0)
    return dx.to(xw.dtype), d_w_hh, d_b_hh, dh[T % 2].to(h0.dtype, copy=True), d_c0, d_w_hr
