"""GPT-2: a causal language model on the package's fused ops, loading Hugging Face GPT-2 checkpoints as
they are (the parameter names, shapes and Conv1D layout are transformers' ``GPT2LMHeadModel``'s).

Design choices:

- **Residual add fused into the next LayerNorm.** GPT-2 is pre-LN: each sub-layer reads
  ``LN(residual)`` and adds its output to the residual stream. ``ops.add_layer_norm(out, residual,
  w, b)`` returns ``(LN(out + residual), out + residual)`` in one pass, so every block is
  ``ln_1 -> attention -> add+ln_2 -> MLP -> add+(next block's ln_1, or ln_f)``: the residual sum
  is never written and read back on its own. The MLP's bias and GELU are one op too
  (``ops.bias_gelu``), after a matmul without bias; attention is ``ops.scaled_dot_product_attention``.
- **Conv1D layout kept.** GPT-2 stores its projections as ``[in, out]`` (``y = x @ W + b``); the
  model keeps that layout so a checkpoint's tensors load without transposes.
- **A static KV cache.** :class:`KVCache` preallocates keys and values ``[n_layer, B, H, max_len,
  D]`` and a key mask ``[B, max_len]``; a step writes its positions in place and attends to the
  first ``length`` entries, so decoding does no ``torch.cat`` and the cache never reallocates.
  New queries see every cached key and, among themselves, the causal order (bottom-right causal):
  a single-token step needs no causal mask, a prefill into an empty cache is plain ``is_causal``.
- **Position ids from the attention mask.** Prompts of a batch are left-padded; each token's
  position is the number of real tokens before it (``attention_mask.cumsum(-1) - 1``, as
  transformers' generation computes them), so a padded row gives the logits of the same sequence
  run alone. Padding tokens are masked as keys; their own outputs are meaningless (zeros).
- **Padded batches without a cache run unpadded** (:meth:`GPTModel.encode`), as our BERT does: the
  real tokens in one row, attention ``varlen_attention`` causal within each sequence, the
  vocabulary projection and the loss on the real tokens only. The loss never counts a label at
  padding or one predicted from padding, on either path (torch.compile's runs padded).
- **A decoding step is one compiled call.** At batch 1 a token reads ~500 MB of weights in ~12 ms,
  and each public op call costs ~10 us of Python (validation, backend choice, dispatch): ~100 calls
  a token were ~1.5 ms, and calling the ops' kernels one by one from Python still ~0.7 ms. A
  single-token step on the CPU in inference (:meth:`GPTModel._decode_step_ok`) checks once that
  every op would run its cpu backend, then runs all blocks in ``_C.gpt2_decode_cpu``
  (csrc/cpu/gpt_decode.cpp): the same kernels on the same arguments as the public ops, so the same
  results, bit for bit (tests/test_gpt.py).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from bignlp_fast import _backend
from bignlp_fast.models._pretrained import HFConfig, PretrainedModel, model_output
from bignlp_fast.models._batch import _Batch, labelled_loss
from bignlp_fast.ops import add_layer_norm, bias_gelu, scaled_dot_product_attention, varlen_attention
from bignlp_fast.ops._common import dispatcher_needed, values_readable
from bignlp_fast.ops.add_layer_norm import OP as _ADD_LN
from bignlp_fast.ops.attention import CPU_MAX_HEAD_DIM, OP as _ATTENTION
from bignlp_fast.ops.bias_gelu import OP as _BIAS_GELU
from bignlp_fast.ops.linear import OP as _LINEAR, SKINNY_ROWS as _SKINNY_ROWS, dense, linear_is_faster_for

# activation_function -> bias_gelu's ``approximate``
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


@dataclasses.dataclass
class GPTConfig(HFConfig):
    """GPT-2's hyperparameters, with transformers' ``GPT2Config`` names and defaults (config.json keys).

    Keys without a field (``summary_*``, ``use_cache``, ``reorder_and_upcast_attn``, which changes
    only the precision of eager attention: ours always accumulates in float32, ...) are kept in
    ``extra`` and written back on save."""

    model_type: ClassVar[str] = "gpt2"
    _aliases: ClassVar[dict] = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                                "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[Union[int, list]] = 50256
    scale_attn_weights: bool = True  # scores scaled by 1 / sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # and by 1 / (layer index + 1)
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ValueError(f"GPTConfig: n_inner must be a positive int or None, got {self.n_inner!r}")
        if self.activation_function not in _GELU:
            raise ValueError(f"GPTConfig: activation_function must be one of {', '.join(map(repr, _GELU))}, got "
                             f"{self.activation_function!r}")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"GPTConfig: {name} must be in [0, 1), got {value!r}")
        if not self.layer_norm_epsilon >= 0:
            raise ValueError(f"GPTConfig: layer_norm_epsilon must be non-negative, got {self.layer_norm_epsilon!r}")
        if self.extra.get("add_cross_attention"):
            raise ValueError("GPTConfig: add_cross_attention=True (GPT-2 as a decoder with cross-attention) is not "
                             "supported")
        if self.extra.get("tie_word_embeddings", True) is False:
            raise ValueError("GPTConfig: tie_word_embeddings=False is not supported; GPT-2's lm_head is wte")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


@model_output
class CausalLMOutput:
    logits: Tensor  # [B, L, vocab_size] (the last logits_to_keep positions when that is given)
    loss: Optional[Tensor] = None  # shifted cross-entropy against ``labels`` (-100 and padding not counted)
    past_key_values: Optional["KVCache"] = None  # the cache, updated in place, when one was used


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions.

    ``k``, ``v``: [n_layer, B, H, max_len, D]; ``mask``: [B, max_len] bool, True where the
    position holds a real token (False for padding and for positions not written yet);
    ``length``: how many positions are filled. A forward with this cache writes its L new
    positions at ``length`` and then advances it. Meant for inference (``torch.no_grad``); a
    training forward may start one (see :meth:`update`).
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device, None] = None):
        for name, value in (("n_layer", n_layer), ("batch_size", batch_size), ("n_head", n_head),
                            ("head_dim", head_dim), ("max_len", max_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [n_layer, B, H, max_len, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [n_layer, B, H, max_len, D]
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # [B, max_len]
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        self.mask.zero_()
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, H, L, D] at positions length..length+L of ``layer``; return that layer's keys
        and values so far, [B, H, length + L, D] views (``length`` itself advances after the last layer).

        A first call under autograd (a training forward with ``use_cache=True``, as transformers'
        GPT-2 has by default) keeps detached copies and returns the call's own k, v, so that the
        backward goes through them: writing every layer into the one [n_layer, ...] tensor in place
        would undo the views the earlier layers saved. A later call under autograd writes in place
        as in inference: its forward runs, and a backward through it is autograd's in-place error
        (the cache does not keep gradients across calls)."""
        end = self.length + k.shape[2]
        if self.length == 0 and torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            with torch.no_grad():
                self.k[layer, :, :, :end] = k
                self.v[layer, :, :, :end] = v
            return k, v
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Conv1D(torch.nn.Module):
    """GPT-2's projection: ``y = x @ weight + bias`` with weight [in, out] (transformers' Conv1D layout)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(in_features, out_features))  # [in, out]
        self.bias = torch.nn.Parameter(torch.zeros(out_features))  # [out]

    def forward(self, x: Tensor, with_bias: bool = True) -> Tensor:
        # the faster GEMM for x (ops.linear.dense): decoding-sized inputs on ops.linear's streaming
        # kernel, which reads W^T in place at memory speed; float32 prompts on the packed GEMM where
        # torch's sgemm is the slower one; torch's GEMM elsewhere
        return dense(x, self.weight.t(), self.bias if with_bias else None)


class GPTAttention(torch.nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_head, self.head_dim = layer_idx, config.n_head, config.head_dim
        self.attn_pdrop, self.resid_pdrop = config.attn_pdrop, config.resid_pdrop
        self.scale = config.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor], is_causal: bool, cache: Optional[KVCache],
                packed: Optional[_Batch] = None) -> Tensor:
        """x [B, L, E] -> [B, L, E]; ``packed``: x is [1, T, E], the real tokens of a padded batch in one
        row, each sequence attending causally to itself (varlen_attention)."""
        B, L, E = x.shape
        qkv = self.c_attn(x).view(B, L, 3, self.n_head, self.head_dim)  # [B, L, 3, H, D]
        dropout_p = self.attn_pdrop if self.training else 0.0
        if packed is not None:
            q, k, v = qkv[0].unbind(1)  # [T, H, D] views
            out = varlen_attention(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen,
                                   packed.max_seqlen, causal=True, scale=self.scale, dropout_p=dropout_p)  # [T, H, D]
        else:
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, H, L, D] views
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # [B, H, past + L, D]
            out = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                               dropout_p=dropout_p).transpose(1, 2)  # [B, L, H, D]
        out = self.c_proj(out.reshape(B, L, E))  # [B, L, E]
        return F.dropout(out, self.resid_pdrop, self.training)


class GPTMLP(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.approximate, self.resid_pdrop = _GELU[config.activation_function], config.resid_pdrop
        self.c_fc = Conv1D(config.n_embd, config.inner_dim)
        self.c_proj = Conv1D(config.inner_dim, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        h = bias_gelu(self.c_fc(x, with_bias=False), self.c_fc.bias, approximate=self.approximate)  # [B, L, I]
        return F.dropout(self.c_proj(h), self.resid_pdrop, self.training)  # [B, L, E]


class GPTBlock(torch.nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.eps = config.layer_norm_epsilon
        self.ln_1 = torch.nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPTAttention(config, layer_idx)
        self.ln_2 = torch.nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPTMLP(config)

    def forward(self, x: Tensor, residual: Tensor, next_ln: torch.nn.LayerNorm, attn_mask: Optional[Tensor],
                is_causal: bool, cache: Optional[KVCache], packed: Optional[_Batch] = None) -> tuple[Tensor, Tensor]:
        """x = ln_1(residual) [B, L, E] -> (next_ln(residual'), residual'), residual' the block's output."""
        a = self.attn(x, attn_mask, is_causal, cache, packed)  # [B, L, E]
        x, residual = add_layer_norm(a, residual, self.ln_2.weight, self.ln_2.bias, self.eps)
        m = self.mlp(x)  # [B, L, E]
        return add_layer_norm(m, residual, next_ln.weight, next_ln.bias, next_ln.eps)


def _check_ids(name: str, ids) -> None:
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
        got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name}: input_ids must be an int64 (or int32) tensor [batch, length], got {got}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name}: input_ids must hold at least one token per row, got shape {tuple(ids.shape)}")


class GPTModel(PretrainedModel):
    """The GPT-2 transformer: embeddings, n_layer pre-LN blocks, ln_f. State dict keys as transformers'
    ``GPT2Model``. ``forward(input_ids, attention_mask=None, position_ids=None, past_key_values=None)``
    returns the final hidden states [B, L, n_embd]; pass a :class:`KVCache` (``new_cache``) to cache."""

    config_class = GPTConfig
    base_model_prefix = "transformer"
    ignored_keys = (".attn.bias", ".attn.masked_bias")
    architecture = "GPT2Model"

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = torch.nn.Embedding(config.n_positions, config.n_embd)
        self.h = torch.nn.ModuleList(GPTBlock(config, i) for i in range(config.n_layer))
        self.ln_f = torch.nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """transformers' GPT-2 initialisation: normal(0, initializer_range) for embeddings and
        projections, the residual-stream projections (c_proj) scaled by 1 / sqrt(2 n_layer), zero
        biases, LayerNorm weight 1 and bias 0."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (torch.nn.Embedding, Conv1D)):
                module.weight.normal_(0.0, std)
            if isinstance(module, Conv1D):
                module.bias.zero_()
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        for block in self.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.normal_(0.0, std / math.sqrt(2 * self.config.n_layer))

    def new_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        """An empty cache for ``max_len`` positions (default n_positions), in the model's dtype and device."""
        c, p = self.config, self.wte.weight
        return KVCache(c.n_layer, batch_size, c.n_head, c.head_dim, max_len or c.n_positions, dtype=p.dtype,
                       device=p.device)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[KVCache] = None) -> Tensor:
        """input_ids [B, L]; attention_mask [B, past + L] (1 = token, 0 = padding), past = the cache's
        length (0 without one); position_ids [B or 1, L] (default: from the mask, else past..past+L-1).
        Returns ln_f's output [B, L, n_embd] (zero at padding where the batch ran unpadded, see
        :meth:`encode`)."""
        h, batch = self.encode(input_ids, attention_mask, position_ids, past_key_values)
        return h if batch is None else batch.unpack(h)

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               position_ids: Optional[Tensor] = None, past_key_values: Optional[KVCache] = None
               ) -> tuple[Tensor, Optional[_Batch]]:
        """As :meth:`forward`, but a padded batch without a cache runs **unpadded**: its real tokens in one
        row, every product, LayerNorm and GELU on T rows instead of B * L, attention varlen_attention
        (causal within each sequence). Returns (ln_f's output at the real tokens [T, n_embd], the
        batch's layout) then, else (ln_f's output [B, L, n_embd], None). Not while torch.compile or
        torch.jit.trace traces (the token count would be data-dependent)."""
        name = type(self).__name__
        _check_ids(name, input_ids)
        B, L = input_ids.shape
        cache, past = past_key_values, 0
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"{name}: past_key_values must be a KVCache (model.new_cache(...)), got "
                                f"{type(cache).__name__}")
            past = cache.length
            if cache.batch_size != B:
                raise ValueError(f"{name}: past_key_values holds batch size {cache.batch_size} but input_ids has {B}")
            if past + L > cache.max_len:
                raise ValueError(f"{name}: past_key_values has room for {cache.max_len} positions; {past} are "
                                 f"filled and input_ids adds {L}")
            if cache.k.dtype != self.wte.weight.dtype or cache.k.device != self.wte.weight.device:
                raise ValueError(f"{name}: past_key_values is {cache.k.dtype} on {cache.k.device} but the model is "
                                 f"{self.wte.weight.dtype} on {self.wte.weight.device}")
        end = past + L
        if end > self.config.n_positions:
            raise ValueError(f"{name}: {end} positions (past {past} + input {L}) exceed n_positions "
                             f"{self.config.n_positions}")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, end):
            raise ValueError(f"{name}: attention_mask must have shape [batch, past + length] = {[B, end]}, got "
                             f"{list(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:  # count of real tokens before each one (padding: any valid id)
                position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, past:]
            else:
                position_ids = torch.arange(past, end, device=input_ids.device)[None]  # [1, L]
        elif position_ids.dim() != 2 or position_ids.shape[0] not in (1, B) or position_ids.shape[1] != L:
            raise ValueError(f"{name}: position_ids must have shape [batch or 1, length] = [{B}, {L}], got "
                             f"{list(position_ids.shape)}")

        packed = None  # without a cache, a padded batch runs unpadded: its real tokens in one row
        if (cache is None and attention_mask is not None and not torch.jit.is_tracing()
                and values_readable(attention_mask) and not bool(attention_mask.bool().all())):
            packed = _Batch.of(attention_mask, (B, L))
            if packed.indices.numel() == 0:
                packed = None

        # attention: key mask [B, 1, 1, past + L] (True = attend) and the causal order among new tokens
        if packed is not None:  # (varlen_attention: causal within each sequence, no mask)
            attn_mask, is_causal = None, True
            input_ids, position_ids = packed.pack(input_ids)[None], packed.pack(position_ids.expand(B, L))[None]
        elif cache is not None:
            if attention_mask is not None:
                cache.mask[:, :end] = attention_mask.bool()
            else:
                cache.mask[:, past:end] = True
            attn_mask, is_causal = cache.mask[:, None, None, :end], past == 0 and L > 1
            if past > 0 and L > 1:  # new queries after cached keys: bottom-right causal, made explicit
                i = torch.arange(past, end, device=input_ids.device)[:, None]  # [L, 1]
                attn_mask = attn_mask & (torch.arange(end, device=input_ids.device)[None] <= i)  # [B, 1, L, end]
        else:
            attn_mask = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None
            is_causal = True
        if attn_mask is not None:  # additive form, made once for every layer (0 = attend, -inf = masked)
            attn_mask = torch.where(attn_mask, 0.0, -math.inf)

        residual = self.wte(input_ids) + self.wpe(position_ids)  # [B, L, E]
        residual = F.dropout(residual, self.config.embd_pdrop, self.training)
        ln_1 = self.h[0].ln_1
        x, residual = add_layer_norm(residual, None, ln_1.weight, ln_1.bias, ln_1.eps)  # ln_1(residual) [B, L, E]
        if self._decode_step_ok(residual, cache):
            bias = attn_mask.expand(B, self.config.n_head, 1, end)  # [B, H, 1, past + 1]
            x = self._decode_step(x.view(B, -1), residual.view(B, -1), bias, cache, past).view(B, 1, -1)
        else:
            for i, block in enumerate(self.h):
                next_ln = self.h[i + 1].ln_1 if i + 1 < len(self.h) else self.ln_f
                x, residual = block(x, residual, next_ln, attn_mask, is_causal, cache, packed)
        if cache is not None:
            cache.length = end
        return (x, None) if packed is None else (x[0], packed)  # ln_f(residual) [B, L, E] or [T, E]

    def _decode_step(self, x: Tensor, residual: Tensor, bias: Tensor, cache: KVCache, past: int) -> Tensor:
        """Every block for one new token per row, x = ln_1(residual) and residual [B, E], in one call of
        the compiled decoding step (csrc/cpu/gpt_decode.cpp: the kernels the public ops run, on the same
        arguments, with nothing in Python between them); bias [B, H, 1, past + 1] float32, the additive
        key mask. Returns ln_f(residual') [B, E]. The parameters are looked up at every step, so a
        replaced parameter or module is used at once."""
        c, params, scales, eps = self.config, [], [], []
        for i, block in enumerate(self.h):
            attn, mlp = block.attn, block.mlp
            next_ln = self.h[i + 1].ln_1 if i + 1 < len(self.h) else self.ln_f
            params += (attn.c_attn.weight, attn.c_attn.bias, attn.c_proj.weight, attn.c_proj.bias, block.ln_2.weight,
                       block.ln_2.bias, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias,
                       next_ln.weight, next_ln.bias)
            scales.append(attn.scale)
            eps += (block.eps, next_ln.eps)
        # which of a block's four products (c_attn, attn.c_proj, c_fc, mlp.c_proj) ops.linear.dense would
        # put on the streaming kernel: bit j set; at::linear (F.linear) for the others
        B, E, I = x.shape[0], c.n_embd, c.inner_dim
        skinny = sum(1 << j for j, (k, n) in enumerate(((E, 3 * E), (E, E), (E, I), (I, E)))
                     if linear_is_faster_for(x.device, x.dtype, B, k, n, transposed=True))  # Conv1D: [K, N]
        return _backend.compiled().gpt2_decode_cpu(x, residual, params, cache.k, cache.v, past, bias, scales, eps,
                                                   _GELU[c.activation_function] == "tanh", skinny)[0]

    def _decode_step_ok(self, residual: Tensor, cache: Optional[KVCache]) -> bool:
        """Whether this forward is a decoding step :meth:`_decode_step` may run: one new
        token per row (residual [B, 1, E], B <= 16, the skinny matrix products) with a cache, in
        inference (no dropout; nothing for autograd, torch.compile or a mode to see; no autocast, whose
        dtypes the ops of the block-by-block path follow), and every op's backend, automatic or named
        by BIGNLP_FAST_BACKEND, the cpu one."""
        B, L, _ = residual.shape
        if (cache is None or L != 1 or B > _SKINNY_ROWS or self.training or residual.device.type != "cpu"
                or dispatcher_needed((residual,)) or self.config.head_dim > CPU_MAX_HEAD_DIM
                or torch.is_autocast_enabled("cpu")):
            return False
        return all(_backend.plan(op, residual.device, residual.dtype)[0] == "cpu"
                   for op in (_LINEAR, _ATTENTION, _ADD_LN, _BIAS_GELU))


