"""bignlp_fast.optimize: swapping torch.nn modules (and HF attention) in place, against the original model."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import bignlp_fast.nn as bnn
from bignlp_fast import OptimizeReport, optimize
from conftest import HAS_CUDA, SUBPROCESS_CWD, padded_batch

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: the fused kernels sum in another order than torch's


class Net(nn.Module):
    """Embedding + self-attention + LayerNorm + bidirectional LSTM + GRU + Conv1d + Conv2d + Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.lstm = nn.LSTM(16, 12, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(24, 10, num_layers=2, batch_first=True)
        self.conv1 = nn.Conv1d(10, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3 * 8, 5)

    def forward(self, ids, pad):  # ids [B, L]; pad [B, L] bool, True = padding
        x = self.emb(ids)
        a, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        x = self.norm(x + a)
        x, _ = self.lstm(x)  # [B, L, 24]
        x, _ = self.gru(x)  # [B, L, 10]
        x = torch.relu(self.conv1(x.transpose(1, 2)))  # [B, 8, L]
        x = torch.relu(self.conv2(x.unsqueeze(1)))  # [B, 3, 8, L]
        return self.head(x.mean(-1).flatten(1))  # [B, 5]


NET_SWAPS = [("attn", "torch.nn.MultiheadAttention", "bignlp_fast.nn.MultiheadAttention"),
             ("norm", "torch.nn.LayerNorm", "bignlp_fast.nn.LayerNorm"),
             ("lstm", "torch.nn.LSTM", "bignlp_fast.nn.LSTM"),
             ("gru", "torch.nn.GRU", "bignlp_fast.nn.GRU"),
             ("conv1", "torch.nn.Conv1d", "bignlp_fast.nn.Conv1d"),
             ("conv2", "torch.nn.Conv2d", "bignlp_fast.nn.Conv2d"),
             ("head", "torch.nn.Linear", "bignlp_fast.nn.Linear")]


def batch():
    torch.manual_seed(1)
    ids = torch.randint(1, 50, (3, 9))
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    pad[2, 2:] = True
    return ids.masked_fill(pad, 0), pad


def net(train=False):
    torch.manual_seed(0)
    return Net().train(train)


def test_same_outputs_state_dict_and_parameter_objects():
    model = net()
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids, pad = batch()

    report = optimize(model)

    assert isinstance(report, OptimizeReport) and report.model is model
    assert report.swapped == NET_SWAPS and report.skipped == []
    for name, cls in [("attn", bnn.MultiheadAttention), ("norm", bnn.LayerNorm), ("lstm", bnn.LSTM),
                      ("gru", bnn.GRU), ("conv1", bnn.Conv1d), ("conv2", bnn.Conv2d), ("head", bnn.Linear)]:
        assert type(getattr(model, name)) is cls
    assert type(model.emb) is nn.Embedding
    new_params = dict(model.named_parameters())
    assert new_params.keys() == params.keys()
    assert all(new_params[k] is p for k, p in params.items())
    new_state = model.state_dict()
    assert list(new_state) == list(state)
    for k, v in state.items():
        assert torch.equal(new_state[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pad), ref(ids, pad), **TOL)


def test_training_step_matches_and_an_optimizer_built_before_keeps_working():
    model = net(train=True)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before optimize
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    optimize(model)
    assert model.training and all(m.training for m in model.modules())
    ids, pad = batch()
    target = torch.randn(3, 5)
    for m, o in ((model, opt), (ref, ref_opt)):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(ids, pad), target).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, **TOL, msg=name)
    before = model.lstm.weight_hh_l0.detach().clone()
    opt.step()
    ref_opt.step()
    assert not torch.equal(model.lstm.weight_hh_l0, before)  # the optimizer still holds the module's parameters
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], **TOL, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pad), ref(ids, pad), **TOL)


class MyLSTM(nn.LSTM):
    """A user's subclass: its forward may differ from torch's, so it is not swapped."""


