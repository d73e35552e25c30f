"""Flash attention (FlashAttention-2 scheme) in Triton; contract in bignlp_fast/ops/attention.py.

Forward: one program per (query block, sequence, query head). It streams the key/value blocks of
its sequence through an online softmax (running max ``m``, running sum ``l``, output accumulator in
fp32) and writes the output and the natural-log logsumexp of each row. Scores are kept in base 2
(``qk_scale`` = scale * log2(e)), so ``exp2`` does the exponentials.

Backward, three kernels:
1. ``delta = rowsum(dO * O)`` per query row;
2. one program per (key block, sequence, key/value head) recomputes P^T from lse, looping over the
   query heads of its group and their query blocks, and accumulates dK, dV in registers;
3. one program per (query block, sequence, query head) recomputes P and accumulates dQ.
Every gradient element is written by exactly one program (no atomics), so the backward is
deterministic.

Causal masks: key blocks entirely above the diagonal are never visited. The blocks the diagonal (or
the end of the keys) crosses run with the element mask; the ones below it run without.

Dropout: the keep mask is ``dropout_keep`` of ops/attention.py, recomputed here element by element
with Philox-4x32-10 (``_philox_word``), so the forward and both backward kernels draw the same mask
as every other backend.

Fully masked rows: the running max stays -inf and ``l`` stays 0; the output is 0 and lse +inf, and
in the backward ``exp2(s - lse) = 0`` makes every gradient through the row 0.

Layout: every tensor is addressed through its strides (last stride 1), so [B, H, L, D] views of
[B, L, H, D] or packed [T, H, D] tensors run without copies. Head dims up to 256, padded to a power
of two with masks. Under TRITON_INTERPRET=1 (CPU tensors) the tiles are 16 x 16.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from bignlp_fast.kernels._common import dot_precision as _dot_precision
from bignlp_fast.kernels._common import flat_ids as _flat_ids
from bignlp_fast.kernels._common import mma as _mma
from bignlp_fast.kernels._common import shared_memory_per_block as _shared_memory_per_block
from bignlp_fast.ops.attention import TRITON_MAX_HEAD_DIM, dropout_threshold

_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * log2(e))
_BIAS_FLOOR = tl.constexpr(-1e38)  # see _bias2
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2): ln(x) = log2(x) * ln(2)

# Philox-4x32 constants (same as philox4x32 in ops/attention.py)
_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)


def attention_triton_supports(head_dim: int, value_dim: int) -> Optional[str]:
    """None when the triton backend runs these head dims, else the reason why not."""
    for name, d in (("head_dim", head_dim), ("value head_dim", value_dim)):
        if d < 1:
            return f"triton attention needs {name} >= 1, got {d}"
        if d > TRITON_MAX_HEAD_DIM:
            return f"triton attention: {name} {d} > {TRITON_MAX_HEAD_DIM}"
    return None


# ---- device helpers ---------------------------------------------------------------------------
@triton.jit
def _philox_word(n, seed_lo, seed_hi):
    """Word n % 4 of Philox-4x32-10 at counter (lo32(n // 4), hi32(n // 4), 0, 0) under key
    (seed_lo, seed_hi). n: int64 tensor of element numbers; returns uint32 of n's shape."""
    c = n >> 2
    c0 = c.to(tl.uint32)  # truncation keeps the low 32 bits
    c1 = (c >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _PHILOX_M0)
        lo0 = c0 * _PHILOX_M0
        hi1 = tl.umulhi(c2, _PHILOX_M1)
        lo1 = c2 * _PHILOX_M1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    w = n & 3
    return tl.where(w == 0, c0, tl.where(w == 1, c1, tl.where(w == 2, c2, c3)))


@triton.jit
def _dropout_keep(row_base, cols, seed_lo, seed_hi, drop_thresh):
    """Keep mask for elements row_base + cols (int64 element numbers, broadcast to a tile)."""
    return _philox_word(row_base + cols, seed_lo, seed_hi) >= drop_thresh.to(tl.uint32)


@triton.jit
def _program_ids(length, BLOCK: tl.constexpr, n_heads):
    """(tile, sequence, head) of this program. The grid is flat (_common.flat_ids), tiles of one
    (sequence, head) next to each other (they read the same K and V): sequences x heads exceeds the
    65535 programs of grid dimension 1 (4096 x 16; a packed batch of 2048 short sequences x 32 heads)."""
    sh, tile = _flat_ids(tl.cdiv(length, BLOCK))
    return tile, sh // n_heads, sh % n_heads


@triton.jit
def _bias2(ptrs, mask):
    """The bias at ``ptrs`` in base 2 (times log2(e)), 0 where ``mask`` is false. A finite bias below
    _BIAS_FLOOR counts as _BIAS_FLOOR (-inf stays -inf): finfo(dtype).min, transformers' masking value,
    times log2(e) overflows to -inf, which would turn a row masked by it at every key into a fully
    masked one (zeros) where torch's SDPA averages the values. As csrc/cpu/attention.cpp, kBiasFloor."""
    b = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(b == float("-inf"), b, tl.maximum(b, _BIAS_FLOOR)) * _LOG2E


@triton.jit
def _scores(q, k, BIAS_blk, stride_bm, stride_bn, rows, offs_m, cols, q_len, k_len, offset, qk_scale,
            APPLY_MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores of one [BLOCK_M, BLOCK_N] tile in base 2: q k^T * scale * log2(e), plus the bias, with
    -inf where the key is past the sequence or (causal) after the query's limit ``rows + offset``."""
    s = _mma(q, tl.trans(k), DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        b_mask = (rows < q_len)[:, None] & (cols < k_len)[None, :]
        s += _bias2(BIAS_blk + offs_m[:, None] * stride_bm + cols[None, :].to(tl.int64) * stride_bn, b_mask)
    if APPLY_MASK:
        visible = (cols < k_len)[None, :]
        if CAUSAL != 0:
            visible = visible & (cols[None, :] <= rows[:, None] + offset)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _sequence(CU_Q, CU_K, seq, max_q, max_k, VARLEN: tl.constexpr):
    """(batch index, first q row, q length, first k row, k length) of sequence ``seq``: a batch entry
    (the whole L axis), or with cu_seqlens one packed sequence of batch 0."""
    zero = seq * 0  # tensors, not literals, on both branches
    if VARLEN:
        q_start = tl.load(CU_Q + seq)
        q_len = tl.load(CU_Q + seq + 1) - q_start
        k_start = tl.load(CU_K + seq)
        k_len = tl.load(CU_K + seq + 1) - k_start
        batch = zero
    else:
        q_start = zero
        q_len = zero + max_q
        k_start = zero
        k_len = zero + max_k
        batch = seq
    return batch, q_start, q_len, k_start, k_len


@triton.jit
def _causal_offset(q_len, k_len, CAUSAL: tl.constexpr):
    """Key j is visible to query i iff j <= i + offset (top-left: 0; bottom-right: k_len - q_len)."""
    if CAUSAL == 2:
        offset = k_len - q_len
    else:
        offset = q_len * 0
    return offset


@triton.jit
def _key_range(m0, q_len, k_len, offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For the query block [m0, m0 + BLOCK_M): (full_end, hi). Key blocks starting below full_end are
    visible to every row and inside the keys (no mask); those in [full_end, hi) need the mask; keys
    from hi on are visible to no (existing) row of the block and are skipped."""
    if CAUSAL != 0:
        hi = tl.minimum(tl.maximum(tl.minimum(m0 + BLOCK_M, q_len) + offset, 0), k_len)
        full_end = tl.minimum(tl.maximum(m0 + offset + 1, 0), k_len) // BLOCK_N * BLOCK_N
    else:
        hi = k_len
        full_end = k_len // BLOCK_N * BLOCK_N
    return full_end, hi


# ---- forward ----------------------------------------------------------------------------------
@triton.jit
def _fwd_tiles(
    acc, m_i, l_i,  # [BLOCK_M, BLOCK_DV] fp32, [BLOCK_M] fp32 (base-2 running max), [BLOCK_M] fp32
    q,  # [BLOCK_M, BLOCK_D] query tile (zeros outside the rows / head dim)
    K_head, V_head,  # key / value pointers at (batch, kv head, row 0 of the L axis)
    k_start,  # int64: first key row of this sequence on the L axis
    BIAS_blk,  # bias pointer at (this batch, head, row m0, key 0); unused without HAS_BIAS
    stride_kn, stride_vn, stride_bm, stride_bn,
    rows, offs_m, offs_n, offs_d, offs_dv,  # rows = m0 + offs_m: positions in the sequence
    lo, hi, q_len, k_len, head_dim, value_dim, offset, qk_scale,
    drop_rows,  # [BLOCK_M] int64 element number of (row, key 0); unused without DROPOUT
    seed_lo, seed_hi, drop_thresh,
    APPLY_MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over the key blocks starting in [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_mask = (cols < k_len)[:, None]
        key0 = k_start + start_n  # int64 (the loop index is 32-bit)
        k = tl.load(K_head + key0 * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=k_mask & (offs_d < head_dim)[None, :], other=0.0)
        s = _scores(q, k, BIAS_blk, stride_bm, stride_bn, rows, offs_m, cols, q_len, k_len, offset, qk_scale,
                    APPLY_MASK, CAUSAL, HAS_BIAS, DOT_PRECISION)  # [BLOCK_M, BLOCK_N], base 2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: exp2(-inf) = 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # the row sum is of the undropped probabilities
        if DROPOUT:
            keep = _dropout_keep(drop_rows[:, None], cols[None, :].to(tl.int64), seed_lo, seed_hi, drop_thresh)
            p = tl.where(keep, p, 0.0)
        v = tl.load(V_head + key0 * stride_vn + offs_n[:, None] * stride_vn + offs_dv[None, :],
                    mask=k_mask & (offs_dv < value_dim)[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "drop_thresh"])
def _attn_fwd_kernel(
    Q,  # [B, Hq, Lq, D]
    K,  # [B, Hk, Lk, D]
    V,  # [B, Hk, Lk, Dv]
    BIAS,  # [B, Hq, Lq, Lk] float32, any strides (read only if HAS_BIAS)
    OUT,  # [B, Hq, Lq, Dv], q.dtype
    LSE,  # [B, Hq, Lq] float32, last stride 1
    CU_Q, CU_K,  # [nseq + 1] int32 (read only if VARLEN)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    n_heads,  # int: Hq
    group,  # int: Hq // Hk
    max_q, max_k,  # int: max_seqlen_q / max_seqlen_k (Lq / Lk when batched)
    head_dim, value_dim,  # int: D, Dv
    qk_scale,  # float: scale * log2(e)
    seed_lo, seed_hi, drop_thresh,  # int: dropout key words and threshold (used only if DROPOUT)
    drop_scale,  # float: 1 / (1 - dropout_p)
    CAUSAL: tl.constexpr,  # 0 none, 1 top-left, 2 bottom-right
    HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  # powers of two >= D, Dv
    DOT_PRECISION: tl.constexpr,
):
    pid_m, seq, head = _program_ids(max_q, BLOCK_M, n_heads)
    batch, q_start, q_len, k_start, k_len = _sequence(CU_Q, CU_K, seq, max_q, max_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    kv_head = head // group
    offset = _causal_offset(q_len, k_len, CAUSAL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = m0 + offs_m
    row_mask = rows < q_len

    # 64-bit base pointers; offsets inside a tile stay 32-bit
    q_row0 = (q_start + m0).to(tl.int64)
    Q_blk = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + q_row0 * stride_qm
    q = tl.load(Q_blk + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_mask[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    K_head = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    V_head = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    BIAS_blk = BIAS
    if HAS_BIAS:  # never with VARLEN, so q_start == 0
        BIAS_blk = BIAS + batch.to(tl.int64) * stride_bb + head.to(tl.int64) * stride_bh + m0.to(tl.int64) * stride_bm
    drop_rows = ((seq.to(tl.int64) * n_heads + head) * max_q + rows) * max_k  # element number of (row, key 0)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    full_end, hi = _key_range(m0, q_len, k_len, offset, BLOCK_M, BLOCK_N, CAUSAL)
    # key blocks visible to every row of the block, unmasked; then those the diagonal or the key end crosses
    acc, m_i, l_i = _fwd_tiles(
        acc, m_i, l_i, q, K_head, V_head, k_start.to(tl.int64), BIAS_blk, stride_kn, stride_vn, stride_bm, stride_bn,
        rows, offs_m, offs_n, offs_d, offs_dv, 0, full_end, q_len, k_len, head_dim, value_dim, offset, qk_scale,
        drop_rows, seed_lo, seed_hi, drop_thresh,
        False, CAUSAL, HAS_BIAS, DROPOUT, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _fwd_tiles(
        acc, m_i, l_i, q, K_head, V_head, k_start.to(tl.int64), BIAS_blk, stride_kn, stride_vn, stride_bm, stride_bn,
        rows, offs_m, offs_n, offs_d, offs_dv, full_end, hi, q_len, k_len, head_dim, value_dim, offset, qk_scale,
        drop_rows, seed_lo, seed_hi, drop_thresh,
        True, CAUSAL, HAS_BIAS, DROPOUT, BLOCK_N, DOT_PRECISION)

    dead = l_i == 0.0  # no visible key: output 0, lse +inf
    inv_l = tl.where(dead, 0.0, 1.0 / tl.where(dead, 1.0, l_i))
    if DROPOUT:
        inv_l = inv_l * drop_scale
    out = acc * inv_l[:, None]
    OUT_blk = OUT + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + q_row0 * stride_om
    tl.store(OUT_blk + offs_m[:, None] * stride_om + offs_dv[None, :], out.to(OUT.dtype.element_ty),
             mask=row_mask[:, None] & (offs_dv < value_dim)[None, :])
    lse = tl.where(dead, float("inf"), (m_i + tl.log2(tl.where(dead, 1.0, l_i))) * _LN2)
    LSE_blk = LSE + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_row0
    tl.store(LSE_blk + offs_m, lse, mask=row_mask)


# ---- backward ---------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_delta_kernel(
    OUT,  # [B, H, L, Dv]
    DO,  # [B, H, L, Dv] grad_out
    DELTA,  # [B, H, L] float32, contiguous: rowsum(dO * O)
    stride_ob, stride_oh, stride_om,
    stride_gb, stride_gh, stride_gm,
    n_heads, seq_len, value_dim,  # int: H, L (all rows of the L axis, packed or not), Dv
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m, b, h = _program_ids(seq_len, BLOCK_M, n_heads)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_DV)
    mask = (rows < seq_len)[:, None] & (cols < value_dim)[None, :]
    o = tl.load(OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None].to(tl.int64) * stride_om
                + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh + rows[:, None].to(tl.int64) * stride_gm
                 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + (b * n_heads + h).to(tl.int64) * seq_len + rows, tl.sum(o * do, 1), mask=rows < seq_len)


@triton.jit
def _dkdv_tiles(
    dk, dv,  # [BLOCK_N, BLOCK_D], [BLOCK_N, BLOCK_DV] fp32 accumulators
    k, v,  # [BLOCK_N, BLOCK_D], [BLOCK_N, BLOCK_DV] tiles of this key block
    Q_head, DO_head,  # query / grad_out pointers at (batch, query head, row 0 of the L axis)
    q_start,  # int64: first query row of this sequence on the L axis
    LSE_seq, DELTA_seq,  # lse / delta pointers at row 0 of this sequence and query head
    BIAS_seq,  # bias pointer at (batch, head, row 0, key n0); unused without HAS_BIAS
    stride_qm, stride_gm, stride_bm, stride_bn,
    cols, offs_m, offs_n, offs_d, offs_dv,  # cols = n0 + offs_n: key positions in the sequence
    lo, hi, q_len, k_len, head_dim, value_dim, offset, qk_scale,
    drop_base,  # int64 element number of (row 0, key 0) for this sequence and head
    max_k, seed_lo, seed_hi, drop_thresh, drop_scale,
    APPLY_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV contributions of the query blocks starting in [lo, hi), computed transposed ([keys, queries])."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_mask = rows < q_len
        row0 = q_start + start_m  # int64 (the loop index is 32-bit)
        q = tl.load(Q_head + row0 * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=row_mask[:, None] & (offs_d < head_dim)[None, :], other=0.0)
        do = tl.load(DO_head + row0 * stride_gm + offs_m[:, None] * stride_gm + offs_dv[None, :],
                     mask=row_mask[:, None] & (offs_dv < value_dim)[None, :], other=0.0)
        lse2 = tl.load(LSE_seq + rows, mask=row_mask, other=float("inf")) * _LOG2E
        delta = tl.load(DELTA_seq + rows, mask=row_mask, other=0.0)
        s_t = _mma(k, tl.trans(q), DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M], base 2
        if HAS_BIAS:
            b_mask = (cols < k_len)[:, None] & row_mask[None, :]
            s_t += _bias2(BIAS_seq + offs_n[:, None] * stride_bn + rows[None, :].to(tl.int64) * stride_bm, b_mask)
        if APPLY_MASK:  # causal: key j visible to query i iff j <= i + offset
            s_t = tl.where(cols[:, None] <= rows[None, :] + offset, s_t, float("-inf"))
        # rows without a visible key have lse = +inf: p = 0. p <= 1: the minimum drops a rounding overshoot,
        # ~1e31 where a finite mask near -1e38 hides every key of a row (lse = its max; log(sum) is lost)
        p_t = tl.exp2(tl.minimum(s_t - lse2[None, :], 0.0))
        dp_t = _mma(v, tl.trans(do), DOT_PRECISION)  # dP^T = V dO^T
        if DROPOUT:
            keep = _dropout_keep(drop_base + rows[None, :].to(tl.int64) * max_k, cols[:, None].to(tl.int64),
                                 seed_lo, seed_hi, drop_thresh)
            pd_t = tl.where(keep, p_t * drop_scale, 0.0)
            dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
        else:
            pd_t = p_t
        dv += _mma(pd_t.to(do.dtype), do, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _mma(ds_t.to(q.dtype), q, DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "drop_thresh"])
def _attn_bwd_dkdv_kernel(
    Q,  # [B, Hq, Lq, D]
    K,  # [B, Hk, Lk, D]
    V,  # [B, Hk, Lk, Dv]
    BIAS,  # [B, Hq, Lq, Lk] float32, any strides (read only if HAS_BIAS)
    DO,  # [B, Hq, Lq, Dv] grad_out
    LSE, DELTA,  # [B, Hq, Lq] float32, contiguous
    DK,  # [B, Hk, Lk, D]
    DV,  # [B, Hk, Lk, Dv]
    CU_Q, CU_K,  # [nseq + 1] int32 (read only if VARLEN)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_gb, stride_gh, stride_gm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    n_heads_q, n_heads_k, group,  # int: Hq, Hk, Hq // Hk
    seq_len_q,  # int: Lq, the length of the L axis of lse / delta
    max_q, max_k, head_dim, value_dim,
    qk_scale, scale,  # float: scale * log2(e), scale
    seed_lo, seed_hi, drop_thresh, drop_scale,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n, seq, kv_head = _program_ids(max_k, BLOCK_N, n_heads_k)
    batch, q_start, q_len, k_start, k_len = _sequence(CU_Q, CU_K, seq, max_q, max_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    offset = _causal_offset(q_len, k_len, CAUSAL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = n0 + offs_n
    col_mask = cols < k_len
    k_row0 = (k_start + n0).to(tl.int64)
    k = tl.load(K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh + k_row0 * stride_kn
                + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=col_mask[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    v = tl.load(V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh + k_row0 * stride_vn
                + offs_n[:, None] * stride_vn + offs_dv[None, :],
                mask=col_mask[:, None] & (offs_dv < value_dim)[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query blocks: [lo, full_start) cross the diagonal (masked), [full_start, q_len) see every key here.
    if CAUSAL != 0:
        lo = tl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M  # the block of the first row seeing key n0
        full_start = tl.maximum((tl.maximum(n0 + BLOCK_N - 1 - offset, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M, lo)
        mask_end = tl.minimum(full_start, q_len)
    else:
        lo = 0
        full_start = 0
        mask_end = 0

    q_start64 = q_start.to(tl.int64)
    for g in range(0, group):  # the query heads that share this key/value head
        head = kv_head * group + g
        Q_head = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        DO_head = DO + batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh
        row_base = (batch * n_heads_q + head).to(tl.int64) * seq_len_q + q_start
        LSE_seq = LSE + row_base
        DELTA_seq = DELTA + row_base
        BIAS_seq = BIAS
        if HAS_BIAS:  # never with VARLEN
            BIAS_seq = (BIAS + batch.to(tl.int64) * stride_bb + head.to(tl.int64) * stride_bh
                        + n0.to(tl.int64) * stride_bn)
        drop_base = (seq.to(tl.int64) * n_heads_q + head) * max_q * max_k
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, Q_head, DO_head, q_start64, LSE_seq, DELTA_seq, BIAS_seq,
            stride_qm, stride_gm, stride_bm, stride_bn,
            cols, offs_m, offs_n, offs_d, offs_dv, lo, mask_end, q_len, k_len, head_dim, value_dim, offset, qk_scale,
            drop_base, max_k, seed_lo, seed_hi, drop_thresh, drop_scale,
            True, HAS_BIAS, DROPOUT, BLOCK_M, DOT_PRECISION)
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, Q_head, DO_head, q_start64, LSE_seq, DELTA_seq, BIAS_seq,
            stride_qm, stride_gm, stride_bm, stride_bn,
            cols, offs_m, offs_n, offs_d, offs_dv, full_start, q_len,
            q_len, k_len, head_dim, value_dim, offset, qk_scale,
            drop_base, max_k, seed_lo, seed_hi, drop_thresh, drop_scale,
            False, HAS_BIAS, DROPOUT, BLOCK_M, DOT_PRECISION)

    dk = dk * scale
    tl.store(DK + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh + k_row0 * stride_dkn
             + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_mask[:, None] & (offs_d < head_dim)[None, :])
    tl.store(DV + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh + k_row0 * stride_dvn
             + offs_n[:, None] * stride_dvn + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=col_mask[:, None] & (offs_dv < value_dim)[None, :])


@triton.jit
def _dq_tiles(
    dq,  # [BLOCK_M, BLOCK_D] fp32 accumulator
    q, do,  # [BLOCK_M, BLOCK_D], [BLOCK_M, BLOCK_DV] tiles of this query block
    lse2, delta,  # [BLOCK_M] fp32: lse * log2(e) (+inf for dead or missing rows), rowsum(dO * O)
    K_head, V_head, k_start, BIAS_blk, stride_kn, stride_vn, stride_bm, stride_bn,
    rows, offs_m, offs_n, offs_d, offs_dv,
    lo, hi, q_len, k_len, head_dim, value_dim, offset, qk_scale,
    drop_rows, seed_lo, seed_hi, drop_thresh, drop_scale,
    APPLY_MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ contributions of the key blocks starting in [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_mask = (cols < k_len)[:, None]
        key0 = k_start + start_n  # int64 (the loop index is 32-bit)
        k = tl.load(K_head + key0 * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=k_mask & (offs_d < head_dim)[None, :], other=0.0)
        v = tl.load(V_head + key0 * stride_vn + offs_n[:, None] * stride_vn + offs_dv[None, :],
                    mask=k_mask & (offs_dv < value_dim)[None, :], other=0.0)
        s = _scores(q, k, BIAS_blk, stride_bm, stride_bn, rows, offs_m, cols, q_len, k_len, offset, qk_scale,
                    APPLY_MASK, CAUSAL, HAS_BIAS, DOT_PRECISION)  # [BLOCK_M, BLOCK_N], base 2
        p = tl.exp2(tl.minimum(s - lse2[:, None], 0.0))  # p <= 1 (as in the dK/dV kernel)
        dp = _mma(do, tl.trans(v), DOT_PRECISION)  # dP = dO V^T
        if DROPOUT:
            keep = _dropout_keep(drop_rows[:, None], cols[None, :].to(tl.int64), seed_lo, seed_hi, drop_thresh)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "drop_thresh"])
def _attn_bwd_dq_kernel(
    Q,  # [B, Hq, Lq, D]
    K,  # [B, Hk, Lk, D]
    V,  # [B, Hk, Lk, Dv]
    BIAS,  # [B, Hq, Lq, Lk] float32, any strides (read only if HAS_BIAS)
    DO,  # [B, Hq, Lq, Dv] grad_out
    LSE, DELTA,  # [B, Hq, Lq] float32, contiguous
    DQ,  # [B, Hq, Lq, D]
    CU_Q, CU_K,  # [nseq + 1] int32 (read only if VARLEN)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_gb, stride_gh, stride_gm,
    stride_dqb, stride_dqh, stride_dqm,
    n_heads, group,  # int: Hq, Hq // Hk
    seq_len_q,  # int: Lq, the length of the L axis of lse / delta
    max_q, max_k, head_dim, value_dim,
    qk_scale, scale,  # float: scale * log2(e), scale
    seed_lo, seed_hi, drop_thresh, drop_scale,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, seq, head = _program_ids(max_q, BLOCK_M, n_heads)
    batch, q_start, q_len, k_start, k_len = _sequence(CU_Q, CU_K, seq, max_q, max_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    kv_head = head // group
    offset = _causal_offset(q_len, k_len, CAUSAL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = m0 + offs_m
    row_mask = rows < q_len
    q_row0 = (q_start + m0).to(tl.int64)
    q_mask = row_mask[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + q_row0 * stride_qm
                + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh + q_row0 * stride_gm
                 + offs_m[:, None] * stride_gm + offs_dv[None, :],
                 mask=row_mask[:, None] & (offs_dv < value_dim)[None, :], other=0.0)
    row_base = (batch * n_heads + head).to(tl.int64) * seq_len_q + q_row0
    lse2 = tl.load(LSE + row_base + offs_m, mask=row_mask, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + row_base + offs_m, mask=row_mask, other=0.0)
    K_head = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    V_head = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    BIAS_blk = BIAS
    if HAS_BIAS:  # never with VARLEN, so q_start == 0
        BIAS_blk = BIAS + batch.to(tl.int64) * stride_bb + head.to(tl.int64) * stride_bh + m0.to(tl.int64) * stride_bm
    drop_rows = ((seq.to(tl.int64) * n_heads + head) * max_q + rows) * max_k

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = _key_range(m0, q_len, k_len, offset, BLOCK_M, BLOCK_N, CAUSAL)
    k_start64 = k_start.to(tl.int64)
    # key blocks visible to every row of the block, unmasked; then those the diagonal or the key end crosses
    dq = _dq_tiles(dq, q, do, lse2, delta, K_head, V_head, k_start64, BIAS_blk,
                   stride_kn, stride_vn, stride_bm, stride_bn, rows, offs_m, offs_n, offs_d, offs_dv,
                   0, full_end, q_len, k_len, head_dim, value_dim, offset, qk_scale,
                   drop_rows, seed_lo, seed_hi, drop_thresh, drop_scale,
                   False, CAUSAL, HAS_BIAS, DROPOUT, BLOCK_N, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, K_head, V_head, k_start64, BIAS_blk,
                   stride_kn, stride_vn, stride_bm, stride_bn, rows, offs_m, offs_n, offs_d, offs_dv,
                   full_end, hi, q_len, k_len, head_dim, value_dim, offset, qk_scale,
                   drop_rows, seed_lo, seed_hi, drop_thresh, drop_scale,
                   True, CAUSAL, HAS_BIAS, DROPOUT, BLOCK_N, DOT_PRECISION)
    dq = dq * scale
    tl.store(DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh + q_row0 * stride_dqm
             + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# ---- launchers --------------------------------------------------------------------------------
def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# (BLOCK_M query rows, BLOCK_N key rows, num_warps, num_stages) of each kernel, by input width and the
# padded head dim. Chosen so that none spills registers when compiled for sm_80 and sm_90 and shared
# memory fits an A100 (`bignlp-fast triton-compile`, tests/test_triton_compile.py); not timed on a GPU.
# GPUs with 99 KiB of shared memory per block (sm_86, sm_89) run the forward in at most 2 stages: at 3
# the 16-bit forward with a mask at head dim 128 needs 128 KiB.
_CONFIGS = {  # (fp32?, max BLOCK_D): (forward, dK/dV, dQ)
    (False, 64): ((128, 64, 8, 3), (32, 128, 8, 3), (128, 64, 8, 2)),
    (False, 128): ((128, 64, 8, 3), (32, 64, 8, 1), (128, 32, 8, 2)),
    (False, 256): ((64, 32, 8, 2), (32, 32, 8, 1), (32, 32, 8, 1)),
    (True, 64): ((64, 32, 8, 2), (16, 64, 8, 1), (64, 32, 8, 1)),  # fp32 dots run on FMA units ("ieee")
    (True, 128): ((32, 64, 8, 1), (16, 64, 8, 1), (32, 32, 8, 1)),
    (True, 256): ((16, 32, 8, 1), (16, 32, 8, 1), (32, 16, 8, 1)),
}
_FULL_STAGES_SHARED_MEMORY = 160 * 1024  # A100's 163 KiB and H100's 227 KiB take _CONFIGS as they are
_INTERPRETER_CONFIG = (16, 16, 1, 1)  # small tiles, so that the CPU tests cross several of them


def _configs(q, block_d: int):
    """(forward, dK/dV, dQ) launch configs for q's device and dtype and a padded head dim."""
    if q.device.type != "cuda":
        return (_INTERPRETER_CONFIG,) * 3
    bucket = 64 if block_d <= 64 else 128 if block_d <= 128 else 256
    fwd, dkdv, dq = _CONFIGS[(q.dtype == torch.float32, bucket)]
    if _shared_memory_per_block(q.device) < _FULL_STAGES_SHARED_MEMORY:
        fwd = (*fwd[:3], min(fwd[3], 2))
    return fwd, dkdv, dq


def _dropout_args(dropout_p: float, seed):
    """(seed_lo, seed_hi, threshold, 1 / (1 - p)) for the kernels; zeros without dropout."""
    if dropout_p <= 0.0:
        return 0, 0, 0, 1.0
    s = int(seed)
    return s & 0xFFFFFFFF, (s >> 32) & 0xFFFFFFFF, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _bias_strides(bias):
    return tuple(bias.stride()) if bias is not None else (0, 0, 0, 0)


def _check_last_dim(**tensors):
    for name, t in tensors.items():
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"triton attention: {name} must have stride 1 in its last dimension, "
                             f"got strides {tuple(t.stride())}")


def _launch_sizes(q, k, bias, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """(nseq, max_q, max_k): the sequences and their length bounds (the L axes when batched)."""
    if cu_seqlens_q is not None:
        if bias is not None:
            raise ValueError("triton attention: bias cannot be combined with cu_seqlens (packed sequences)")
        return cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k
    return q.shape[0], q.shape[2], k.shape[2]


def attention_fwd_triton(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                         dropout_p, seed):
    """q [B, Hq, Lq, D], k [B, Hk, Lk, D], v [B, Hk, Lk, Dv] -> (out [B, Hq, Lq, Dv], lse [B, Hq, Lq] fp32)."""
    _check_last_dim(q=q, k=k, v=v)
    B, Hq, Lq, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    out = q.new_empty(B, Lq, Hq, Dv).transpose(1, 2)  # [B, Hq, Lq, Dv] view of [B, Lq, Hq, Dv]
    lse = torch.empty(B, Hq, Lq, device=q.device, dtype=torch.float32)
    nseq, max_q, max_k = _launch_sizes(q, k, bias, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    block_d, block_dv = _block_d(D), _block_d(Dv)
    block_m, block_n, num_warps, num_stages = _configs(q, max(block_d, block_dv))[0]
    grid = (triton.cdiv(max_q, block_m) * nseq * Hq,)  # flat: see _program_ids
    if grid[0] == 0:
        return out, lse
    seed_lo, seed_hi, thresh, drop_scale = _dropout_args(dropout_p, seed)
    varlen = cu_seqlens_q is not None
    _attn_fwd_kernel[grid](
        q, k, v, bias if bias is not None else q, out, lse,
        cu_seqlens_q if varlen else q, cu_seqlens_k if varlen else q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *_bias_strides(bias), *out.stride()[:3], *lse.stride()[:2],
        Hq, Hq // Hk, max_q, max_k, D, Dv, float(scale) * _LOG2E.value,
        seed_lo, seed_hi, thresh, drop_scale,
        CAUSAL=int(causal), HAS_BIAS=bias is not None, VARLEN=varlen, DROPOUT=dropout_p > 0.0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        DOT_PRECISION=_dot_precision(q),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def attention_bwd_triton(grad_out, q, k, v, out, lse, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         scale, causal, dropout_p, seed):
    """Gradients (dq, dk, dv), shaped and strided like (q, k, v), of the forward's out for grad_out."""
    _check_last_dim(grad_out=grad_out, q=q, k=k, v=v, out=out)
    B, Hq, Lq, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    nseq, max_q, max_k = _launch_sizes(q, k, bias, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    block_d, block_dv = _block_d(D), _block_d(Dv)
    lse = lse.contiguous()
    seed_lo, seed_hi, thresh, drop_scale = _dropout_args(dropout_p, seed)
    varlen = cu_seqlens_q is not None
    common = dict(CAUSAL=int(causal), HAS_BIAS=bias is not None, VARLEN=varlen, DROPOUT=dropout_p > 0.0,
                  BLOCK_D=block_d, BLOCK_DV=block_dv, DOT_PRECISION=_dot_precision(q))
    bias_arg = bias if bias is not None else q
    cu_q, cu_k = (cu_seqlens_q, cu_seqlens_k) if varlen else (q, q)
    _, dkdv_config, dq_config = _configs(q, max(block_d, block_dv))

    # 1. delta = rowsum(dO * O) over every row of the L axis
    delta = torch.empty(B, Hq, Lq, device=q.device, dtype=torch.float32)
    if B * Hq * Lq > 0:
        rows_per_program = 16 if q.device.type != "cuda" else 64
        _attn_bwd_delta_kernel[(triton.cdiv(Lq, rows_per_program) * B * Hq,)](
            out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], Hq, Lq, Dv,
            BLOCK_M=rows_per_program, BLOCK_DV=block_dv)

    # 2. dK, dV: one program per key block of each sequence and key/value head
    if max_k > 0 and nseq * Hk > 0:
        block_m, block_n, num_warps, num_stages = dkdv_config
        _attn_bwd_dkdv_kernel[(triton.cdiv(max_k, block_n) * nseq * Hk,)](
            q, k, v, bias_arg, grad_out, lse, delta, dk, dv, cu_q, cu_k,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *_bias_strides(bias), *grad_out.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3],
            Hq, Hk, Hq // Hk, Lq, max_q, max_k, D, Dv, float(scale) * _LOG2E.value, float(scale),
            seed_lo, seed_hi, thresh, drop_scale,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common)

    # 3. dQ: one program per query block of each sequence and query head
    if max_q > 0 and nseq * Hq > 0:
        block_m, block_n, num_warps, num_stages = dq_config
        _attn_bwd_dq_kernel[(triton.cdiv(max_q, block_m) * nseq * Hq,)](
            q, k, v, bias_arg, grad_out, lse, delta, dq, cu_q, cu_k,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *_bias_strides(bias), *grad_out.stride()[:3],
            *dq.stride()[:3],
            Hq, Hq // Hk, Lq, max_q, max_k, D, Dv, float(scale) * _LOG2E.value, float(scale),
            seed_lo, seed_hi, thresh, drop_scale,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common)
    return dq, dk, dv
