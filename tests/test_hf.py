"""attn_implementation="bignlp_fast" in Hugging Face transformers, against "eager" and "sdpa"."""

import re
import subprocess
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bignlp_fast  # noqa: E402
import bignlp_fast.hf  # noqa: E402
from conftest import SUBPROCESS_CWD, padded_batch  # noqa: E402
from transformers import (AutoModel, AutoModelForCausalLM, BertConfig, BertModel, GPT2Config,  # noqa: E402
                          GPT2LMHeadModel)


@pytest.fixture(params=["torch", None], ids=["torch", "auto"])
def backend(request, monkeypatch):
    """The attention op's backend, through BIGNLP_FAST_BACKEND (the HF hook has no backend argument)."""
    if request.param is not None:
        monkeypatch.setenv("BIGNLP_FAST_BACKEND", request.param)
    return request.param


def bert_config(**kwargs):  # head_dim 15: not a power of two
    return BertConfig(vocab_size=101, hidden_size=45, num_attention_heads=3, num_hidden_layers=2,
                      intermediate_size=70, max_position_embeddings=64, **kwargs)


def gpt2_config():
    return GPT2Config(vocab_size=101, n_embd=45, n_head=3, n_layer=2, n_positions=64, bos_token_id=1,
                      eos_token_id=2)


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertModel(bert_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config()).save_pretrained(path)
    return path


def close_on_tokens(got, expected, mask):
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-4, atol=1e-5)


def test_registered_with_both_interfaces():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["bignlp_fast"] is bignlp_fast.hf.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["bignlp_fast"] is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    assert bignlp_fast.hf.is_registered()


def test_bert_from_pretrained_matches_eager_on_a_padded_batch(backend, calls, bert_path):
    eager = AutoModel.from_pretrained(bert_path, attn_implementation="eager").eval()
    ours = AutoModel.from_pretrained(bert_path, attn_implementation="bignlp_fast").eval()
    assert ours.config._attn_implementation == "bignlp_fast"
    ids, mask = padded_batch([11, 7, 3], 11, left=False)
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask).last_hidden_state
    assert calls["n"] == 2  # one call per layer
    close_on_tokens(got, expected, mask)