def mixed_model():
    torch.manual_seed(0)
    m = nn.ModuleDict({
        "proj_lstm": nn.LSTM(6, 8, num_layers=2, proj_size=3, bidirectional=True),
        "circular": nn.Conv1d(6, 4, 3, padding=1, padding_mode="circular"),
        "cell": nn.GRUCell(6, 5),
        "mine": MyLSTM(6, 4),
        "bias_kv": nn.MultiheadAttention(6, 2, add_bias_kv=True),
        "zero_attn": nn.MultiheadAttention(6, 2, add_zero_attn=True),
        "float64": nn.LSTM(6, 4).double(),
        "half_norm": nn.LayerNorm(6).half(),
        "weight_norm": nn.Conv1d(6, 4, 3),
        "ours": bnn.GRU(6, 4),
    })
    torch.nn.utils.parametrizations.weight_norm(m["weight_norm"])
    return m


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")  # torch's, on the reference
def test_report_lists_what_was_swapped_and_what_was_skipped_with_reasons():
    model = mixed_model()
    ref = copy.deepcopy(model)
    report = optimize(model)
    assert report.swapped == [("proj_lstm", "torch.nn.LSTM", "bignlp_fast.nn.LSTM"),
                              ("circular", "torch.nn.Conv1d", "bignlp_fast.nn.Conv1d"),
                              ("cell", "torch.nn.GRUCell", "bignlp_fast.nn.GRUCell")]
    skipped = {name: (type_, reason) for name, type_, reason in report.skipped}
    assert list(skipped) == ["mine", "bias_kv", "zero_attn", "float64", "half_norm", "weight_norm", "ours"]
    assert skipped["mine"] == (f"{__name__}.MyLSTM", "subclass of torch.nn.LSTM; not swapped")
    assert skipped["bias_kv"][1].startswith("add_bias_kv=True")
    assert skipped["zero_attn"][1].startswith("add_zero_attn=True")
    assert "float64" in skipped["float64"][1] and "torch reference" in skipped["float64"][1]
    assert "float16" in skipped["half_norm"][1]
    assert "parametrized" in skipped["weight_norm"][1]
    assert skipped["ours"] == ("bignlp_fast.nn.GRU", "already optimized")
    for name, (type_, _) in skipped.items():
        assert type(model[name]) is type(ref[name]), name  # left exactly as they were

    # the swapped configurations run the fused path with torch's results
    x = torch.randn(7, 2, 6)
    with torch.no_grad():
        for got, want in zip(model["proj_lstm"](x)[1], ref["proj_lstm"](x)[1]):
            torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(model["proj_lstm"](x)[0], ref["proj_lstm"](x)[0], **TOL)
        xc = torch.randn(2, 6, 11)
        torch.testing.assert_close(model["circular"](xc), ref["circular"](xc), **TOL)
        torch.testing.assert_close(model["cell"](x[0]), ref["cell"](x[0]), **TOL)


def test_second_call_reports_everything_as_already_optimized():
    model = net()
    optimize(model)
    types = [type(m) for m in model.modules()]
    report = optimize(model)
    assert report.swapped == []
    assert report.skipped == [(name, to, "already optimized") for name, _, to in NET_SWAPS]
    assert [type(m) for m in model.modules()] == types
    assert report.summary() == "bignlp_fast.optimize: swapped 0, skipped 7 (7 already optimized)"


def test_transformer_encoder_layers_say_that_inference_bypasses_the_swapped_modules(monkeypatch):
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    report = optimize(encoder)
    assert [(name, kind) for name, kind, _ in report.skipped] == [
        (f"layers.{i}", "torch.nn.modules.transformer.TransformerEncoderLayer") for i in range(2)]
    assert "fused encoder layer" in report.skipped[0][2]
    assert {to for _, _, to in report.swapped} == {"bignlp_fast.nn.MultiheadAttention", "bignlp_fast.nn.LayerNorm",
                                                   "bignlp_fast.nn.Linear"}
    # what the row says: in inference the swapped attention never runs, with the fast path off it does
    calls = []
    forward = bnn.MultiheadAttention.forward
    monkeypatch.setattr(bnn.MultiheadAttention, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        encoder(x)
        assert calls == []
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            encoder(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)
    assert len(calls) == 2


def test_root_module_is_swapped_in_place():
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 7, batch_first=True)
    ref = copy.deepcopy(lstm)
    weight = lstm.weight_ih_l0
    report = optimize(lstm)
    assert type(lstm) is bnn.LSTM and report.model is lstm and lstm.weight_ih_l0 is weight
    assert report.swapped == [("", "torch.nn.LSTM", "bignlp_fast.nn.LSTM")]
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(lstm(x)[0], ref(x)[0], **TOL)
    assert "(root)" in str(report)


TORCH_MODULES = {
    "MultiheadAttention": lambda: nn.MultiheadAttention(8, 2, kdim=5, vdim=3, batch_first=True),
    "LSTM": lambda: nn.LSTM(4, 5, num_layers=2, proj_size=2),
    "GRU": lambda: nn.GRU(4, 5, bidirectional=True, bias=False),
    "RNN": lambda: nn.RNN(4, 5, nonlinearity="relu"),
    "LSTMCell": lambda: nn.LSTMCell(4, 5),
    "GRUCell": lambda: nn.GRUCell(4, 5),
    "RNNCell": lambda: nn.RNNCell(4, 5, nonlinearity="relu"),
    "Conv1d": lambda: nn.Conv1d(4, 6, 3, stride=2, groups=2, padding_mode="reflect", padding=1),
    "Conv2d": lambda: nn.Conv2d(4, 6, (3, 2), dilation=2, padding="same"),
    "LayerNorm": lambda: nn.LayerNorm((3, 4), bias=False),
    "Linear": lambda: nn.Linear(4, 3, bias=False),
}


