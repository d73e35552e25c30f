"""Scaled dot-product attention, fused: ``scaled_dot_product_attention`` (a drop-in for
torch.nn.functional's, layout [B, H, L, D]) and ``varlen_attention`` (packed sequences of different
lengths, [total_tokens, H, D] with int32 cumulative offsets).

Both run on one pair of custom ops, ``bignlp_fast::attention_fwd/bwd``, whose kernels are
flash-style: tiled over queries and keys with an online softmax, saving only the logsumexp of each
query row so that the backward recomputes the scores. Memory grows with B*H*L*D, never with L^2.

The kernel contract (every backend: csrc/cpu/attention.cpp, csrc/cuda/attention.cu, kernels/attention.py, and the reference
``attention_{fwd,bwd}_torch`` below, which is the specification):

- q [B, Hq, Lq, D], k [B, Hk, Lk, D], v [B, Hk, Lk, Dv]; any strides with stride(-1) == 1; Hk
  divides Hq (grouped-query attention: query head h reads key/value head h // (Hq // Hk)).
- bias: None, or a float32 view broadcast to [B, Hq, Lq, Lk] (strides may be 0, so a key-padding
  mask [B, 1, 1, Lk] costs B*Lk memory), added to the scaled scores; -inf masks a score. The CPU
  kernels also take a bool view (True = attend), read in place as the bias where(mask, 0, -inf):
  the cpu backend and its eager lane hand them bool masks as they are.
- cu_seqlens_q / cu_seqlens_k: None, or int32 [nseq + 1] on q's device. Then B == 1, the L axis
  holds packed tokens, and sequence s is rows cu[s]:cu[s + 1] (at most max_seqlen_* of them).
- causal: 0 none; 1 top-left (query i sees keys j <= i, as torch's is_causal); 2 bottom-right
  (j <= i + Lk_s - Lq_s, the alignment a KV cache needs).
- dropout on the normalised probabilities, with the keep mask of :func:`dropout_keep` (counter-based
  Philox, so the backward regenerates the mask and every backend draws the same one).
- returns out, allocated as [B, Lq, Hq, Dv] and returned as its [B, Hq, Lq, Dv] transpose (so
  ``out.transpose(1, 2).reshape(B, Lq, Hq * Dv)`` is free), and lse [B, Hq, Lq] float32: the natural
  logsumexp of each row's scaled scores, +inf for a row with every key masked; such a row's output
  (and every gradient through it) is zero.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch import Tensor

from bignlp_fast import _backend
from bignlp_fast.ops._common import (PLAIN_TENSORS, acc_dtype, autocast_lower, call, check_choice, check_like,
                                     check_tensor, cpu_lane_open, custom_op, grads_or_zeros, integer, kernel,
                                     no_zero_grads, real_number, register_autograd, values_readable, version_counter)

OP = _backend.register_op(
    "attention",
    dtypes={"cpu": (torch.float32, torch.bfloat16),
            "cuda": (torch.float16, torch.bfloat16),
            "triton": (torch.float32, torch.float16, torch.bfloat16)},
    # csrc/cuda/attention.cu was compile-checked but not yet run on a GPU: on CUDA tensors the automatic
    # choice stays triton (measured) and backend="cuda" runs the CUDA kernel. Put "cuda" first once the
    # CUDA tests have passed on a GPU and the benchmark says it is the faster one.
    auto_order={"cuda": ("triton", "cuda")},
)

CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = 0, 1, 2
CPU_MAX_HEAD_DIM = 512
CUDA_MAX_HEAD_DIM = 256
TRITON_MAX_HEAD_DIM = 256


# ---- dropout: a counter-based random mask, the same on every backend ---------------------------
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def philox4x32(c0: Tensor, c1: Tensor, k0: int, k1: int, rounds: int = 10):
    """Philox-4x32 (Salmon et al., 2011) of counters (c0, c1, 0, 0) under key (k0, k1).

    c0, c1: int64 tensors holding uint32 values. Returns the four uint32 output words as int64
    tensors. int64 products of two uint32 values wrap modulo 2**64, which keeps their low 64 bits
    exact: the high and low words below are the true ones.
    """
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        p0, p1 = c0 * _PHILOX_M0, c2 * _PHILOX_M1
        c0, c1, c2, c3 = ((p1 >> 32) & _U32) ^ c1 ^ k0, p1 & _U32, ((p0 >> 32) & _U32) ^ c3 ^ k1, p0 & _U32
        k0, k1 = (k0 + _PHILOX_W0) & _U32, (k1 + _PHILOX_W1) & _U32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """A uniform uint32 word below this drops its element: P(drop) = threshold / 2**32 = p."""
    return min(int(p * 2.0 ** 32), _U32)


def dropout_keep(seed: int, index: Tensor, p: float) -> Tensor:
    """The keep mask of attention dropout for the elements numbered ``index`` (int64).

    Element n draws word n % 4 of Philox-4x32-10 at counter n // 4 under key ``seed`` (its low and
    high 32 bits), and is kept when that word is at least :func:`dropout_threshold`. Element
    numbers: ((b * Hq + h) * Lq + i) * Lk + j, with (for varlen) b the sequence, i and j positions
    within it and Lq, Lk the max_seqlen arguments.
    """
    n = index >> 2
    words = torch.stack(philox4x32(n & _U32, n >> 32, seed & _U32, (seed >> 32) & _U32), -1)
    word = words.gather(-1, (index & 3).unsqueeze(-1)).squeeze(-1)
    return word >= dropout_threshold(p)


def new_dropout_seed() -> Tensor:
    """A seed drawn from torch's default CPU generator, so torch.manual_seed makes dropout repeat."""
    return torch.randint(0, 2 ** 62, (), dtype=torch.int64)