@pytest.mark.parametrize("is_decoder", [False, True])
def test_bert_config_switch_matches_eager(backend, calls, is_decoder):
    torch.manual_seed(0)
    model = BertModel(bert_config(is_decoder=is_decoder)).eval()
    model.config._attn_implementation = "eager"
    ids, mask = padded_batch([9, 4], 9, left=False)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
        model.config._attn_implementation = "bignlp_fast"
        got = model(ids, attention_mask=mask).last_hidden_state
        unpadded = model(ids[:1]).last_hidden_state  # no mask at all: bidirectional or is_causal
    assert calls["n"] == 4
    close_on_tokens(got, expected, mask)
    torch.testing.assert_close(unpadded, expected[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padded", [True, False])
def test_gpt2_matches_eager(backend, calls, gpt2_path, padded):
    eager = AutoModelForCausalLM.from_pretrained(gpt2_path, attn_implementation="eager").eval()
    ours = AutoModelForCausalLM.from_pretrained(gpt2_path, attn_implementation="bignlp_fast").eval()
    ids, mask = padded_batch([10, 6, 2] if padded else [10, 10, 10], 10, left=True)
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert calls["n"] == 2
    close_on_tokens(got, expected, mask)  # left-padding queries see no key: zeros here, an average in eager
    assert torch.isfinite(got).all()


def test_gpt2_greedy_generation_matches_eager(backend, calls, gpt2_path):
    eager = AutoModelForCausalLM.from_pretrained(gpt2_path, attn_implementation="eager").eval()
    ours = AutoModelForCausalLM.from_pretrained(gpt2_path, attn_implementation="bignlp_fast").eval()
    ids, mask = padded_batch([8, 5, 2], 8, left=True)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = eager.generate(ids, **kwargs)
        got = ours.generate(ids, **kwargs)
    assert calls["n"] == 2 * 12  # prefill and 11 decoding steps, two layers each
    assert torch.equal(got, expected)


def test_gradients_match_eager(backend, bert_path):
    eager = AutoModel.from_pretrained(bert_path, attn_implementation="eager").eval()
    ours = AutoModel.from_pretrained(bert_path, attn_implementation="bignlp_fast").eval()
    ids, mask = padded_batch([7, 4], 7, left=False)
    weights = torch.randn(2, 7, 45) * mask[..., None]  # a random linear loss (the sum of squares of a
    grads = []                                           # LayerNorm output would have no gradient to speak of)
    for model in (eager, ours):
        out = model(ids, attention_mask=mask).last_hidden_state
        (out * weights).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for g_ours, g_eager in zip(grads[1], grads[0]):
        if g_eager is not None:
            torch.testing.assert_close(g_ours, g_eager, rtol=1e-4, atol=1e-5)


def _module(is_causal=True, groups=1):
    return types.SimpleNamespace(is_causal=is_causal, num_key_value_groups=groups, layer_idx=0)


@pytest.mark.parametrize("case", ["bidirectional", "causal", "causal_longer_kv", "decode", "bool_mask",
                                  "float_mask", "gqa", "gqa_mask", "gqa_decode", "kwarg_not_causal",
                                  "position_bias", "position_bias_causal", "position_bias_mask", "batch_broadcast"])
def test_attention_function_mirrors_transformers_sdpa(backend, case):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    b, hq, lq, lk, d = 2, 4, 6, 6, 15
    hk = 2 if case.startswith("gqa") else hq
    if case in ("causal_longer_kv",):
        lk = 9
    if case.endswith("decode"):
        lq, lk = 1, 9
    q = torch.randn(1 if case == "batch_broadcast" else b, hq, lq, d)
    k, v = torch.randn(b, hk, lk, d), torch.randn(b, hk, lk, d)
    module = _module(is_causal=case not in ("bidirectional", "bool_mask", "float_mask"), groups=hq // hk)
    kwargs = {}
    mask = None
    if case in ("bool_mask", "gqa_mask", "position_bias_mask"):
        mask = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        mask[1, ..., lk - 2:] = False
        mask = mask.expand(b, 1, lq, lk)  # as transformers' sdpa_mask hands it out
    if case == "float_mask":
        mask = torch.randn(b, 1, lq, lk)
    if case == "kwarg_not_causal":
        kwargs["is_causal"] = False
    if case.startswith("position_bias"):
        kwargs["position_bias"] = torch.randn(1, hq, lq, lk)
    got, weights = bignlp_fast.hf.attention_forward(module, q, k, v, mask, scaling=0.3, **kwargs)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3, **kwargs)
    assert weights is None and got.is_contiguous() and got.shape == expected.shape
    torch.testing.assert_close(got, expected)


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=SUBPROCESS_CWD)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_does_not_import_transformers_and_registers_on_its_import():
    _python("import sys, bignlp_fast\n"
            "assert 'transformers' not in sys.modules\n"
            "from transformers import AttentionInterface\n"
            "import transformers.masking_utils as mu\n"
            "assert bignlp_fast.hf.is_registered() and 'bignlp_fast' in mu.ALL_MASK_ATTENTION_FUNCTIONS\n"
            "assert not any(isinstance(f, bignlp_fast.hf._PostImportHook) for f in sys.meta_path)\n")


def test_import_after_transformers_registers_at_once():
    _python("import sys, transformers.modeling_utils, transformers.masking_utils as mu, bignlp_fast\n"
            "assert bignlp_fast.hf.is_registered() and 'bignlp_fast' in mu.ALL_MASK_ATTENTION_FUNCTIONS\n"
            "assert not any(isinstance(f, bignlp_fast.hf._PostImportHook) for f in sys.meta_path)\n")


# ---- other architectures through the same AttentionInterface ----------------------------------------
def _small(cls_name, **kwargs):
    """A small model of transformers' class ``cls_name`` (its config: the class's family + "Config")."""
    family = re.match(r"(.+?)(Model|ForCausalLM|ForConditionalGeneration)$", cls_name).group(1)
    cls, config_cls = getattr(transformers, cls_name, None), getattr(transformers, family + "Config", None)
    if cls is None or config_cls is None:
        pytest.skip(f"this transformers ({transformers.__version__}) has no {cls_name}")
    torch.manual_seed(0)
    config = config_cls(vocab_size=101, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)
    return cls(config).eval()


_ENCODER = dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96)
_DECODER = dict(_ENCODER, num_key_value_heads=2)  # grouped-query attention: 2 key/value heads for 4
_SEQ2SEQ = dict(d_model=48, encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=2, decoder_layers=2,
                encoder_ffn_dim=96, decoder_ffn_dim=96, dropout=0.0, decoder_start_token_id=2)