@pytest.mark.parametrize("name", list(TORCH_MODULES))
def test_swapped_module_has_the_state_from_torch_gives(name):
    """Class reassignment must leave a module just as ``from_torch`` would build it."""
    module = TORCH_MODULES[name]()
    module.eval()
    built = getattr(bnn, name).from_torch(module)
    optimize(module)
    assert type(module) is type(built)
    assert vars(module).keys() == vars(built).keys()
    for key in ("backend", "activation", "training"):
        assert getattr(module, key, None) == getattr(built, key, None), key
    assert [n for n, _ in module.named_parameters()] == [n for n, _ in built.named_parameters()]
    assert all(a is b for a, b in zip(module.parameters(), built.parameters()))


def test_training_flags_are_kept():
    model = net(train=True)
    model.lstm.eval()
    model.conv2.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    optimize(model)
    assert {name: m.training for name, m in model.named_modules()} == flags


def test_backend_is_passed_on():
    model = net()
    ref = copy.deepcopy(model)
    report = optimize(model, backend="torch")
    assert len(report.swapped) == 7
    assert all(getattr(model, name).backend == "torch" for name, _, _ in NET_SWAPS)
    ids, pad = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pad), ref(ids, pad), **TOL)
    report = optimize(model, backend="cpu")  # already optimized: the named backend is applied
    assert all(reason == "already optimized; backend set to 'cpu'" for _, _, reason in report.skipped)
    assert model.lstm.backend == "cpu"


def test_a_backend_that_cannot_run_the_module_skips_it():
    lstm = nn.LSTM(3, 3)
    report = optimize(lstm, backend="cuda")
    assert type(lstm) is nn.LSTM and report.swapped == []
    assert report.skipped[0][2].startswith("backend 'cuda' cannot run it")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        optimize(nn.LSTM(2, 2), backend="fast")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        optimize(lambda x: x)


def test_not_inplace_leaves_the_model_alone():
    model = net()
    report = optimize(model, inplace=False)
    assert report.model is not model and type(model.lstm) is nn.LSTM
    assert type(report.model.lstm) is bnn.LSTM and len(report.swapped) == 7
    ids, pad = batch()
    with torch.no_grad():
        torch.testing.assert_close(report.model(ids, pad), model(ids, pad), **TOL)


def test_hooks_shared_modules_and_module_references_are_kept():
    norm = nn.LayerNorm(4)
    model = nn.Sequential(norm, nn.ReLU(), norm)  # one module in two places
    seen = []
    handle = norm.register_forward_hook(lambda m, i, o: seen.append(type(m)))
    report = optimize(model)
    assert report.swapped == [("0", "torch.nn.LayerNorm", "bignlp_fast.nn.LayerNorm")]
    assert model[0] is norm and model[2] is norm and type(norm) is bnn.LayerNorm
    model(torch.randn(2, 4))
    assert seen == [bnn.LayerNorm, bnn.LayerNorm]
    handle.remove()
    model(torch.randn(2, 4))
    assert len(seen) == 2


def test_children_of_bignlp_fast_modules_are_theirs():
    model = nn.Sequential(bnn.TextCNN(8, 4, widths=(2, 3)))
    report = optimize(model)
    assert report.swapped == [] and report.skipped == []
    assert all(type(c) is nn.Conv1d for c in model[0].convs)


def test_str_is_a_table():
    report = optimize(mixed_model())
    text = str(report)
    assert text.splitlines()[0] == report.summary()
    assert report.summary() == ("bignlp_fast.optimize: swapped 3 (1 Conv1d, 1 GRUCell, 1 LSTM), skipped 7 "
                                "(1 already optimized)")
    assert "swapped:" in text and "skipped:" in text
    assert "  mine       " in text and "subclass of torch.nn.LSTM; not swapped" in text


def test_does_not_import_transformers():
    code = ("import sys, torch\n"
            "from bignlp_fast import optimize\n"
            "r = optimize(torch.nn.Sequential(torch.nn.LSTM(2, 2), torch.nn.LayerNorm(2)))\n"
            "assert len(r.swapped) == 2, r\n"
            "assert 'transformers' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=SUBPROCESS_CWD)
    assert done.returncode == 0, done.stderr


# ---- Hugging Face ---------------------------------------------------------------------------------
@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


def close_on_tokens(got, expected, mask):
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-4, atol=1e-5)