# ---- reference backend ------------------------------------------------------------------------
def _causal_keep(lq: int, lk: int, causal: int, device) -> Tensor:
    """[lq, lk] bool: which keys each query may see under the causal mode."""
    offset = 0 if causal == CAUSAL_TOP_LEFT else lk - lq
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + offset


def _sequences(q: Tensor, k: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor]):
    """(index, q rows, k rows) of each sequence: the whole L axis per batch, or the varlen ranges."""
    if cu_q is None:
        return [(None, slice(None), slice(None))]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(s, slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])) for s in range(len(cq) - 1)]


def _keep_scale(seq: Optional[int], shape, max_q: int, max_k: int, dropout_p: float, seed: Optional[Tensor],
                device, dtype) -> Optional[Tensor]:
    """[B, Hq, lq, lk]: 0 for dropped elements, 1 / (1 - p) for kept ones; None without dropout."""
    if dropout_p == 0.0:
        return None
    b, h, lq, lk = shape
    bs = torch.arange(b if seq is None else 1, device=device) + (0 if seq is None else seq)
    index = (((bs[:, None, None, None] * h + torch.arange(h, device=device)[None, :, None, None]) * max_q
              + torch.arange(lq, device=device)[None, None, :, None]) * max_k
             + torch.arange(lk, device=device)[None, None, None, :])
    keep = dropout_keep(int(seed), index, dropout_p)
    return keep.to(dtype) / (1.0 - dropout_p)


def _probabilities(q, k, bias, causal, scale):
    """Softmax probabilities [B, Hq, lq, lk] (fully masked rows: zeros) and lse [B, Hq, lq] (+inf there).
    Differentiable, in q's dtype (the caller passes float32 or float64)."""
    groups = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(groups, 1).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if causal != CAUSAL_NONE:
        s = s.masked_fill(~_causal_keep(s.shape[-2], s.shape[-1], causal, s.device), -math.inf)
    m = s.amax(-1, keepdim=True).detach()
    m = m.masked_fill(m == -math.inf, 0.0)
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    p = e / total.masked_fill(total == 0, 1.0)
    lse = (m + torch.log(total)).squeeze(-1)
    return p, lse.masked_fill(lse == -math.inf, math.inf)