ARCHITECTURES = {  # class, config, layers that run attention in one forward, decoder-only
    "roberta": ("RobertaModel", dict(_ENCODER, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), 2, False),
    "distilbert": ("DistilBertModel", dict(dim=48, n_heads=4, n_layers=2, hidden_dim=96, dropout=0.0,
                                           attention_dropout=0.0), 2, False),
    "llama": ("LlamaForCausalLM", _DECODER, 2, True),
    "qwen2": ("Qwen2ForCausalLM", _DECODER, 2, True),
    "gpt_neox": ("GPTNeoXForCausalLM", dict(_ENCODER, hidden_dropout=0.0, attention_dropout=0.0), 2, True),
    "t5": ("T5Model", dict(d_model=48, d_kv=12, num_heads=4, num_layers=2, d_ff=96, dropout_rate=0.0,
                          decoder_start_token_id=0), 6, False),  # relative position bias on every layer
    "bart": ("BartModel", _SEQ2SEQ, 6, False),  # encoder, decoder self- and cross-attention
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_other_architectures_match_eager_after_optimize(calls, arch):
    """optimize() on encoders, decoders with grouped-query attention and rotary positions, and
    encoder-decoders with relative position bias or cross-attention: our attention runs in every
    layer, nothing is skipped, and the outputs on a padded batch are eager's."""
    cls_name, config, attention_calls, decoder = ARCHITECTURES[arch]
    eager = _small(cls_name, **config)
    eager.set_attn_implementation("eager")
    report = bignlp_fast.optimize(eager, inplace=False)
    ours = report.model
    assert ours.config._attn_implementation == "bignlp_fast" and report.skipped == []
    ids, mask = padded_batch([9, 6, 3], 9, left=decoder, low=3)
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if not decoder and "decoder_layers" in config or arch == "t5":
        kwargs.update(decoder_input_ids=ids[:, :5])
    with torch.no_grad():
        expected, got = eager(**kwargs), ours(**kwargs)
    assert calls["n"] == attention_calls
    if decoder:
        close_on_tokens(got.logits, expected.logits, mask)
    elif "decoder_input_ids" in kwargs:  # the decoder's states: every position, the encoder's padding masked
        torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-5)
        close_on_tokens(got.encoder_last_hidden_state, expected.encoder_last_hidden_state, mask)
    else:
        close_on_tokens(got.last_hidden_state, expected.last_hidden_state, mask)