def test_hf_bert_inside_a_user_model_matches_eager(transformers, calls):
    config = transformers.BertConfig(vocab_size=101, hidden_size=45, num_attention_heads=3, num_hidden_layers=2,
                                     intermediate_size=70, max_position_embeddings=64)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertModel(config)
            self.lstm = nn.LSTM(45, 8, batch_first=True)

        def forward(self, ids, mask):
            return self.lstm(self.bert(ids, attention_mask=mask).last_hidden_state)[0]

    torch.manual_seed(0)
    model = Tagger().eval()
    model.bert.set_attn_implementation("eager")
    ref = copy.deepcopy(model)
    report = optimize(model)

    assert model.bert.config._attn_implementation == "bignlp_fast"
    assert report.swapped[0] == ("bert", "BertModel(attn_implementation='eager')",
                                 "BertModel(attn_implementation='bignlp_fast')")
    names = [name for name, _, _ in report.swapped]
    assert sum(n.endswith("LayerNorm") for n in names) == 5 and names[-1] == "lstm"
    # every Linear of the BERT (query, key, value, the attention's and the MLP's dense layers, the pooler)
    linears = [n for n, m in ref.named_modules() if type(m) is nn.Linear]
    assert len(linears) == 2 * 6 + 1 and set(linears) <= set(names)
    assert report.skipped == []
    assert all(type(m) is bnn.LayerNorm for n, m in model.named_modules() if n.endswith("LayerNorm"))
    assert all(type(dict(model.named_modules())[n]) is bnn.Linear for n in linears)
    ids, mask = padded_batch([11, 7, 3], 11, left=False, low=3)
    with torch.no_grad():
        expected = ref.bert(ids, attention_mask=mask).last_hidden_state
        got = model.bert(ids, attention_mask=mask).last_hidden_state
        assert calls["n"] == 2  # one call per layer: our attention ran
        close_on_tokens(got, expected, mask)
        torch.testing.assert_close(model(ids[:1], mask[:1]), ref(ids[:1], mask[:1]), rtol=1e-4, atol=1e-5)
    assert "already optimized (attn_implementation='bignlp_fast')" in str(optimize(model))


# BERT-family encoder stacks that optimize() makes run padded batches unpadded (hf.UNPADDED_ENCODERS)
_ENCODER_FAMILIES = {  # model class -> config class, the encoder's attribute path in the model
    "BertModel": ("BertConfig", "encoder"),
    "RobertaModel": ("RobertaConfig", "encoder"),
    "XLMRobertaModel": ("XLMRobertaConfig", "encoder"),
    "CamembertModel": ("CamembertConfig", "encoder"),
    "ElectraModel": ("ElectraConfig", "encoder"),
    "ErnieModel": ("ErnieConfig", "encoder"),
    "Data2VecTextModel": ("Data2VecTextConfig", "encoder"),
    "XLMRobertaXLModel": ("XLMRobertaXLConfig", "encoder"),
    "RobertaPreLayerNormModel": ("RobertaPreLayerNormConfig", "encoder"),
    "AlbertModel": ("AlbertConfig", "encoder"),
    "DistilBertModel": ("DistilBertConfig", "transformer"),
}


def _small_hf(transformers, model_name, config_name, **kwargs):
    """A tiny transformers model (2 layers, hidden 48, vocab 101) with eager attention."""
    if not hasattr(transformers, model_name):
        pytest.skip(f"this transformers has no {model_name}")
    sizes = (dict(dim=48, n_heads=4, n_layers=2, hidden_dim=96) if config_name == "DistilBertConfig" else
             dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96))
    config = getattr(transformers, config_name)(vocab_size=101, pad_token_id=0, max_position_embeddings=64,
                                                 **sizes, **kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    model.set_attn_implementation("eager")
    return model


def _small_encoder(transformers, model_name, **kwargs):
    return _small_hf(transformers, model_name, _ENCODER_FAMILIES[model_name][0], **kwargs).eval()


@pytest.mark.parametrize("model_name", list(_ENCODER_FAMILIES))
def test_hf_encoders_run_padded_batches_unpadded(transformers, calls, model_name):
    """After optimize(), a padded batch runs on its real tokens: every layer's attention is varlen,
    the states at real tokens (and the pooler's) are eager's, and padding gives zeros. A batch without
    padding (no mask) runs as before."""
    from bignlp_fast import hf

    ref = _small_encoder(transformers, model_name)
    model = copy.deepcopy(ref)
    report = optimize(model)
    encoder = model.get_submodule(_ENCODER_FAMILIES[model_name][1])
    base = type(ref.get_submodule(_ENCODER_FAMILIES[model_name][1]))
    assert type(encoder) is hf.unpadded_encoder_class(base) and isinstance(encoder, base)
    assert (_ENCODER_FAMILIES[model_name][1], f"{base.__module__}.{base.__name__}",
            f"bignlp_fast.hf.{base.__name__} (padded batches run unpadded)") in report.swapped
    assert report.skipped == [] and model.state_dict().keys() == ref.state_dict().keys()
    ids, mask = padded_batch([11, 7, 3], 11, left=False, low=3)
    with torch.no_grad():
        expected, got = ref(ids, attention_mask=mask), model(ids, attention_mask=mask)
        assert calls["varlen"] == 2 and calls["dense"] == 0
        close_on_tokens(got.last_hidden_state, expected.last_hidden_state, mask)
        assert (got.last_hidden_state[mask == 0] == 0).all()
        if getattr(expected, "pooler_output", None) is not None:
            torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-4, atol=1e-5)
        full = model(ids[:1]).last_hidden_state  # the first row has no padding: no mask, the dense path
        assert calls["dense"] == 2
        torch.testing.assert_close(full, expected.last_hidden_state[:1], rtol=1e-4, atol=1e-5)


