"""Hugging Face transformers integration: ``attn_implementation="bignlp_fast"``.

    import bignlp_fast
    model = AutoModel.from_pretrained(path, attn_implementation="bignlp_fast")
    # or, on a loaded model: model.set_attn_implementation("bignlp_fast")

:func:`attention_forward` is registered with transformers' ``AttentionInterface`` under the name
``"bignlp_fast"``, and transformers' own SDPA mask function is registered under the same name with
``AttentionMaskInterface`` (where the installed version has it). Without the second, models built on
transformers' masking_utils would hand the function no padding mask at all; with it, the function
gets the mask SDPA gets: a bool [B, 1, Lq, Lk] (True = attend) or None when causality or "no mask"
is enough. Older versions, without that interface, pass their own 4-D mask (float, additive), which
the function also takes. A padding-free batch (sequences packed in one row, as transformers'
DataCollatorWithFlattening makes them) runs on varlen_attention, sequence by sequence, where the call
states the packing (see :func:`_packed_layout`); the dense path would attend under a [T, T] mask.

When registration happens. transformers is optional, and importing its modeling code takes seconds,
so ``import bignlp_fast`` never imports it:

- transformers not installed: nothing happens (one ``importlib.util.find_spec`` call);
- ``transformers.modeling_utils`` / ``transformers.masking_utils`` already imported: registered at once;
- otherwise a post-import hook on ``sys.meta_path`` registers each interface the moment its module
  has finished loading, i.e. before any model class can look the name up. It removes itself when done.

:func:`register` does it explicitly (importing transformers), e.g. after ``importlib.reload``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import warnings
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

from bignlp_fast.models._batch import _Batch
from bignlp_fast.ops._common import values_readable, version_counter
from bignlp_fast.ops.attention import scaled_dot_product_attention, varlen_attention

NAME = "bignlp_fast"
_ATTENTION_MODULE = "transformers.modeling_utils"  # defines AttentionInterface
_MASK_MODULE = "transformers.masking_utils"  # defines AttentionMaskInterface (transformers >= 4.53)
_warned: set = set()


# ---- the attention function -------------------------------------------------------------------
def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _broadcast_only(mask: Tensor) -> Tensor:
    """The mask with every expanded (stride 0) dimension narrowed to size 1: the same values under
    broadcasting, without materialising, e.g., a key-padding mask expanded to [B, 1, Lq, Lk]."""
    index = tuple(slice(0, 1) if mask.stride(d) == 0 and mask.shape[d] > 1 else slice(None) for d in range(mask.dim()))
    return mask[index]


def _position_bias_mask(position_bias: Tensor, attention_mask: Optional[Tensor], is_causal: bool, query: Tensor,
                        key: Tensor) -> Tensor:
    """position_bias merged with the mask (or with causality), as transformers' create_position_bias_mask."""
    min_dtype = torch.finfo(key.dtype).min
    if attention_mask is None:
        if not is_causal:
            return position_bias
        lq, lk = query.shape[2], key.shape[2]
        causal = torch.arange(lq, device=key.device)[:, None] >= torch.arange(lk, device=key.device)[None, :]
        return torch.where(causal.view(1, 1, lq, lk), position_bias, min_dtype)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, min_dtype)
    return position_bias + attention_mask


def _is_paged_cache(cache) -> bool:
    try:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
    except ImportError:
        return False
    return isinstance(cache, PagedAttentionCache)


# transformers' padding-free kwargs (FlashAttentionKwargs): sequences packed along the length axis
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# The last packed layout found where a mask had to be checked: ((the mask and the tensors the packing
# came from, as weak references with their versions), causal, the layout or None). transformers builds
# one mask per forward and hands it, and the same kwargs, to every layer.
_LAYOUT_SEEN: list = [None]


def _keep_pattern(cu_q: Tensor, cu_k: Tensor, causal: bool) -> Tensor:
    """bool [Tq, Tk]: True where query i and key j are in the same sequence (and, causal, j is not after
    i, bottom-right aligned as varlen_attention's causality)."""
    lens_q, lens_k = cu_q.diff().long(), cu_k.diff().long()
    seqs = torch.arange(lens_q.numel(), device=cu_q.device)
    seq_q, seq_k = seqs.repeat_interleave(lens_q), seqs.repeat_interleave(lens_k)
    keep = seq_q[:, None] == seq_k[None, :]
    if causal:  # query i_rel of a sequence of lq queries sees keys j_rel <= i_rel + lk - lq
        from_end_q = torch.arange(seq_q.numel(), device=cu_q.device) - cu_q[1:].long()[seq_q]  # i_rel - lq
        from_end_k = torch.arange(seq_k.numel(), device=cu_k.device) - cu_k[1:].long()[seq_k]  # j_rel - lk
        keep &= from_end_k[None, :] <= from_end_q[:, None]
    return keep


