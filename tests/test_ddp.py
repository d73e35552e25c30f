"""The models train under DistributedDataParallel: two CPU processes (gloo), each on half the batch,
end with the same gradients as one process on the whole batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bignlp_fast.models import (BertConfig, BertForSequenceClassification, BertModel, GPTConfig, GPTLMHeadModel,
                                RNNClassifier, RNNClassifierConfig, TextCNNClassifier, TextCNNConfig)

B, L, VOCAB = 4, 11, 53


def _models():
    """Small models of each family, dropout off (so the two runs compute the same function)."""
    torch.manual_seed(0)
    bert = BertConfig(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=16)
    return {
        "bert": BertForSequenceClassification(bert),
        "bert-mean": BertModel(bert),  # trained on mean-pooled states: the pooler is an unused output
        "textcnn": TextCNNClassifier(TextCNNConfig(vocab_size=VOCAB, embed_dim=12, num_filters=5, widths=(2, 3),
                                                   dropout=0.0)),
        "lstm": RNNClassifier(RNNClassifierConfig(vocab_size=VOCAB, embed_dim=12, hidden_size=10, cell="lstm",
                                                  dropout=0.0)),
        "gpt": GPTLMHeadModel(GPTConfig(vocab_size=VOCAB, n_positions=16, n_embd=24, n_layer=2, n_head=3,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=0)),
    }


# DistributedDataParallel's options that depend on it seeing the tensors inside a model's output
OPTIONS = {"default": {}, "static_graph": {"static_graph": True},
           "find_unused_parameters": {"find_unused_parameters": True}}


def _runs(option: str):
    """The models each option trains: the unused-output model needs find_unused_parameters."""
    return [name for name in _models() if name != "bert-mean" or option == "find_unused_parameters"]


def _loss(name, model, ids, mask, labels):
    """The model's training loss on these rows: causal LM on unpadded rows for GPT (every row has
    the same token count, so the mean over the two halves equals the mean over the batch)."""
    if name == "gpt":
        return model(ids, labels=ids).loss
    if name == "bert-mean":
        return model(ids).last_hidden_state.mean(1).square().sum() * (2 / len(ids))
    return model(ids, attention_mask=mask, labels=labels).loss


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    lengths = torch.tensor([11, 7, 4, 9])
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    return ids, mask, torch.tensor([0, 1, 1, 0])


def _gradients(name, model, ids, mask, labels) -> dict:
    model.zero_grad()
    _loss(name, model, ids, mask, labels).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, option: str, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    ids, mask, labels = _batch()
    half = slice(rank * B // 2, (rank + 1) * B // 2)
    grads = {}
    models = _models()
    for name in _runs(option):
        model = models[name]
        ddp = torch.nn.parallel.DistributedDataParallel(model, **OPTIONS[option])
        for step in range(2):  # the second step: DDP's state after the first is right too
            ddp.zero_grad()
            _loss(name, ddp, ids[half], mask[half], labels[half]).backward()  # DDP averages the gradients
            grads[name, step] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("option", OPTIONS)
def test_ddp_gradients_equal_a_single_process_run(tmp_path, option):
    mp.start_processes(_worker, args=(option, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ids, mask, labels = _batch()
    models = _models()
    for name in _runs(option):
        expected = _gradients(name, models[name], ids, mask, labels)
        for rank in ranks:
            for step in range(2):
                got = rank[name, step]
                assert got.keys() == expected.keys(), name
                for k, g in expected.items():
                    torch.testing.assert_close(got[k], g, rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"{name} step {step} {k}: {m}")