def test_hf_unpadded_bert_training_gradients_match_eager(transformers, calls):
    """A training step of BertForSequenceClassification on a padded batch, unpadded: the loss and every
    parameter's gradient are eager's (padding never reached a real token there either)."""
    config = transformers.BertConfig(vocab_size=101, hidden_size=48, num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=3)
    torch.manual_seed(0)
    ref = transformers.BertForSequenceClassification(config)
    ref.set_attn_implementation("eager")
    model = optimize(ref, inplace=False).model
    ids, mask = padded_batch([9, 6, 2], 9, left=False, low=3)
    labels = torch.tensor([0, 2, 1])
    losses = [m(ids, attention_mask=mask, labels=labels).loss for m in (ref, model)]
    for loss in losses:
        loss.backward()
    assert calls["varlen"] == 2 and calls["dense"] == 0
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", ["unpad_false", "hidden_states", "decoder", "eager_again"])
def test_hf_encoder_calls_that_stay_padded(transformers, calls, case):
    """Where unpadding is off or cannot run, the encoder runs padded, with eager's results: optimize(...,
    unpad=False) (reported as skipped), output_hidden_states (the layers' states keep their [B, L]
    layout), a causal BERT (its mask is no padding mask), a model switched back to eager attention."""
    ref = _small_encoder(transformers, "BertModel", is_decoder=case == "decoder")
    model = copy.deepcopy(ref)
    report = optimize(model, unpad=case != "unpad_false")
    if case == "unpad_false":
        assert ("encoder", "transformers.models.bert.modeling_bert.BertEncoder",
                "optimize(unpad=False): padded batches run padded") in report.skipped
    if case == "eager_again":
        model.set_attn_implementation("eager")
    ids, mask = padded_batch([11, 7, 3], 11, left=False, low=3)
    kwargs = dict(attention_mask=mask, output_hidden_states=case == "hidden_states")
    if case == "decoder":
        kwargs["use_cache"] = False
    with torch.no_grad():
        expected, got = ref(ids, **kwargs), model(ids, **kwargs)
    assert calls["varlen"] == 0 and calls["dense"] == (0 if case == "eager_again" else 2)
    close_on_tokens(got.last_hidden_state, expected.last_hidden_state, mask)
    if case == "hidden_states":
        assert all(g.shape == e.shape for g, e in zip(got.hidden_states, expected.hidden_states))


# their masked-LM heads (hf.UNPADDED_HEADS): model class -> its encoder family, the head's path
_MLM_FAMILIES = {
    "BertForMaskedLM": ("BertModel", "cls.predictions"),
    "RobertaForMaskedLM": ("RobertaModel", "lm_head"),
    "XLMRobertaForMaskedLM": ("XLMRobertaModel", "lm_head"),
    "CamembertForMaskedLM": ("CamembertModel", "lm_head"),
    "ErnieForMaskedLM": ("ErnieModel", "cls.predictions"),
    "Data2VecTextForMaskedLM": ("Data2VecTextModel", "lm_head"),
    "XLMRobertaXLForMaskedLM": ("XLMRobertaXLModel", "lm_head"),
    "AlbertForMaskedLM": ("AlbertModel", "predictions"),
}


def _small_mlm(transformers, model_name):
    model = _small_hf(transformers, model_name, _ENCODER_FAMILIES[_MLM_FAMILIES[model_name][0]][0],
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for module in model.modules():  # transformers starts them at zero: a zero state would be one LayerNorm's
        if isinstance(module, nn.Linear):  # degenerate case (no variance), every gradient amplified 1e6 times
            nn.init.normal_(module.bias, std=0.1)
    return model


def _rows_into(linear: nn.Module) -> list:
    """The number of rows (positions) each call of ``linear`` gets, appended as it runs."""
    rows = []
    linear.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[:-1].numel()))
    return rows