def attention_math(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], causal: int, scale: float,
                   keep_scale: Optional[Tensor] = None):
    """Plain differentiable attention on [B, H, L, D] tensors: (out, lse). The reference's core."""
    p, lse = _probabilities(q, k, bias, causal, scale)
    pd = p * keep_scale if keep_scale is not None else p
    return pd @ v.repeat_interleave(q.shape[1] // v.shape[1], 1), lse


def _new_out(q: Tensor, dv: int) -> Tensor:
    b, hq, lq, _ = q.shape
    return q.new_empty(b, lq, hq, dv).transpose(1, 2)


def attention_fwd_torch(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                        dropout_p, seed):
    acc = acc_dtype(q.dtype)
    out = _new_out(q, v.shape[-1])
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    for seq, rq, rk in _sequences(q, k, cu_seqlens_q, cu_seqlens_k):
        qs, ks, vs = q[:, :, rq].to(acc), k[:, :, rk].to(acc), v[:, :, rk].to(acc)
        if ks.shape[2] == 0:  # a varlen sequence without keys: every row fully masked
            out[:, :, rq], lse[:, :, rq] = 0, math.inf
            continue
        b_ = bias[:, :, rq, rk].to(acc) if bias is not None else None
        keep = _keep_scale(seq, (qs.shape[0], qs.shape[1], qs.shape[2], ks.shape[2]), max_seqlen_q, max_seqlen_k,
                           dropout_p, seed, q.device, acc)
        o, l_ = attention_math(qs, ks, vs, b_, causal, scale, keep)
        out[:, :, rq] = o.to(q.dtype)
        lse[:, :, rq] = l_.float()
    return out, lse


def attention_bwd_torch(grad_out, q, k, v, out, lse, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        scale, causal, dropout_p, seed):
    """The flash backward written plainly: recompute P from lse, then
    dV = (P*Z)^T dO, dP = (dO V^T) * Z, dS = P * (dP - rowsum(dO * O)), dQ = dS K s, dK = dS^T Q s."""
    acc = acc_dtype(q.dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    groups = q.shape[1] // k.shape[1]
    for seq, rq, rk in _sequences(q, k, cu_seqlens_q, cu_seqlens_k):
        qs, ks, vs = q[:, :, rq].to(acc), k[:, :, rk].to(acc), v[:, :, rk].to(acc)
        if ks.shape[2] == 0:
            dq[:, :, rq] = 0
            continue
        go, o = grad_out[:, :, rq].to(acc), out[:, :, rq].to(acc)
        b_ = bias[:, :, rq, rk].to(acc) if bias is not None else None
        keep = _keep_scale(seq, (qs.shape[0], qs.shape[1], qs.shape[2], ks.shape[2]), max_seqlen_q, max_seqlen_k,
                           dropout_p, seed, q.device, acc)
        p, _ = _probabilities(qs, ks, b_, causal, scale)
        ke, ve = ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1)
        pd = p * keep if keep is not None else p
        dp = go @ ve.transpose(-1, -2)
        if keep is not None:
            dp = dp * keep
        ds = p * (dp - (go * o).sum(-1, keepdim=True))
        dq[:, :, rq] = (ds @ ke * scale).to(q.dtype)
        dk_all = ds.transpose(-1, -2) @ qs * scale
        dv_all = pd.transpose(-1, -2) @ go
        b, hk = ks.shape[:2]
        dk[:, :, rk] = dk_all.view(b, hk, groups, *dk_all.shape[2:]).sum(2).to(k.dtype)
        dv[:, :, rk] = dv_all.view(b, hk, groups, *dv_all.shape[2:]).sum(2).to(v.dtype)
    return dq, dk, dv


# ---- custom ops -------------------------------------------------------------------------------
@custom_op("attention_fwd")
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                  cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: int,
                  dropout_p: float, seed: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    run = kernel("attention", "fwd", backend)
    return tuple(run(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                     dropout_p, seed))


@attention_fwd.register_fake
def _(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, dropout_p, seed,
      backend):
    return _new_out(q, v.shape[-1]), q.new_empty(q.shape[:3], dtype=torch.float32)


@custom_op("attention_bwd")
def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  bias: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                  max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: int, dropout_p: float,
                  seed: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    run = kernel("attention", "bwd", backend)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    return tuple(run(grad_out, q, k, v, out, lse, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     scale, causal, dropout_p, seed))


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
      dropout_p, seed, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, causal, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, cu_q, cu_k, seed)
    ctx.args = (max_q, max_k, scale, causal, dropout_p, backend)
    no_zero_grads(ctx, output, 1)


