"""CPU autocast: the ops that stand for torch's convolutions and scaled_dot_product_attention follow
autocast's "lower_precision_fp" policy as torch's do (floating inputs other than float64 cast to the
autocast dtype), so a drop-in gives the dtype torch gives and runs the bf16 kernels, with no fallback.

Each case checks, under torch.autocast("cpu", bfloat16): the output's dtype is torch's counterpart's;
the output equals our op called outside autocast on inputs cast to bfloat16 by hand (the same kernel
on the same inputs: bitwise); float32 leaves get float32 gradients; nothing fell back. nn.Linear, the RNN
layers and LayerNorm have their own autocast tests (test_linear, test_rnn, test_add_layer_norm).
"""
import pytest
import torch
import torch.nn.functional as F

import bignlp_fast
from bignlp_fast import nn, ops

BF16 = torch.bfloat16


def _leaves(*shapes):
    torch.manual_seed(0)
    return [torch.randn(s, requires_grad=True) for s in shapes]


def _bf16(ts):
    return [t.detach().to(BF16) for t in ts]


CASES = {
    # name: (leaf shapes, our op on leaves, torch's counterpart on leaves)
    "sdpa": ([(2, 3, 9, 16)] * 3,
             lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True),
             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    "sdpa 3-d": ([(3, 9, 16)] * 3,
                 lambda q, k, v: ops.scaled_dot_product_attention(q, k, v),
                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
    "conv1d": ([(2, 8, 20), (6, 8, 3), (6,)],
               lambda x, w, b: ops.conv1d(x, w, b, padding=1, activation="gelu"),
               lambda x, w, b: F.gelu(F.conv1d(x, w, b, padding=1))),
    "conv2d": ([(2, 4, 9, 7), (5, 4, 3, 3), (5,)],
               lambda x, w, b: ops.conv2d(x, w, b, stride=2, activation="relu"),
               lambda x, w, b: F.relu(F.conv2d(x, w, b, stride=2))),
    "causal_conv1d": ([(2, 6, 11), (6, 1, 4), (6,)],
                      lambda x, w, b: ops.causal_conv1d(x, w, b, "silu"),
                      lambda x, w, b: F.silu(F.conv1d(x, w, b, padding=3, groups=6)[..., :11])),
    "linear": ([(4, 8), (3, 8), (3,)],
               lambda x, w, b: ops.linear(x, w, b),
               lambda x, w, b: F.linear(x, w, b)),
    "text_cnn_pool": ([(2, 12, 8), (5, 8, 3), (4, 8, 2), (5,), (4,)],
                      lambda x, w1, w2, b1, b2: ops.text_cnn_pool(x, [w1, w2], [b1, b2]),
                      lambda x, w1, w2, b1, b2: torch.cat([F.relu(F.conv1d(x.transpose(1, 2), w, b)).amax(-1)
                                                           for w, b in ((w1, b1), (w2, b2))], 1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_follows_cpu_autocast(case):
    shapes, ours, theirs = CASES[case]
    leaves = _leaves(*shapes)
    with torch.autocast("cpu", dtype=BF16):
        out = ours(*leaves)
        want_dtype = theirs(*leaves).dtype
    assert out.dtype == want_dtype == BF16
    assert torch.equal(out, ours(*_bf16(leaves)))
    out.float().square().sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()
    assert bignlp_fast.report() == []


def test_sdpa_and_multihead_attention_under_cpu_float16_autocast():
    """float16 on the CPU runs in float32 and is rounded back; under fp16 autocast that float32 copy
    was lowered to float16 again, without end (RecursionError)."""
    q, k, v = _leaves((2, 3, 9, 16), (2, 3, 9, 16), (2, 3, 9, 16))
    with torch.autocast("cpu", dtype=torch.float16):
        out = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == want.dtype == torch.float16
    torch.testing.assert_close(out, want, atol=2e-3, rtol=2e-3)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (q, k, v))
    ref = torch.nn.MultiheadAttention(16, 4)
    mha = nn.MultiheadAttention(16, 4)
    mha.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        got, want = mha(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0]
    assert got.dtype == want.dtype == torch.float16
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_varlen_attention_follows_cpu_autocast():
    q, k, v = _leaves((10, 2, 16), (10, 2, 16), (10, 2, 16))
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    with torch.autocast("cpu", dtype=BF16):
        out = ops.varlen_attention(q, k, v, cu, cu, 7, 7, causal=True)
    assert out.dtype == BF16
    assert torch.equal(out, ops.varlen_attention(*_bf16([q, k, v]), cu, cu, 7, 7, causal=True))
    assert bignlp_fast.report() == []


def test_float64_and_autocast_off_are_left_alone():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=BF16):  # autocast never lowers float64 (nor do we)
        assert ops.scaled_dot_product_attention(q, q, q).dtype == torch.float64
    x = torch.randn(1, 3, 9)
    assert ops.conv1d(x, torch.randn(4, 3, 3)).dtype == torch.float32


def test_conv_module_under_autocast_matches_torch_dtype_and_compiles():
    ref = torch.nn.Conv1d(8, 6, 3, padding="same")
    ours = nn.Conv1d(8, 6, 3, padding="same")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 17)
    compiled = torch.compile(ours, fullgraph=True)
    with torch.autocast("cpu", dtype=BF16):
        want = ref(x)
        got, got_compiled = ours(x), compiled(x)
    assert got.dtype == got_compiled.dtype == want.dtype == BF16
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(got_compiled.float(), got.float(), atol=1e-2, rtol=1e-2)


# ---- the models under CPU autocast: bf16 GEMMs, fp32 residual stream (as transformers' models) ----
def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_bert_and_gpt_run_under_cpu_autocast():
    """Mixed dtypes meet in the fused elementwise ops (a bf16 GEMM output and the fp32 residual stream
    in add_layer_norm, a bf16 GEMM output and an fp32 bias in bias_gelu): they take the dtypes eager
    code would have, instead of failing the ops' same-dtype check; GPT's compiled decoding step is
    left to the block-by-block path, whose ops follow autocast."""
    from bignlp_fast.models import BertConfig, BertForSequenceClassification, GPTConfig, GPTLMHeadModel
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=96,
                                                    max_position_embeddings=64)).eval()
    ids, mask = torch.randint(0, 100, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    want = bert.bert(ids, attention_mask=mask).last_hidden_state
    with torch.autocast("cpu", dtype=BF16):
        got = bert.bert(ids, attention_mask=mask).last_hidden_state
        loss = bert(ids, attention_mask=mask, labels=torch.tensor([0, 1, 0])).loss
    assert got.dtype == torch.float32  # the last LayerNorm's input is the fp32 residual stream, as in transformers
    assert _rel_err(got, want) < 2e-2
    loss.backward()
    assert all(p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
               for p in bert.parameters())

    gpt = GPTLMHeadModel(GPTConfig(vocab_size=100, n_embd=48, n_layer=2, n_head=4, n_positions=64)).eval()
    ids = torch.randint(0, 100, (2, 7))
    want = gpt(ids).logits
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        got = gpt(ids).logits
        tokens = gpt.generate(ids, max_new_tokens=3, eos_token_id=[])  # prefill, then decoding steps
    assert got.dtype == BF16 and _rel_err(got, want) < 2e-2
    assert tokens.shape == (2, 10) and torch.equal(tokens[:, :7], ids)
    assert bignlp_fast.report() == []


def test_autocast_enabled_per_device_type():
    """The quick "no autocast anywhere" answer (torch._C._is_any_autocast_enabled) agrees with torch's
    per-device one, and a device type autocast does not know (meta) is never on."""
    from bignlp_fast.ops._common import autocast_enabled, autocast_lower
    x = torch.randn(2, 3)
    assert not autocast_enabled("cpu") and autocast_lower(x.device, x)[0] is x
    with torch.autocast("cpu", dtype=BF16):
        assert autocast_enabled("cpu") and not autocast_enabled("meta")
        assert autocast_lower(x.device, x)[0].dtype == BF16
        with torch.autocast("cpu", enabled=False):
            assert not autocast_enabled("cpu")
    assert not autocast_enabled("cpu")