def _next_tokens(batch: _Batch, labels: Tensor) -> Tensor:
    """The loss's targets of an unpadded batch's real tokens but the last: token j's is the label of the
    next position of its row where that is a real token, else -100 (the padded path's rule)."""
    at = batch.indices  # [T] positions in the flattened [B * L]
    follows = (at[1:] == at[:-1] + 1) & (at[1:] % batch.shape[1] != 0)  # the next position, same row
    return batch.pack(labels)[1:].masked_fill(~follows, -100)


class GPTLMHeadModel(PretrainedModel):
    """GPT-2 with its language-model head (tied to the token embeddings): transformers' ``GPT2LMHeadModel``.

    ``forward(input_ids, attention_mask=None, position_ids=None, past_key_values=None, labels=None,
    use_cache=False, logits_to_keep=0)`` -> :class:`CausalLMOutput`; ``generate(...)`` for greedy or
    sampled continuation of (left-padded) prompts."""

    config_class = GPTConfig
    base_model_prefix = "transformer"
    tied_weights = {"lm_head.weight": "transformer.wte.weight"}
    ignored_keys = (".attn.bias", ".attn.masked_bias")
    architecture = "GPT2LMHeadModel"

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTModel(config)
        self.lm_head = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False, device="meta")
        self.lm_head.weight = self.transformer.wte.weight  # tied: [vocab_size, n_embd]

    def new_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        return self.transformer.new_cache(batch_size, max_len)

    def _head(self, h: Tensor) -> Tensor:
        return dense(h, self.lm_head.weight, None)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[KVCache] = None,
                labels: Optional[Tensor] = None, use_cache: bool = False, logits_to_keep: int = 0) -> CausalLMOutput:
        """As :meth:`GPTModel.forward`; plus ``labels`` [B, L] (the inputs themselves, shifted inside;
        -100 ignored, as are labels at padding and those predicted from padding) for the loss, ``use_cache`` to start a new cache when none is given (it comes back
        as ``past_key_values``), and ``logits_to_keep`` > 0 to compute logits for the last positions only."""
        name = type(self).__name__
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
                got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
                raise ValueError(f"{name}: labels must have input_ids' shape {tuple(input_ids.shape)}, got {got}")
            if logits_to_keep:
                raise ValueError(f"{name}: labels need every position's logits; logits_to_keep must be 0")
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"{name}: logits_to_keep must be a non-negative int, got {logits_to_keep!r}")
        if past_key_values is None and use_cache:
            _check_ids(name, input_ids)
            past_key_values = self.new_cache(input_ids.shape[0])
        h, batch = self.transformer.encode(input_ids, attention_mask, position_ids, past_key_values)
        if batch is not None and not logits_to_keep and labels is None:  # the real tokens only
            return CausalLMOutput(batch.unpack_projected(self._head, h), None, past_key_values)
        if batch is not None and not logits_to_keep:
            logits = self._head(h)  # [T, V]
            loss = labelled_loss(self._head, h[:-1], logits[:-1], _next_tokens(batch, labels))
            return CausalLMOutput(batch.unpack(logits), loss, past_key_values)
        if batch is not None:
            h = batch.unpack(h)
        logits = self._head(h[:, -logits_to_keep:] if logits_to_keep else h)  # [B, L', V]
        loss = None
        if labels is not None:  # token t predicts token t + 1, both real tokens
            targets = labels[:, 1:]
            if attention_mask is not None:
                real = attention_mask[:, -labels.shape[1]:].bool()
                targets = targets.masked_fill(~(real[:, 1:] & real[:, :-1]), -100)
            loss = labelled_loss(self._head, h[:, :-1].flatten(0, 1), logits[:, :-1].flatten(0, 1), targets.flatten())
        return CausalLMOutput(logits, loss, past_key_values)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_k: Optional[int] = None, eos_token_id: Union[int, list, None] = None,
                 attention_mask: Optional[Tensor] = None, use_cache: bool = True) -> Tensor:
        """Continue prompts by up to ``max_new_tokens`` tokens; returns [B, L_prompt + generated].

        input_ids [B, L_prompt], left-padded when the prompts differ in length, with
        ``attention_mask`` [B, L_prompt] (1 = token, 0 = padding). Greedy unless ``do_sample``
        (softmax of logits / temperature, restricted to the top_k largest when given;
        torch.manual_seed makes it repeat; ``top_k=0``, as in transformers, is no restriction).
        ``eos_token_id`` (an id or a list, ints or integer tensors; default the config's, as
        transformers; ``[]`` for none): a row that produced it is finished and padded with it (the
        first id of a list) from then on; generation stops when every row has finished. Ids of the
        config's past the vocabulary, which no step can produce (GPT-2's 50256 in a small config),
        are left out, as transformers lets them be; such an id passed here is an error.
        ``use_cache=False`` recomputes the whole sequence at every step (the cache's reference).
        """
        name = f"{type(self).__name__}.generate"
        _check_ids(name, input_ids)
        B, L0 = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (B, L0):
            raise ValueError(f"{name}: attention_mask must have input_ids' shape {(B, L0)}, got "
                             f"{tuple(attention_mask.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"{name}: max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"{name}: temperature must be a positive number, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"{name}: top_k must be a non-negative int (0: no restriction) or None, got {top_k!r}")
        top_k = top_k or None
        if L0 + max_new_tokens > self.config.n_positions:
            raise ValueError(f"{name}: the prompt ({L0} tokens) plus max_new_tokens ({max_new_tokens}) exceed "
                             f"n_positions {self.config.n_positions}")
        eos = self._eos_ids(name, eos_token_id)

        device, total = input_ids.device, L0 + max_new_tokens
        tokens = torch.full((B, total), eos[0] if eos else 0, dtype=input_ids.dtype, device=device)  # [B, total]
        tokens[:, :L0] = input_ids
        mask = torch.ones(B, total, dtype=torch.long, device=device)  # [B, total]: generated tokens are real
        if attention_mask is not None:
            mask[:, :L0] = attention_mask
        eos_ids = torch.tensor(eos, dtype=input_ids.dtype, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        cache = self.new_cache(B, total) if use_cache and max_new_tokens > 0 else None
        length = L0
        for _ in range(max_new_tokens):
            if cache is not None:  # the prompt at the first step, then one token a step
                logits = self(tokens[:, cache.length:length], mask[:, :length], past_key_values=cache,
                              logits_to_keep=1).logits[:, -1]  # [B, V]
            else:
                logits = self(tokens[:, :length], mask[:, :length], logits_to_keep=1).logits[:, -1]  # [B, V]
            nxt = self._next_token(logits.float(), do_sample, temperature, top_k)  # [B]
            if eos:
                nxt = nxt.masked_fill(finished, eos[0])
                finished |= torch.isin(nxt, eos_ids)
            tokens[:, length] = nxt
            length += 1
            if eos and bool(finished.all()):
                break
        return tokens[:, :length]

    def _eos_ids(self, name: str, eos_token_id) -> list[int]:
        """generate's eos_token_id (None: the config's) as a list of ints in the vocabulary."""
        from_config = eos_token_id is None
        if from_config:
            eos_token_id = self.config.eos_token_id
        if isinstance(eos_token_id, Tensor):
            eos_token_id = eos_token_id.tolist()
        ids = [] if eos_token_id is None else [eos_token_id] if not isinstance(eos_token_id, (list, tuple)) \
            else list(eos_token_id)
        try:
            ids = [operator.index(e) for e in ids]  # ints, numpy ints; not floats or bools' lookalikes
        except TypeError:
            ids = None
        if ids is None or any(e < 0 or (e >= self.config.vocab_size and not from_config) for e in ids):
            source = " (the config's; pass eos_token_id=[] for none)" if from_config else ""
            raise ValueError(f"{name}: eos_token_id must be token ids in [0, {self.config.vocab_size}), got "
                             f"{eos_token_id!r}{source}")
        return [e for e in ids if e < self.config.vocab_size]

    @staticmethod
    def _next_token(logits: Tensor, do_sample: bool, temperature: float, top_k: Optional[int]) -> Tensor:
        """logits [B, V] float32 -> token ids [B]."""
        if not do_sample:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        return torch.multinomial(logits.softmax(-1), 1).squeeze(1)
