"""attn_implementation="bignlp_fast" in Hugging Face transformers, against "eager" and "sdpa"."""

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