def _from_position_ids(position_ids: Tensor, length: int) -> Optional[tuple[Tensor, Tensor, int, int]]:
    """The packing of one row whose positions restart at each sequence (at the row's smallest position,
    transformers' rule: RoBERTa's start at padding_idx + 1), or None where the row does not start one."""
    pos = position_ids.reshape(-1)
    starts = (pos == pos.min()).nonzero().flatten()
    if starts[0].item() != 0:
        return None
    cu = torch.cat([starts, starts.new_tensor([length])]).to(torch.int32)
    longest = int(cu.diff().max())
    return cu, cu, longest, longest


def _packed_layout(query: Tensor, key: Tensor, attention_mask: Optional[Tensor], causal: bool,
                   kwargs: dict) -> Optional[tuple[Tensor, Tensor, int, int]]:
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) where the call is a padding-free batch that
    varlen_attention can run, else None (the dense path).

    The packing comes from transformers' padding-free kwargs (``cu_seq_lens_q/k``, ``max_length_q/k``:
    DataCollatorWithFlattening(return_flash_attn_kwargs=True)), over the batch and length axes
    flattened into tokens, as flash-attention's varlen path takes them; or, for one row of
    self-attention with a mask, from ``position_ids`` restarting at each sequence (transformers then
    builds a block-diagonal mask from them, causal in a decoder). A mask, where there is one, must be
    exactly what the packing implies: anything else (padding inside the row, a float mask, another
    pattern) keeps the dense path, which applies the mask as given."""
    b, lq, lk = query.shape[0], query.shape[2], key.shape[2]
    given = [kwargs.get(name) for name in _PACKED_KWARGS]
    position_ids = kwargs.get("position_ids")
    stated = None  # the packing flash-attention's kwargs state
    if all(v is not None for v in given):
        if not (isinstance(given[0], Tensor) and isinstance(given[1], Tensor)):
            return None
        sources = given[:2]
        stated = (*(t.to(device=query.device, dtype=torch.int32) for t in sources), int(given[2]), int(given[3]))
    elif (position_ids is not None and attention_mask is not None and b == 1 and lq == lk
          and 0 < lq == position_ids.numel()):
        sources = [position_ids]
    else:
        return None
    if attention_mask is None:  # the kwargs alone: the packing they state
        return stated
    if (b != 1 or attention_mask.dtype != torch.bool or attention_mask.shape[-2:] != (lq, lk)
            or torch.jit.is_tracing() or not values_readable(attention_mask, *sources)):
        return None  # (a trace would keep this call's answer, read from the values, for every input)
    tensors = (attention_mask, *sources)
    seen = _LAYOUT_SEEN[0]
    if (seen is not None and seen[1] == causal and len(seen[0]) == len(tensors)
            and all(ref() is t and version == version_counter(t) for (ref, version), t in zip(seen[0], tensors))):
        return seen[2]
    layout = stated if stated is not None else _from_position_ids(position_ids, lq)
    if layout is not None:
        cu_q, cu_k = layout[:2]
        if (cu_q.numel() != cu_k.numel() or int(cu_q[-1]) != lq or int(cu_k[-1]) != lk
                or not bool((attention_mask == _keep_pattern(cu_q, cu_k, causal)).all())):
            layout = None
    _LAYOUT_SEEN[0] = (tuple((weakref.ref(t), version_counter(t)) for t in tensors), causal, layout)
    return layout


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, position_bias: Optional[Tensor] = None, cache=None,
                      **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function contract, run by bignlp_fast.ops.scaled_dot_product_attention.

    Mirrors transformers' ``sdpa_attention_forward``. query [B, Hq, Lq, D], key/value [B, Hk, Lk, D(v)]
    (Hk < Hq: grouped-query attention, without repeating key/value); attention_mask: bool (True =
    attend) or additive float, broadcastable to [B, Hq, Lq, Lk], or None. is_causal: the argument,
    else ``module.is_causal``; used only when there is no mask and more than one query (a single
    decoding query sees every cached key). Returns (attn_output [B, Lq, Hq, Dv] contiguous, None).
    Unlike torch's SDPA, a query with every key masked (left padding) gets zeros, not NaN.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError(f"attn_implementation={NAME!r} does not support `softcap`; use 'eager' or 'flex_attention'")
    if kwargs.get("output_attentions", False):
        _warn_once(f"attn_implementation={NAME!r} does not return attention weights (output_attentions=True); "
                   "use attn_implementation='eager' for them")
    if cache is not None and _is_paged_cache(cache):  # updated before heads are grouped, as in sdpa
        key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs)

    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if torch.jit.is_tracing() and isinstance(is_causal, Tensor):
        is_causal = is_causal.item()
    packed = (_packed_layout(query, key, attention_mask, bool(is_causal), kwargs)
              if position_bias is None and (cache is None or not _is_paged_cache(cache)) else None)
    if packed is not None:  # a padding-free batch: each sequence attends only to itself
        b, hq = query.shape[:2]
        q, k, v = (t.transpose(1, 2).flatten(0, 1) for t in (query, key, value))  # [B * L, H, D]
        out = varlen_attention(q, k, v, *packed, causal=bool(is_causal), scale=scaling, dropout_p=dropout)
        return out.view(b, q_length, hq, out.shape[-1]), None
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if is_causal and kv_length > q_length:  # prefill into an empty static cache: the later keys are never seen
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        if position_bias is not None:
            position_bias = position_bias[:, :, :, :q_length]
    if position_bias is not None:
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    if attention_mask is not None:
        attention_mask = _broadcast_only(attention_mask)
    if query.shape[0] != key.shape[0]:  # torch's SDPA broadcasts the batch (e.g. learned queries of batch 1)
        b = max(query.shape[0], key.shape[0])
        query = query.expand(b, *query.shape[1:])
        key, value = key.expand(b, *key.shape[1:]), value.expand(b, *value.shape[1:])

    out = scaled_dot_product_attention(query, key, value, attention_mask, dropout, bool(is_causal), scaling,
                                       enable_gqa=query.shape[1] != key.shape[1])  # [B, Hq, Lq, Dv]
    return out.transpose(1, 2).contiguous(), None  # free: the op lays its output out as [B, Lq, Hq, Dv]


# ---- GPT-2's Conv1D ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def fast_conv1d_class(base: type) -> type:
    """A subclass of transformers' ``Conv1D`` (``base``: ``transformers.pytorch_utils.Conv1D``, the
    GPT-2 family's projection, ``x @ weight + bias`` with weight [in, out]) whose forward runs
    :func:`bignlp_fast.ops.linear.dense` on ``weight.t()``: the faster of ops.linear and F.linear for
    the input (GPT-2's decoding steps on the streaming kernels). It adds nothing to the module, so
    ``optimize`` swaps it in by class reassignment. Made once per base class (transformers is only
    imported by the user)."""
    from bignlp_fast.ops.linear import dense

    def forward(self, x: Tensor) -> Tensor:
        return dense(x, self.weight.t(), self.bias)

    return type("Conv1D", (base,), {"forward": forward, "__module__": __name__,
                                    "__doc__": "transformers' Conv1D on bignlp_fast.ops.linear.dense."})


# ---- padded batches of BERT-family encoders, run unpadded --------------------------------------------
# transformers' encoder stacks (class name -> its module) whose layers work token by token but for
# attention, which goes through the AttentionInterface with the forward's kwargs: Linear, LayerNorm,
# GELU, dropout. optimize() swaps them for unpadded_encoder_class's subclass.
UNPADDED_ENCODERS = {
    "BertEncoder": "transformers.models.bert.modeling_bert",
    "RobertaEncoder": "transformers.models.roberta.modeling_roberta",
    "XLMRobertaEncoder": "transformers.models.xlm_roberta.modeling_xlm_roberta",
    "CamembertEncoder": "transformers.models.camembert.modeling_camembert",
    "ElectraEncoder": "transformers.models.electra.modeling_electra",
    "ErnieEncoder": "transformers.models.ernie.modeling_ernie",
    "Data2VecTextEncoder": "transformers.models.data2vec.modeling_data2vec_text",
    "XLMRobertaXLEncoder": "transformers.models.xlm_roberta_xl.modeling_xlm_roberta_xl",
    "RobertaPreLayerNormEncoder": "transformers.models.roberta_prelayernorm.modeling_roberta_prelayernorm",
    "AlbertTransformer": "transformers.models.albert.modeling_albert",  # (its first Linear maps the embeddings)
    "Transformer": "transformers.models.distilbert.modeling_distilbert",  # DistilBERT's
}


def attention_implementation(encoder: torch.nn.Module) -> Optional[str]:
    """The attention implementation an encoder stack's layers run: its model config's
    (``_attn_implementation``), from the stack or, where it keeps none (DistilBERT's), its first
    submodule that does."""
    for module in encoder.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            return config._attn_implementation
    return None


def _key_padding(encoder: torch.nn.Module, hidden_states: Tensor, attention_mask: Optional[Tensor],
                 kwargs: dict) -> Optional[Tensor]:
    """keep [B, L] (True = a real token) where an encoder's call can run unpadded, else None: our
    attention is the model's (varlen_attention would otherwise not be called), the mask is a padding
    mask with some padding (a bool [B, 1, L, L] whose rows are all alike: transformers' bidirectional
    mask), self-attention only (no cross-attention, no cache), nothing asks for the layers' states
    (output_hidden_states / output_attentions), no packing already, and the values can be read (not
    while torch.compile or torch.jit.trace traces: the token count would be data-dependent, and a
    trace keeps the longest sequence of the batch it saw as a constant)."""
    if (attention_implementation(encoder) != NAME or hidden_states.dim() != 3
            or attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 4
            or any(kwargs.get(k) is not None for k in ("encoder_hidden_states", "cache", "past_key_values",
                                                         *_PACKED_KWARGS))
            or kwargs.get("output_hidden_states") or kwargs.get("output_attentions")
            or torch.jit.is_tracing() or not values_readable(hidden_states, attention_mask)):
        return None
    b, l = hidden_states.shape[:2]
    mask = _broadcast_only(attention_mask)
    if b * l == 0 or mask.shape[0] != b or mask.shape[1] != 1 or mask.shape[-1] != l or mask.shape[2] not in (1, l):
        return None
    keep = mask[:, 0, 0, :]
    if keep.all() or (mask.shape[2] > 1 and not bool((mask == keep[:, None, None, :]).all())):
        return None  # no padding to skip, or not a padding mask (causal, a custom pattern)
    return keep


@functools.lru_cache(maxsize=None)
def unpadded_encoder_class(base: type) -> type:
    """A subclass of transformers' encoder stack ``base`` (one of UNPADDED_ENCODERS) that runs a padded
    batch on its real tokens only: before the first layer the [B, L, hidden] states are gathered into
    one row of T tokens, the layers run on it with flash-attention's padding-free kwargs (so attention
    is varlen_attention, sequence by sequence, see :func:`_packed_layout`), and the last state is
    scattered back to [B, L, hidden] with zeros at padding, where transformers leaves values that
    nothing should read. Every GEMM, LayerNorm and activation then costs T rows instead of B * L. Calls
    it cannot run so (see :func:`_key_padding`) run ``base``'s forward as they are. It adds nothing to
    the module; optimize swaps it in by class reassignment. Made once per base class."""

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        keep = _key_padding(self, hidden_states, attention_mask, kwargs)
        if keep is None:
            return base.forward(self, hidden_states, attention_mask=attention_mask, **kwargs)
        batch = _Batch.of(keep, tuple(keep.shape))  # our BERT's unpadding: cu_seqlens, pack, unpack
        kwargs.pop("position_ids", None)  # the embeddings' (the layers take the packing from cu instead)
        out = base.forward(self, batch.pack(hidden_states)[None], attention_mask=None,  # [1, T, hidden]
                           cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                           max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen, **kwargs)
        last = batch.unpack((out[0] if isinstance(out, tuple) else out.last_hidden_state)[0])  # zeros at padding
        _LAST_UNPADDED[0] = (weakref.ref(last), version_counter(last), batch, [])  # for the MLM heads
        if isinstance(out, tuple):
            return (last, *out[1:])
        out.last_hidden_state = last
        return out

    return type(base.__name__, (base,), {"forward": forward, "__module__": __name__,
                                         "__doc__": f"transformers' {base.__name__}, run unpadded on padded batches."})


# ---- the masked-LM heads on an unpadded encoder's output ------------------------------------------
# transformers' MLM heads (class name -> its module) that map each position's state to its logits on
# its own (dense, GELU, LayerNorm, the vocabulary projection), where the model hands them the encoder
# stack's output as it is (not RoBERTa-PreLayerNorm's, whose model applies a LayerNorm first):
# optimize() swaps them for unpadded_head_class's subclass.
UNPADDED_HEADS = {
    "BertLMPredictionHead": "transformers.models.bert.modeling_bert",
    "RobertaLMHead": "transformers.models.roberta.modeling_roberta",
    "XLMRobertaLMHead": "transformers.models.xlm_roberta.modeling_xlm_roberta",
    "CamembertLMHead": "transformers.models.camembert.modeling_camembert",
    "ErnieLMPredictionHead": "transformers.models.ernie.modeling_ernie",
    "Data2VecTextLMHead": "transformers.models.data2vec.modeling_data2vec_text",
    "XLMRobertaXLLMHead": "transformers.models.xlm_roberta_xl.modeling_xlm_roberta_xl",
    "AlbertMLMHead": "transformers.models.albert.modeling_albert",
}
# The last state an unpadded encoder returned: (a weak reference to it, its version, its _Batch, [the
# scatter map the heads' autograd path takes, made by the first that needs it]). One entry: a head
# recognises the very tensor (identity and version), so a stale or overwritten entry is never used.
# (An inference tensor keeps no version: under torch.inference_mode a change made in place between the
# encoder and the head, which transformers' models never make, would go unseen.)
_LAST_UNPADDED: list = [None]


def _unpadded_batch(hidden_states: Tensor) -> Optional[tuple[_Batch, list]]:
    """(its _Batch, the entry's cache) where ``hidden_states`` is, unchanged, the last state an unpadded
    encoder returned (zeros at padding), else None."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # the encoder ran padded
        return None
    last = _LAST_UNPADDED[0]
    if last is None or last[0]() is not hidden_states or last[1] != version_counter(hidden_states):
        return None
    return last[2], last[3]


def _scatter_rows(batch: _Batch, cache: list) -> Tensor:
    """[B * L]: for each position, its row among the T real tokens' logits followed by the zero
    state's (row T, every padding position's)."""
    if not cache:
        tokens = batch.indices.numel()
        rows = torch.full((batch.shape[0] * batch.shape[1],), tokens, dtype=torch.long, device=batch.indices.device)
        cache.append(rows.index_copy_(0, batch.indices, torch.arange(tokens, device=rows.device)))
    return cache[0]


@functools.lru_cache(maxsize=None)
def unpadded_head_class(base: type) -> type:
    """A subclass of transformers' masked-LM head ``base`` (one of UNPADDED_HEADS) that, on the state an
    unpadded encoder stack (:func:`unpadded_encoder_class`) returned, computes the logits of the real
    tokens and of one zero state only: the vocabulary projection, most of an MLM forward's cost after
    the encoder, then costs T + 1 rows instead of B * L. Every padding position gets the zero state's
    logits, exactly what ``base`` computes there from the encoder's zeros (and their gradients reach
    the weights as they would). On any other input (another tensor, the same one changed in place, a
    padded encoder's) it runs ``base``'s forward as it is. It adds nothing to the module; optimize
    swaps it in by class reassignment. Made once per base class."""

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        found = _unpadded_batch(hidden_states) if hidden_states.dim() == 3 else None
        if found is None:
            return base.forward(self, hidden_states, *args, **kwargs)
        batch, cache = found

        def project(t: Tensor) -> Tensor:
            return base.forward(self, t, *args, **kwargs)

        real = batch.pack(hidden_states)  # [T, hidden]
        zero = real.new_zeros(1, real.shape[-1])  # the encoder's state at every padding position
        if not torch.is_grad_enabled():  # written straight into the output (in slices where it is large)
            return batch.unpack_projected(project, real, fill=project(zero)[0])
        # one product of T + 1 rows, scattered back (index_select's backward sums the padding rows'
        # gradients into the zero state's logits)
        logits = project(torch.cat([real, zero]))
        return logits.index_select(0, _scatter_rows(batch, cache)).view(*hidden_states.shape[:2], -1)

    return type(base.__name__, (base,), {"forward": forward, "__module__": __name__,
                                         "__doc__": f"transformers' {base.__name__}, on real tokens after an "
                                                    "unpadded encoder."})


def hf_conv1d_class() -> Optional[type]:
    """transformers' Conv1D if its module is already imported (never imports transformers), else None."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def __getattr__(name: str):
    """``bignlp_fast.hf.Conv1D``, ``bignlp_fast.hf.BertEncoder`` and ``bignlp_fast.hf.BertLMPredictionHead``
    (etc.), the classes :func:`fast_conv1d_class`, :func:`unpadded_encoder_class` and
    :func:`unpadded_head_class` make, by the names they carry: pickle
    (torch.save of a whole optimized model) finds a class by its module and name, and this makes it
    there on first use (importing transformers, as the model being loaded does)."""
    if name == "Conv1D":
        from transformers.pytorch_utils import Conv1D
        return fast_conv1d_class(Conv1D)
    if name in UNPADDED_ENCODERS:
        return unpadded_encoder_class(getattr(importlib.import_module(UNPADDED_ENCODERS[name]), name))
    if name in UNPADDED_HEADS:
        return unpadded_head_class(getattr(importlib.import_module(UNPADDED_HEADS[name]), name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- registration -----------------------------------------------------------------------------
def _register_attention(modeling_utils) -> None:
    modeling_utils.AttentionInterface.register(NAME, attention_forward)


def _register_mask(masking_utils) -> None:
    interface = getattr(masking_utils, "AttentionMaskInterface", None)
    if interface is None:  # older transformers: models build their own 4-D mask, which we also take
        return
    sdpa_mask = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    interface.register(NAME, sdpa_mask)


_CALLBACKS: dict[str, Callable] = {_ATTENTION_MODULE: _register_attention, _MASK_MODULE: _register_mask}


def register() -> None:
    """Register ``attn_implementation="bignlp_fast"`` with transformers now (imports transformers)."""
    import transformers.modeling_utils

    _register_attention(transformers.modeling_utils)
    try:
        import transformers.masking_utils
    except ImportError:
        return
    _register_mask(transformers.masking_utils)


def is_registered() -> bool:
    """Whether transformers' AttentionInterface has the name (False when transformers is not imported)."""
    modeling_utils = sys.modules.get(_ATTENTION_MODULE)
    interface = getattr(modeling_utils, "AttentionInterface", None)
    return interface is not None and NAME in interface._global_mapping


class _PostImportHook:
    """A sys.meta_path finder that lets the ordinary finders find a module, then runs a callback on the
    module once its code has executed. It finds nothing itself and leaves sys.meta_path when done."""

    def __init__(self, callbacks: dict[str, Callable]):
        self.callbacks = dict(callbacks)

    def find_spec(self, fullname, path=None, target=None):
        callback = self.callbacks.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = getattr(spec.loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_register(module):
            exec_module(module)
            self._done(fullname)
            try:
                callback(module)
            except Exception as e:  # never break importing transformers
                warnings.warn(f"bignlp_fast could not register attn_implementation={NAME!r} with {fullname} "
                              f"({type(e).__name__}: {e}); call bignlp_fast.hf.register() to see why", stacklevel=2)

        try:
            spec.loader.exec_module = exec_then_register
        except (AttributeError, TypeError):
            return spec
        return spec

    def _done(self, fullname: str) -> None:
        self.callbacks.pop(fullname, None)
        if not self.callbacks and self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """What ``import bignlp_fast`` runs: register now if transformers' modules are loaded, else on their
    import; nothing if transformers is not installed. Never raises."""
    try:
        if importlib.util.find_spec("transformers") is None:
            return
        pending = {}
        for name, callback in _CALLBACKS.items():
            module = sys.modules.get(name)
            if module is not None and getattr(module, "__spec__", None) is not None:
                callback(module)
            else:
                pending[name] = callback
        if pending and not any(isinstance(f, _PostImportHook) for f in sys.meta_path):
            sys.meta_path.insert(0, _PostImportHook(pending))
    except Exception as e:  # importing bignlp_fast never fails because of an optional part
        warnings.warn(f"bignlp_fast could not set up the Hugging Face attention hook ({type(e).__name__}: {e})",
                      stacklevel=2)