@pytest.mark.parametrize("model_name", list(_MLM_FAMILIES))
def test_hf_mlm_heads_project_the_real_tokens_only(transformers, calls, model_name):
    """After optimize(), a masked-LM head on the unpadded encoder's state projects the real tokens and
    one zero state: the real tokens' logits are eager's, every padding position gets the logits
    transformers' head computes from a zero state (the encoder's state there). (Under autograd, the
    training test below, it projects the T + 1 rows in one call.)"""
    from bignlp_fast import hf

    ref = _small_mlm(transformers, model_name).eval()
    model = copy.deepcopy(ref)
    report = optimize(model)
    path = _MLM_FAMILIES[model_name][1]
    head, base = model.get_submodule(path), type(ref.get_submodule(path))
    assert type(head) is hf.unpadded_head_class(base) and isinstance(head, base)
    assert (path, f"{base.__module__}.{base.__name__}", f"bignlp_fast.hf.{base.__name__} (logits of the real "
            "tokens only, after the unpadded encoder)") in report.swapped
    rows = _rows_into(head.decoder)
    ids, mask = padded_batch([11, 7, 3], 11, left=False, low=3)
    with torch.no_grad():
        expected, got = ref(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        assert rows == [1, 21] and calls["varlen"] == 2 and got.shape == expected.shape  # the zero state, then T
        close_on_tokens(got, expected, mask)
        zero_state = base.forward(head, torch.zeros(1, ref.config.hidden_size))  # [1, vocab]
        padding = got[mask == 0]
        torch.testing.assert_close(padding, zero_state.expand_as(padding), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding_labels", ["ignored", "counted"])
def test_hf_unpadded_mlm_training_gradients(transformers, calls, padding_labels):
    """A training step of BertForMaskedLM on a padded batch: with the usual labels (-100 at padding) the
    loss and every gradient are eager's; with labels at padding too, they are those of the same
    optimized model whose head projects every position (the zero states' logits there, whose gradients
    reach the head's weights once per padding position)."""
    ref = _small_mlm(transformers, "BertForMaskedLM")
    model = optimize(ref, inplace=False).model
    ids, mask = padded_batch([9, 6, 2], 9, left=False, low=3)
    labels = torch.randint(0, 101, ids.shape, generator=torch.Generator().manual_seed(2))
    if padding_labels == "ignored":
        labels = labels.masked_fill(mask == 0, -100)
    else:  # the reference: every position through transformers' own head
        ref = copy.deepcopy(model)
        ref.cls.predictions.__class__ = type(ref.cls.predictions).__mro__[1]
    rows = _rows_into(model.cls.predictions.decoder)
    losses = [m(ids, attention_mask=mask, labels=labels).loss for m in (ref, model)]
    for loss in losses:
        loss.backward()
    assert rows == [17 + 1]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_hf_mlm_head_on_any_other_state_projects_every_position(transformers):
    """The head takes the short path only on the very state the unpadded encoder returned, unchanged: a
    copy of it, or the state changed in place, is projected at every position. optimize(unpad=False)
    leaves the head alone; an optimized model pickles (the head's class by its name)."""
    import pickle

    model = _small_mlm(transformers, "BertForMaskedLM").eval()
    report = optimize(copy.deepcopy(model), unpad=False)
    assert ("cls.predictions", "transformers.models.bert.modeling_bert.BertLMPredictionHead",
            "optimize(unpad=False): padded batches run padded") in report.skipped
    optimize(model)
    again = pickle.loads(pickle.dumps(model))
    head = model.cls.predictions
    rows = _rows_into(head.decoder)
    ids, mask = padded_batch([8, 5], 8, left=False, low=3)
    with torch.no_grad():
        state = model.bert(ids, attention_mask=mask).last_hidden_state
        first, copied = head(state), head(state.clone())
        state[mask == 0] = 1.0
        changed = head(state)
        assert rows == [1, 13, 16, 16]
        torch.testing.assert_close(first, copied, rtol=1e-5, atol=1e-6)  # the zero states' logits at padding
        torch.testing.assert_close(changed[mask == 0], type(head).__mro__[1].forward(head, state[mask == 0]))
        assert type(again.cls.predictions) is type(head)
        torch.testing.assert_close(again(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_hf_mlm_head_writes_a_large_output_slice_by_slice(transformers, monkeypatch):
    """Without autograd, past _Batch.unpack_projected's max_bytes (256 MB; 1 byte here), the head
    projects 256 real tokens at a time straight into the [B, L, vocab] output: the same logits."""
    from bignlp_fast.models.bert import _Batch

    ref = _small_mlm(transformers, "BertForMaskedLM").eval()
    model = optimize(ref, inplace=False).model
    lengths = torch.randint(20, 65, (8,), generator=torch.Generator().manual_seed(3)).tolist()
    ids, mask = padded_batch(lengths, 64, left=False, low=3)
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        rows = _rows_into(model.cls.predictions.decoder)
        monkeypatch.setattr(_Batch.unpack_projected, "__defaults__", (None, 1))
        sliced = model(ids, attention_mask=mask).logits
        expected = ref(ids, attention_mask=mask).logits
    tokens = int(mask.sum())
    assert tokens > 256 and rows == [1, 256, tokens - 256]
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)
    close_on_tokens(sliced, expected, mask)


def test_an_optimized_hf_mlm_compiles_with_fullgraph(transformers):
    """torch.compile(fullgraph=True) of an optimized BertForMaskedLM: the encoder and the head take their
    padded paths while traced (no graph break), with eager's logits at real tokens."""
    ref = _small_mlm(transformers, "BertForMaskedLM").eval()
    compiled = torch.compile(optimize(ref, inplace=False).model, fullgraph=True, backend="aot_eager")
    ids, mask = padded_batch([8, 5, 2], 8, left=False, low=3)
    with torch.no_grad():
        close_on_tokens(compiled(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits, mask)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hf_bert_unpadded_and_packed_on_a_gpu(transformers, calls, dtype):
    """On a GPU (.ci/gpu-check runs it): transformers' BERT after optimize() on a padded batch (the
    unpadded encoder, varlen attention on the automatic backend) and on the same tokens packed in one
    row, against eager in the same dtype, at real tokens."""
    ref = _small_encoder(transformers, "BertModel").to("cuda", dtype)
    model = copy.deepcopy(ref)
    optimize(model)
    ids, mask = (t.cuda() for t in padded_batch([11, 7, 3], 11, left=False, low=3))
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).last_hidden_state
        got = model(ids, attention_mask=mask).last_hidden_state
        lengths = mask.sum(1).tolist()
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        packed = model(ids[mask.bool()][None], position_ids=torch.cat([torch.arange(n) for n in lengths])[None].cuda(),
                       cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths),
                       max_length_k=max(lengths)).last_hidden_state[0]
    assert calls["varlen"] == 4 and calls["dense"] == 0
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(packed, expected[keep], rtol=2e-2, atol=2e-2)


def test_hf_encoder_traced_with_torch_jit_stays_padded(transformers, calls):
    """torch.jit.trace (transformers' torchscript export) keeps the traced call's data-dependent answers
    as constants (the longest sequence, whether there is padding): the encoder runs padded while it is
    traced, and the trace then gives eager's results on another padding."""
    ref = _small_encoder(transformers, "BertModel", torchscript=True)
    model = optimize(ref, inplace=False).model
    ids, mask = padded_batch([7, 5, 2], 9, left=False, low=3)  # no row fills the batch while traced
    with torch.no_grad():
        traced = torch.jit.trace(model, (ids, mask), check_trace=False, strict=False)
        assert calls["varlen"] == 0 and calls["dense"] == 2
        ids2, mask2 = padded_batch([9, 3, 6], 9, left=False, low=3)
        got, expected = traced(ids2, mask2)["last_hidden_state"], ref(ids2, attention_mask=mask2)[0]
    close_on_tokens(got, expected, mask2)


def test_an_optimized_hf_bert_saves_whole_and_loads_in_a_fresh_process(transformers, tmp_path):
    """torch.save of the whole model pickles the unpadded encoder's class by its name,
    bignlp_fast.hf.BertEncoder, which a fresh process finds again."""
    model = _small_encoder(transformers, "BertModel")
    optimize(model)
    ids, mask = padded_batch([7, 4], 7, left=False, low=3)
    with torch.no_grad():
        torch.save({"model": model, "ids": ids, "mask": mask, "out": model(ids, attention_mask=mask).last_hidden_state},
                   tmp_path / "m.pt")
    code = ("import torch, bignlp_fast\n"
            f"d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)\n"
            "m = d['model']\n"
            "assert type(m.encoder).__module__ == 'bignlp_fast.hf'\n"
            "with torch.no_grad():\n"
            "    torch.testing.assert_close(m(d['ids'], attention_mask=d['mask']).last_hidden_state, d['out'])\n")
    subprocess.run([sys.executable, "-c", code], cwd=SUBPROCESS_CWD, check=True, capture_output=True)


def test_hf_gpt2_matches_eager_on_a_left_padded_batch(transformers, calls):
    config = transformers.GPT2Config(vocab_size=101, n_embd=45, n_head=3, n_layer=2, n_positions=64,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.set_attn_implementation("eager")
    ref = copy.deepcopy(model)
    report = optimize(model)
    assert model.config._attn_implementation == "bignlp_fast"
    # attention, 5 LayerNorms, 8 Conv1Ds, lm_head
    assert report.swapped[0][0] == "" and len(report.swapped) == 1 + 5 + 8 + 1 and report.skipped == []
    ids, mask = padded_batch([10, 6, 2], 10, left=True, low=3)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    assert calls["n"] == 2
    close_on_tokens(got, expected, mask)
    assert torch.isfinite(got).all()


def test_hf_gpt2_conv1d_runs_on_dense_with_the_same_results(transformers, monkeypatch):
    """transformers' Conv1D (weight [in, out]) becomes bignlp_fast.hf.Conv1D on ops.linear.dense; with
    ops.linear forced for every product the logits and gradients still match the eager model's."""
    import importlib
    from bignlp_fast import hf
    linear_module = importlib.import_module("bignlp_fast.ops.linear")  # the module (ops.linear is the function)
    from transformers.pytorch_utils import Conv1D
    config = transformers.GPT2Config(vocab_size=101, n_embd=48, n_head=3, n_layer=2, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ref = copy.deepcopy(model)
    report = optimize(model)
    conv = [n for n, m in ref.named_modules() if type(m) is Conv1D]
    assert len(conv) == 8 and all((n, "transformers.pytorch_utils.Conv1D", "bignlp_fast.hf.Conv1D") in report.swapped
                                  for n in conv)
    ours_cls = hf.fast_conv1d_class(Conv1D)
    assert all(type(dict(model.named_modules())[n]) is ours_cls for n in conv)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    assert model.state_dict().keys() == ref.state_dict().keys()
    calls = []
    real = linear_module._linear  # what ops.linear and dense run
    monkeypatch.setattr(linear_module, "linear_is_faster", lambda x, w, prepacked=None: True)
    monkeypatch.setattr(linear_module, "_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    got, expected = model(ids, labels=ids), ref(ids, labels=ids)
    assert len(calls) == 8 + 1  # every Conv1D and the lm_head
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    got.loss.backward()
    expected.loss.backward()
    for n in conv:
        torch.testing.assert_close(model.get_submodule(n).weight.grad, ref.get_submodule(n).weight.grad,
                                   rtol=1e-5, atol=1e-6)
    second = optimize(model)
    assert second.swapped == [] and ("transformer.h.0.attn.c_attn", "bignlp_fast.hf.Conv1D",
                                     "already optimized") in second.skipped


def test_an_optimized_hf_gpt2_saves_whole_and_loads_in_a_fresh_process(transformers, tmp_path):
    """torch.save of the whole model pickles the swapped Conv1D class by its name,
    bignlp_fast.hf.Conv1D, which a fresh process finds again."""
    config = transformers.GPT2Config(vocab_size=101, n_embd=32, n_head=4, n_layer=1, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    optimize(model)
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.save({"model": model, "ids": ids, "logits": model(ids).logits}, tmp_path / "m.pt")
    code = ("import torch, bignlp_fast\n"
            f"d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)\n"
            "m = d['model']\n"
            "assert type(m.transformer.h[0].attn.c_attn).__module__ == 'bignlp_fast.hf'\n"
            "with torch.no_grad():\n"
            "    torch.testing.assert_close(m(d['ids']).logits, d['logits'])\n")
    subprocess.run([sys.executable, "-c", code], cwd=SUBPROCESS_CWD, check=True, capture_output=True)


def test_forward_arguments_have_torch_nn_names():
    # code written for torch.nn (layer(input=t), torch.export's dynamic_shapes keyed by name) keeps
    # working after optimize: every drop-in's forward names its arguments as the module it replaces
    import inspect
    pairs = [(nn.Linear, bnn.Linear), (nn.LayerNorm, bnn.LayerNorm), (nn.GELU, bnn.GELU), (nn.Conv1d, bnn.Conv1d),
             (nn.Conv2d, bnn.Conv2d), (nn.LSTM, bnn.LSTM), (nn.GRU, bnn.GRU), (nn.RNN, bnn.RNN),
             (nn.LSTMCell, bnn.LSTMCell), (nn.GRUCell, bnn.GRUCell), (nn.RNNCell, bnn.RNNCell),
             (nn.MultiheadAttention, bnn.MultiheadAttention)]
    for theirs, ours in pairs:
        want = list(inspect.signature(theirs.forward).parameters)
        got = list(inspect.signature(ours.forward).parameters)
        assert got[:len(want)] == want, f"{ours.__name__}.forward{tuple(got)}: torch.nn's is {tuple(want)}"
    model = nn.Sequential(nn.Linear(4, 3))
    optimize(model)
    assert isinstance(model[0], bnn.Linear)
    torch.testing.assert_close(model[0](input=torch.ones(2, 4)), model[0](torch.ones(2, 4)))