@pytest.mark.parametrize("arch", ["llama", "t5", "bart"])
def test_other_architectures_generate_as_eager(calls, arch):
    """Greedy generation with transformers' caches (left-padded prompts for the decoder-only model)."""
    cls_name, config, _, decoder = ARCHITECTURES[arch]
    if not decoder:
        cls_name = cls_name.replace("Model", "ForConditionalGeneration")
    eager = _small(cls_name, **config)
    eager.set_attn_implementation("eager")
    ours = bignlp_fast.optimize(eager, inplace=False).model
    ids, mask = padded_batch([8, 5, 2], 8, left=decoder, low=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = eager.generate(ids, **kwargs)
        got = ours.generate(ids, **kwargs)
    assert calls["n"] > 0
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", ["roberta", "llama"])
def test_optimized_models_compile_with_fullgraph(calls, arch):
    """torch.compile(fullgraph=True) of an optimized transformers model: our attention function and
    the swapped modules trace without a graph break (aot_eager: the ops' fake kernels and autograd
    formulas too), on a padded batch."""
    cls_name, config, attention_calls, decoder = ARCHITECTURES[arch]
    eager = _small(cls_name, **config)
    eager.set_attn_implementation("eager")
    ours = bignlp_fast.optimize(eager, inplace=False).model
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    ids, mask = padded_batch([9, 6, 3], 9, left=decoder, low=3)
    with torch.no_grad():
        expected, got = eager(input_ids=ids, attention_mask=mask)[0], compiled(input_ids=ids, attention_mask=mask)[0]
    assert calls["n"] == attention_calls  # traced once through our function
    close_on_tokens(got, expected, mask)


# ---- padding-free batches: sequences packed into one row --------------------------------------------
PACKED_LENGTHS = [5, 9, 3]
PACKED_MODELS = {  # class, config; the decoders run without a cache (transformers packs only then)
    "bert": ("BertModel", _ENCODER),
    "gpt2": ("GPT2Model", dict(n_embd=48, n_head=4, n_layer=2)),
    "llama": ("LlamaModel", _DECODER),  # grouped-query attention, rotary positions
}


@pytest.mark.parametrize("source", ["flash_kwargs", "position_ids"])
@pytest.mark.parametrize("arch", list(PACKED_MODELS))
def test_packed_sequences_run_varlen_and_match_each_sequence_alone(backend, calls, arch, source):
    """A padding-free row (DataCollatorWithFlattening's format): with flash-attention's kwargs, or with
    position_ids alone (transformers then builds a block-diagonal mask), each layer runs varlen_attention
    over the sequences, and each sequence's states are those of the sequence run alone with "eager"."""
    cls_name, config = PACKED_MODELS[arch]
    model = _small(cls_name, **config)
    decoder = arch != "bert"
    torch.manual_seed(2)
    seqs = [torch.randint(3, 101, (n,)) for n in PACKED_LENGTHS]
    cu = torch.tensor([0, *torch.tensor(PACKED_LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    kwargs = dict(position_ids=torch.cat([torch.arange(n) for n in PACKED_LENGTHS])[None])
    if source == "flash_kwargs":
        longest = max(PACKED_LENGTHS)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    if decoder:
        kwargs["use_cache"] = False
    with torch.no_grad():
        model.set_attn_implementation("eager")
        alone = [model(s[None]).last_hidden_state[0] for s in seqs]
        model.set_attn_implementation("bignlp_fast")
        got = model(torch.cat(seqs)[None], **kwargs).last_hidden_state[0]
    assert calls["varlen"] == 2 and calls["dense"] == 0  # one call per layer, none dense
    for s, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        torch.testing.assert_close(got[start:end], alone[s], rtol=1e-4, atol=1e-5)


def test_packed_gradients_match_eager(backend, calls, bert_path):
    """Training on a packed row: the parameters' gradients through varlen_attention are eager's, whose
    block-diagonal mask comes from the same position_ids."""
    eager = AutoModel.from_pretrained(bert_path, attn_implementation="eager")
    ours = AutoModel.from_pretrained(bert_path, attn_implementation="bignlp_fast")
    torch.manual_seed(3)
    ids = torch.randint(3, 101, (1, sum(PACKED_LENGTHS)))
    position_ids = torch.cat([torch.arange(n) for n in PACKED_LENGTHS])[None]
    weights = torch.randn(1, ids.shape[1], 45)
    grads = []
    for model in (eager, ours):
        out = model(ids, position_ids=position_ids).last_hidden_state
        (out * weights).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert calls["varlen"] == 2
    for g_ours, g_eager in zip(grads[1], grads[0]):
        if g_eager is not None:
            torch.testing.assert_close(g_ours, g_eager, rtol=1e-4, atol=1e-5)


def _packed_reference(q, k, v, cu_q, cu_k, causal, scaling):
    """Each sequence through torch's SDPA alone: q [Tq, H, D], k/v [Tk, Hk, D] -> [Tq, H, D]."""
    out = []
    for s in range(len(cu_q) - 1):
        qs, ks, vs = (t[c[s]:c[s + 1]].transpose(0, 1) for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        lq, lk = qs.shape[1], ks.shape[1]
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq) if causal else None  # bottom-right
        ks, vs = (t.repeat_interleave(q.shape[1] // k.shape[1], 0) for t in (ks, vs))
        out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, mask, scale=scaling).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("case", ["bidirectional", "causal", "causal_longer_kv", "gqa", "flattened_batch"])
def test_attention_function_takes_flash_attention_kwargs(backend, calls, case):
    """cu_seq_lens_q/k and max_length_q/k without a mask: the sequences they state, over the batch and
    length axes flattened into tokens (flash-attention's varlen path), causal bottom-right aligned."""
    torch.manual_seed(0)
    b, hq, d = (2, 4, 15) if case == "flattened_batch" else (1, 4, 15)
    hk = 2 if case == "gqa" else hq
    cu_q = torch.tensor([0, 4, 9, 14] if case == "flattened_batch" else [0, 4, 9, 11], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 12, 16], dtype=torch.int32) if case == "causal_longer_kv" else cu_q
    lq, lk = int(cu_q[-1]) // b, int(cu_k[-1]) // b
    q, k, v = torch.randn(b, hq, lq, d), torch.randn(b, hk, lk, d), torch.randn(b, hk, lk, d)
    causal = case.startswith("causal")
    kwargs = dict(cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=int(cu_q.diff().max()),
                  max_length_k=int(cu_k.diff().max()))
    got, weights = bignlp_fast.hf.attention_forward(_module(is_causal=causal, groups=hq // hk), q, k, v, None,
                                                    scaling=0.3, **kwargs)
    flat = [t.transpose(1, 2).flatten(0, 1) for t in (q, k, v)]
    expected = _packed_reference(*flat, cu_q, cu_k, causal, 0.3).view(b, lq, hq, d)
    assert calls["varlen"] == 1 and weights is None and got.is_contiguous()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("case", ["padding_inside", "kwargs_disagree", "float_mask", "not_restarting"])
def test_a_mask_the_packing_does_not_explain_keeps_the_dense_path(calls, case):
    """Where a mask comes with the packing, varlen runs only if the mask is exactly the packing's
    block-diagonal; otherwise the mask is applied as given, as transformers' sdpa does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    lengths = [4, 5, 3]
    t = sum(lengths)
    q, k, v = (torch.randn(1, 4, t, 15) for _ in range(3))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    mask = (seq[:, None] == seq[None, :]).view(1, 1, t, t)
    kwargs = dict(position_ids=position_ids)
    if case == "padding_inside":
        mask = mask.clone()
        mask[..., 2] = False  # a padded key in the first sequence
    elif case == "kwargs_disagree":
        cu = torch.tensor([0, 6, 12], dtype=torch.int32)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)
    elif case == "float_mask":
        mask = torch.zeros(1, 1, t, t).masked_fill(~mask, float("-inf"))
    elif case == "not_restarting":  # the first sequence does not start at the row's smallest position
        kwargs["position_ids"] = position_ids + (torch.arange(t) < lengths[0])[None]
    module = _module(is_causal=False)
    got, _ = bignlp_fast.hf.attention_forward(module, q, k, v, mask, scaling=0.3, **kwargs)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3, **kwargs)
    assert calls["varlen"] == 0 and calls["dense"] == 1
    torch.testing.assert_close(got, expected)