def _backward(ctx, grad_out, _grad_lse):
    (grad_out,) = grads_or_zeros(ctx, grad_out)
    q, k, v, out, lse, bias, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, scale, causal, dropout_p, backend = ctx.args
    dq, dk, dv = call(attention_bwd, grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, causal,
                               dropout_p, seed, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


register_autograd(attention_fwd, _backward, _setup_context)


# ---- public ops -------------------------------------------------------------------------------
def _supports(head_dim: int, value_dim: int, needs_bias_grad: bool):
    """Why a backend cannot take this call (beyond device and dtype), or None."""
    def check(backend: str) -> Optional[str]:
        if backend == "torch":
            return None
        if needs_bias_grad:
            return "attn_mask requires grad; only the torch reference computes its gradient"
        limit = {"cpu": CPU_MAX_HEAD_DIM, "cuda": CUDA_MAX_HEAD_DIM, "triton": TRITON_MAX_HEAD_DIM}.get(backend)
        if limit is not None and max(head_dim, value_dim) > limit:
            return f"head_dim {max(head_dim, value_dim)} is above the {backend} backend's limit of {limit}"
        if backend == "triton":
            from bignlp_fast.kernels.attention import attention_triton_supports
            return attention_triton_supports(head_dim, value_dim)
        return None
    return check


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_dropout(op: str, dropout_p, upper: str = ")") -> float:
    """dropout_p in [0, 1) or, with upper="]", [0, 1] (torch's SDPA takes 1: every weight dropped)."""
    p = real_number(dropout_p)
    if p is None or not (0.0 <= p < 1.0 or (upper == "]" and p == 1.0)):
        raise ValueError(f"{op}: dropout_p must be a number in [0, 1{upper}, got {dropout_p!r}")
    return p


def _check_scale(op: str, scale, query: Tensor) -> float:
    head_dim = query.shape[-1]
    if head_dim == 0:  # torch's softmax(0 * inf) is the mean of the values; here a clear error
        raise ValueError(f"{op}: head_dim must be at least 1, got query {tuple(query.shape)}")
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    value = real_number(scale)
    # (torch.compile(dynamic=True) traces a float attribute as a symbol, which math.isfinite cannot take
    # without breaking the graph: there the value goes unchecked)
    if value is None or (not torch.compiler.is_compiling() and not math.isfinite(value)):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    return value


def _mask_to_bias(op: str, attn_mask: Tensor, query: Tensor, shape, keep_bool: bool = False) -> Tensor:
    """attn_mask (bool, True = attend; or additive float) as a float32 bias viewed as ``shape``
    (float64 for float64 queries, which only the reference runs). ``keep_bool``: a bool mask stays bool
    (the CPU kernels read it in place as the bias where(mask, 0, -inf), without that float copy)."""
    check_tensor(op, "attn_mask", attn_mask, floating=False)
    if attn_mask.device != query.device:
        raise ValueError(f"{op}: attn_mask is on {attn_mask.device} but query is on {query.device}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"{op}: attn_mask must be bool (True = attend) or floating point (added to the scores), "
                        f"got {attn_mask.dtype}")
    if attn_mask.dim() > 4:
        raise ValueError(f"{op}: attn_mask has {attn_mask.dim()} dimensions; at most 4 ([B, Hq, Lq, Lk])")
    # (a plain comparison: torch.broadcast_shapes costs tens of microseconds, a decoding step's budget)
    if any(m != 1 and m != n for m, n in zip(reversed(attn_mask.shape), reversed(shape))):
        raise ValueError(f"{op}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"[B, Hq, Lq, Lk] = {list(shape)}")
    dtype = acc_dtype(query.dtype)
    if attn_mask.dtype == torch.bool and keep_bool:
        bias = attn_mask
    elif attn_mask.dtype == torch.bool:
        bias = torch.where(attn_mask, 0.0, -math.inf).to(dtype)  # one pass (to() is free for float32)
    else:
        bias = attn_mask.to(dtype)
    return bias.expand(shape)


def _float16_on_cpu(q: Tensor, backend: Optional[str]) -> bool:
    """float16 CPU tensors, for the automatic or the cpu backend: the CPU kernels compute them in float32
    (converted in and out: O(L D) next to attention's O(L^2 D); torch's CPU kernels also compute
    float16 in float32), instead of the reference falling back at ~9x torch's time."""
    return q.dtype == torch.float16 and q.device.type == "cpu" and _backend.requested_backend(backend) in (None, "cpu")


def _broadcast_4d(op: str, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                  enable_gqa: bool):
    """torch's broadcasting of SDPA's arguments, for the calls that are not [B, H, L, D] with one B:
    any number (>= 2) of dimensions, [..., H, L, D] with the leading ones broadcast between query, key
    and value as matmul broadcasts them (a key/value batch of 1 against a larger one), and key/value
    with one head against many query heads. Returns (q, k, v, mask) as [B, H, L, D] (expanded leading
    dimensions are stride-0 views where one dimension holds them, copies otherwise), the mask's
    leading dimensions broadcast the same way, and the output's shape."""
    ndim = max(query.dim(), key.dim(), value.dim())
    q, k, v = (t[(None,) * (max(ndim, 4) - t.dim())] for t in (query, key, value))
    (hq, lq, d), (hk, lk, _), (hv, lv, dv) = q.shape[-3:], k.shape[-3:], v.shape[-3:]
    if (hv, lv) != (hk, lk):
        raise ValueError(f"{op}: value has shape {tuple(value.shape)}; its heads and length must equal key's "
                         f"{tuple(key.shape[-3:-1])}")
    try:
        batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError:
        raise ValueError(f"{op}: the leading dimensions of query {tuple(query.shape)}, key {tuple(key.shape)} and "
                         f"value {tuple(value.shape)} do not broadcast") from None
    if hq == 1 and hk > 1:  # one query head against many key/value heads: the query broadcast over them
        hq = hk
    n = math.prod(batch)  # not -1: a reshape of zero elements cannot infer it
    q = q.expand(*batch, hq, lq, d).reshape(n, hq, lq, d)
    k = k.expand(*batch, hk, lk, d).reshape(n, hk, lk, d)
    v = v.expand(*batch, hk, lk, dv).reshape(n, hk, lk, dv)
    mask = attn_mask
    if mask is not None and mask.dim() >= 2:
        rank = len(batch) + 3
        if mask.dim() > rank:
            raise ValueError(f"{op}: attn_mask has {mask.dim()} dimensions; the output has {rank}")
        mask = mask[(None,) * (rank - mask.dim())]
        try:
            mask = mask.expand(*batch, *mask.shape[-3:]).reshape(n, *mask.shape[-3:])
        except RuntimeError:
            raise ValueError(f"{op}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"{(*batch, hq, lq, lk)}") from None
    return q, k, v, mask, (*batch, hq, lq, dv)[-ndim:]


def _lane(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p, is_causal, scale,
          enable_gqa, backend: Optional[str]) -> Optional[Tensor]:
    """scaled_dot_product_attention's eager lane: the CPU kernel's output for a plain inference call,
    with the tensors as they are; None where the call takes the general path.

    Python checks what only it can see (no backend named, no dropout, plain tensor types rather than
    subclasses, a float or None for the scale (an int, even 10**400, takes the general path), Python
    bools for the flags, nothing recording or transforming calls, no autocast, the cpu backend chosen);
    the extension's ``attention_lane_cpu`` checks the tensors ([B, H, L, D] CPU tensors of one dtype,
    float32 / bfloat16, stride(-1) == 1, no gradient to record, as many key as query heads or, with
    enable_gqa, key heads that divide them, at least one key, head dims up to CPU_MAX_HEAD_DIM, a
    finite scale; a mask bool or float32, at most 4-d, broadcasting to [B, Hq, Lq, Lk]) and runs the
    kernel, or returns nothing. Where the lane runs, the general path would pass every check, choose
    the cpu backend (no fallback to record) and run the same kernel directly (call()'s route 0) on
    these very tensors, a bool mask as the float bias torch.where(mask, 0, -inf) that the kernel reads
    it as. Decided in ~1 us where the general path spends ~10 before the kernel (a decoding step's
    attention: the kernel 7-13 us at 33-96 keys, torch's SDPA 10-14 in all), and a padded batch's mask
    read in place instead of converted at each call."""
    if (backend is not None or torch.compiler.is_compiling()
            or type(query) not in PLAIN_TENSORS or type(key) not in PLAIN_TENSORS or type(value) not in PLAIN_TENSORS
            or (attn_mask is not None and type(attn_mask) not in PLAIN_TENSORS)
            or type(dropout_p) not in (float, int) or dropout_p != 0 or type(is_causal) is not bool
            or type(enable_gqa) is not bool or (scale is not None and type(scale) is not float)
            or not cpu_lane_open()):
        return None
    out = kernel("attention", "lane", "cpu")(query, key, value, attn_mask, scale, is_causal, enable_gqa,
                                             CPU_MAX_HEAD_DIM)
    return out[0] if out else None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, backend: Optional[str] = None) -> Tensor:
    """softmax(query @ key^T * scale + mask) @ value, fused; torch.nn.functional's signature and layout.

    Args:
        query: [B, Hq, Lq, D]; key: [B, Hk, Lk, D]; value: [B, Hk, Lk, Dv]. float32 / bfloat16 on the
            CPU (float16 there runs the float32 kernel on converted tensors); float16 / bfloat16 /
            float32 on CUDA. As in torch, any other number of leading
            dimensions ([..., H, L, D], at least [L, D]) broadcasts between the three, and key/value
            with one head serve every query head.
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to
            [B, Hq, Lq, Lk]. A key-padding mask [B, 1, 1, Lk] is never expanded in memory.
        dropout_p: probability of dropping an attention weight (applied whenever > 0, as torch does);
            the mask is drawn from torch's CPU generator, so torch.manual_seed makes it repeat. 1.0
            drops every weight: zeros out, zero gradients.
        is_causal: query i attends to keys j <= i (top-left aligned, as torch). May be combined
            with attn_mask (torch refuses the combination; here both apply).
        scale: defaults to 1 / sqrt(D).
        enable_gqa: allow Hk < Hq when Hk divides Hq (grouped-query attention).
        backend: "cpu", "cuda", "triton", "torch" or None for automatic. On CUDA tensors the automatic
            choice is triton; "cuda" (tensor cores, float16 / bfloat16, head dims up to 256) is chosen
            by name only until it has been measured on a GPU.

    Differs from torch in one documented way: a query row whose keys are all masked gives zeros (and
    zero gradients), not NaN. A float attn_mask that requires grad gets its gradient through the
    torch reference (a recorded fallback).
    """
    lane = _lane(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend)
    if lane is not None:
        return lane
    op = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(op, name, t)
        if t.is_nested:
            raise TypeError(f"{op}: {name} is a nested tensor, which this op does not take; pack the sequences "
                            "into [total_tokens, H, D] with their offsets and call varlen_attention")
        if t.dim() < 2:
            raise ValueError(f"{op}: {name} must be [B, H, L, D] (or any [..., L, D]), got shape {tuple(t.shape)}")
    query, key, value = autocast_lower(query.device, query, key, value)
    check_like(op, "key", key, "query", query, same_shape=False)
    check_like(op, "value", value, "query", query, same_shape=False)
    if (query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or key.shape[0] != query.shape[0]
            or value.shape[0] != query.shape[0] or key.shape[1] != query.shape[1]
            and (query.shape[1] == 1 or key.shape[1] == 1 and not enable_gqa)):
        q, k, v, mask, shape = _broadcast_4d(op, query, key, value, attn_mask, enable_gqa)
        gqa = enable_gqa or k.shape[1] == 1  # one key/value head serves them all, as torch broadcasts it
        return scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, scale, gqa,
                                            backend=backend).reshape(shape)
    if _float16_on_cpu(query, backend):
        with torch.autocast("cpu", enabled=False):  # else fp16 autocast lowers the fp32 copies again, forever
            return scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask, dropout_p,
                                                is_causal, scale, enable_gqa, backend=backend).half()
    b, hq, lq, d = query.shape
    _, hk, lk, _ = key.shape
    if key.shape[-1] != d:
        raise ValueError(f"{op}: key has head_dim {key.shape[-1]} but query has {d}")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"{op}: value has shape {tuple(value.shape)}; its [B, Hk, Lk] must equal key's "
                         f"{tuple(key.shape[:3])}")
    if key.shape[0] != b:
        raise ValueError(f"{op}: key has batch size {key.shape[0]} but query has {b}")
    if hq == 0 or hk == 0:
        raise ValueError(f"{op}: query and key need at least one head, got {hq} and {hk}")
    if hk != hq and not (enable_gqa and hq % hk == 0):
        need = "enable_gqa=True and " if not enable_gqa else ""
        raise ValueError(f"{op}: query has {hq} heads and key/value {hk}; that needs {need}{hk} to divide {hq}")
    dropout_p = _check_dropout(op, dropout_p, upper="]")
    scale = _check_scale(op, scale, query)
    if dropout_p == 1.0:  # every weight dropped: as if no key were there (zeros out, zero gradients)
        key, value, attn_mask, dropout_p, lk = key[:, :, :0], value[:, :, :0], None, 0.0, 0
    if lk == 0:  # every row fully masked: zeros, which the reference gives without a kernel launch
        backend = "torch"
    shape = (b, hq, lq, lk)
    needs_bias_grad = attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled()
    causal = CAUSAL_TOP_LEFT if is_causal else CAUSAL_NONE
    name = _backend.choose(OP, query.device, query.dtype, backend, _supports(d, value.shape[-1], needs_bias_grad))
    bias = _mask_to_bias(op, attn_mask, query, shape, keep_bool=name == "cpu") if attn_mask is not None else None
    seed = new_dropout_seed() if dropout_p > 0 else None
    if needs_bias_grad:  # the reference, differentiated by autograd (the fused ops give no mask gradient)
        acc = acc_dtype(query.dtype)
        keep = _keep_scale(None, shape, lq, lk, dropout_p, seed, query.device, acc)
        out, _ = attention_math(query.to(acc), key.to(acc), value.to(acc), bias.to(acc), causal, scale, keep)
        return out.to(query.dtype)
    q, k, v = (_last_dim_contiguous(t) for t in (query, key, value))
    out, _lse = call(attention_fwd, q, k, v, bias, None, None, lq, lk, scale, causal, dropout_p, seed, name)
    return out


