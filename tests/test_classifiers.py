import pytest
import torch

from bignlp_fast.models import RNNClassifier, RNNClassifierConfig, TextCNNClassifier, TextCNNConfig
from bignlp_fast.ops.text_cnn_pool import text_cnn_pool_eager

LENGTHS = torch.tensor([9, 4, 6, 12])


def _batch(vocab=50, lengths=LENGTHS, L=12, seed=0):
    """Right-padded ids; the padding holds random (non-zero) ids, which must not matter."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (len(lengths), L), generator=g)


def _textcnn(seed=0):
    torch.manual_seed(seed)
    return TextCNNClassifier(TextCNNConfig(vocab_size=50, num_classes=3, embed_dim=16, num_filters=8,
                                           widths=(2, 3, 4))).eval()


def _rnn(cell="lstm", pooling="last", layers=2, seed=0):
    torch.manual_seed(seed)
    return RNNClassifier(RNNClassifierConfig(vocab_size=50, num_classes=3, embed_dim=16, hidden_size=12,
                                             num_layers=layers, cell=cell, pooling=pooling)).eval()


def test_textcnn_matches_the_eager_model():
    model, ids = _textcnn(), _batch()
    convs = model.text_cnn.convs
    pooled = text_cnn_pool_eager(model.embedding(ids), [c.weight for c in convs], [c.bias for c in convs], "relu",
                                 LENGTHS)
    torch.testing.assert_close(model(ids, LENGTHS).logits, model.classifier(pooled), rtol=1e-5, atol=1e-5)


def _torch_rnn_reference(model, ids, lengths, pooling):
    """The same model written with torch.nn.LSTM/GRU and per-sequence loops."""
    cfg = model.config
    ref = (torch.nn.LSTM if cfg.cell == "lstm" else torch.nn.GRU)(
        cfg.embed_dim, cfg.hidden_size, cfg.num_layers, batch_first=True, bidirectional=cfg.bidirectional)
    ref.load_state_dict(model.rnn.state_dict())
    rows = []
    for b in range(ids.shape[0]):
        x = model.embedding(ids[b:b + 1, :lengths[b]])
        out, state = ref(x)
        h_n = state[0] if cfg.cell == "lstm" else state
        if pooling == "last":
            rows.append(torch.cat([h_n[-2, 0], h_n[-1, 0]]))
        elif pooling == "mean":
            rows.append(out[0].mean(0))
        else:
            rows.append(out[0].amax(0))
    return model.classifier(torch.stack(rows))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_rnn_classifier_matches_torch_per_sequence(cell, pooling):
    model, ids = _rnn(cell, pooling), _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, LENGTHS).logits, _torch_rnn_reference(model, ids, LENGTHS, pooling),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [_textcnn, _rnn], ids=["textcnn", "rnn"])
def test_padding_changes_nothing(make):
    """Each sequence alone, unpadded, gives its row of the padded batch; attention_mask == lengths."""
    model, ids = make(), _batch()
    with torch.no_grad():
        batch = model(ids, LENGTHS).logits
        torch.testing.assert_close(model(ids, attention_mask=torch.arange(12)[None] < LENGTHS[:, None]).logits, batch)
        for b, n in enumerate(LENGTHS.tolist()):
            torch.testing.assert_close(model(ids[b:b + 1, :n]).logits[0], batch[b], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [_textcnn, _rnn], ids=["textcnn", "rnn"])
def test_trains_and_round_trips(make):
    model, ids = make(), _batch()
    labels = torch.tensor([0, 1, 2, 1])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model(ids, LENGTHS, labels=labels).loss.item()
    for _ in range(30):
        opt.zero_grad()
        loss = model(ids, LENGTHS, labels=labels).loss
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    model.eval()
    copy = make(seed=1)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(copy(ids, LENGTHS).logits, model(ids, LENGTHS).logits)


def test_textcnn_classifier_compiles_fullgraph():
    model, ids = _textcnn(), _batch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, LENGTHS).logits, model(ids, LENGTHS).logits)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="cell"):
        RNNClassifier(RNNClassifierConfig(vocab_size=5, cell="lstmx"))
    with pytest.raises(ValueError, match="pooling"):
        RNNClassifier(RNNClassifierConfig(vocab_size=5, pooling="sum"))
    with pytest.raises(ValueError, match="not both"):
        _textcnn()(_batch(), LENGTHS, attention_mask=torch.ones(4, 12))
    with pytest.raises(ValueError, match="attention_mask"):
        _textcnn()(_batch(), attention_mask=torch.ones(4, 11))
    left_padded = torch.ones(4, 12, dtype=torch.long)
    left_padded[1, :3] = 0
    for make in (_textcnn, _rnn):
        with pytest.raises(ValueError, match="right-padded"):
            make()(_batch(), attention_mask=left_padded)
    with pytest.raises(ValueError, match=r"RNNClassifier: input_ids has no tokens, shape \(4, 0\)"):
        _rnn()(_batch()[:, :0])


@pytest.mark.parametrize("make", [_textcnn, _rnn], ids=["textcnn", "rnn"])
def test_an_empty_batch(make):
    model = make().eval()
    logits = model(_batch()[:0]).logits
    assert logits.shape == (0, model.classifier.out_features)


@pytest.mark.parametrize("make", [_textcnn, _rnn], ids=["textcnn", "rnn"])
def test_lengths_int32_or_int64_and_the_mask_agree(make):
    model, ids = make().eval(), _batch()
    mask = (torch.arange(12)[None, :] < LENGTHS[:, None]).long()
    with torch.no_grad():
        want = model(ids, LENGTHS).logits
        torch.testing.assert_close(model(ids, LENGTHS.int()).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, want, rtol=0, atol=0)


def test_rnn_classifier_compiles_fullgraph():
    model, ids = _rnn(), _batch()
    with torch._dynamo.config.patch(allow_rnn=True):  # Dynamo's opt-in for any torch.nn.LSTM/GRU subclass
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, LENGTHS).logits, model(ids, LENGTHS).logits)


@pytest.mark.parametrize("make", [_textcnn, _rnn], ids=["textcnn", "rnn"])
def test_bfloat16_end_to_end(make):
    model, ids = make(), _batch()
    with torch.no_grad():
        ref = model(ids, LENGTHS).logits
        out = model.to(torch.bfloat16)(ids, LENGTHS).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02)  # bf16's 8 mantissa bits, a few layers