def _check_cu_seqlens(op: str, name: str, cu: Tensor, ref: Tensor, total: int, max_len: int) -> None:
    check_tensor(op, name, cu, floating=False)
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{op}: {name} must be a 1-D int32 tensor of at least 2 offsets, got {cu.dtype} "
                         f"of shape {tuple(cu.shape)}")
    if cu.device != ref.device:
        raise ValueError(f"{op}: {name} is on {cu.device} but the tokens are on {ref.device}")
    # reading a GPU tensor's values would wait for the GPU; a graph being compiled cannot branch on them
    if cu.device.type == "cpu" and values_readable(cu):
        seen = _CU_CHECKED[0]
        key = (version_counter(cu), cu.data_ptr(), total, max_len)
        if seen is not None and seen[0]() is cu and seen[1] == key:
            return  # these very offsets passed already (a model passes one tensor to every layer)
        lengths = cu[1:] - cu[:-1]
        if cu[0].item() != 0 or (lengths < 0).any() or cu[-1].item() != total:
            raise ValueError(f"{op}: {name} must start at 0, never decrease and end at the token count {total}, "
                             f"got {cu.tolist()}")
        if lengths.max().item() > max_len:
            raise ValueError(f"{op}: {name} has a sequence of {lengths.max().item()} tokens, longer than its "
                             f"max_seqlen {max_len}")
        _CU_CHECKED[0] = (weakref.ref(cu), key)


# The last CPU cu_seqlens whose values passed _check_cu_seqlens: (a weak reference to it, (its version
# counter, data pointer, the token count and max_seqlen it was checked against)). Reading the values
# is ~6 small tensor ops (~20 us); BERT checks its one pair of offsets 24 times a forward otherwise.
# A change in place moves the version counter (one through .data does not, as for ops.prepack: such a
# change goes unchecked; the kernels never read out of bounds on unchecked values).
_CU_CHECKED: list = [None]


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False, scale: Optional[float] = None,
                     dropout_p: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """Attention over packed sequences of different lengths, without padding.

    Args:
        q: [total_q, Hq, D]; k: [total_k, Hk, D]; v: [total_k, Hk, Dv] (Hk divides Hq).
        cu_seqlens_q, cu_seqlens_k: int32 [nseq + 1] cumulative offsets on q's device: sequence s is
            q[cu_seqlens_q[s]:cu_seqlens_q[s + 1]] attending to k/v[cu_seqlens_k[s]:cu_seqlens_k[s + 1]].
        max_seqlen_q, max_seqlen_k: the longest sequence in each (bounds the work per sequence). On the
            CPU, cu_seqlens are checked against them; on a GPU they are not (reading them would wait
            for the GPU), and rows of a sequence longer than max_seqlen_q are left unwritten.
        causal: bottom-right aligned: query i of a sequence with lq queries and lk keys sees keys
            j <= i + lk - lq (so the last query sees every key, as in decoding with a KV cache).
    Returns [total_q, Hq, Dv]. A query with no visible key gives zeros.
    """
    op = "varlen_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t)
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be [total_tokens, H, D], got shape {tuple(t.shape)}")
    q, k, v = autocast_lower(q.device, q, k, v)
    check_like(op, "k", k, "q", q, same_shape=False)
    check_like(op, "v", v, "q", q, same_shape=False)
    if _float16_on_cpu(q, backend):
        return varlen_attention(q.float(), k.float(), v.float(), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                causal=causal, scale=scale, dropout_p=dropout_p, backend=backend).half()
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: k has head_dim {k.shape[-1]} but q has {q.shape[-1]}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"{op}: v has shape {tuple(v.shape)}; its [total_k, Hk] must equal k's {tuple(k.shape[:2])}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"{op}: q and k need at least one head, got {q.shape[1]} and {k.shape[1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{op}: k/v have {k.shape[1]} heads, which does not divide q's {q.shape[1]}")
    seqlens = [integer(value) for value in (max_seqlen_q, max_seqlen_k)]
    for name, value, n in zip(("max_seqlen_q", "max_seqlen_k"), (max_seqlen_q, max_seqlen_k), seqlens):
        if n is None or n < 0:
            raise ValueError(f"{op}: {name} must be a non-negative int, got {value!r}")
    max_seqlen_q, max_seqlen_k = seqlens
    _check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q, q.shape[0], max_seqlen_q)
    _check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, q, k.shape[0], max_seqlen_k)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{op}: cu_seqlens_q has {cu_seqlens_q.numel() - 1} sequences but cu_seqlens_k has "
                         f"{cu_seqlens_k.numel() - 1}")
    check_choice(op, "causal", causal, (False, True))
    dropout_p = _check_dropout(op, dropout_p)
    scale = _check_scale(op, scale, q)
    name = _backend.choose(OP, q.device, q.dtype, backend, _supports(q.shape[-1], v.shape[-1], False))
    seed = new_dropout_seed() if dropout_p > 0 else None
    q4, k4, v4 = (_last_dim_contiguous(t).unsqueeze(0).transpose(1, 2) for t in (q, k, v))  # [1, H, T, D] views
    out, _lse = call(attention_fwd, q4, k4, v4, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                              CAUSAL_BOTTOM_RIGHT if causal else CAUSAL_NONE, dropout_p, seed, name)
    return out.transpose(1, 2).squeeze(0)
