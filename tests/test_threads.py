"""Calls from several Python threads at once: the CPU kernels give up the GIL while they run, as torch's
own ops do (so other threads, a server's other requests, go on), and concurrent calls do not disturb
each other's results."""

import sys
import threading
import time

import pytest
import torch

import bignlp_fast
from bignlp_fast import ops
from bignlp_fast.models import (BertConfig, BertForSequenceClassification, GPTConfig, GPTLMHeadModel,
                                RNNClassifier, RNNClassifierConfig, TextCNNClassifier, TextCNNConfig)

pytestmark = pytest.mark.skipif(bignlp_fast._backend.compiled() is None, reason="needs the compiled extension")


def _call(name: str, n: int):
    """One call of a kind of CPU kernel, its work growing with n."""
    g = torch.Generator().manual_seed(0)
    if name == "linear":
        x, w = torch.randn(64 * n, 1024, generator=g), torch.randn(1024, 1024, generator=g)
        return lambda: ops.linear(x, w)
    if name == "attention":
        q = torch.randn(n, 4, 256, 64, generator=g)
        return lambda: ops.scaled_dot_product_attention(q, q, q, is_causal=True)
    if name == "lstm":
        # few inputs, many units: the recurrence (ours) and not the input projection (torch's) fills the call
        lstm, seq = bignlp_fast.nn.LSTM(8, 512, batch_first=True), torch.randn(n, 64, 8, generator=g)
        return lambda: lstm(seq)
    if name == "conv1d":
        conv, signal = bignlp_fast.nn.Conv1d(256, 256, 3, padding=1), torch.randn(n, 256, 256, generator=g)
        return lambda: conv(signal)
    rows, ones = torch.ones(2048 * n, 1024), torch.ones(1024)  # (values do not matter here; randn takes long)
    return lambda: ops.add_layer_norm(rows, rows, ones, ones)


def _lasting(name: str, seconds: float):
    """A call of the kind that takes at least ``seconds`` here (doubling its work until it does)."""
    n = 1
    while True:
        fn = _call(name, n)
        fn()  # and warm up: packing, caches, first-call set-up
        t0 = time.perf_counter()
        fn()
        if time.perf_counter() - t0 >= seconds or n >= 256:
            return fn
        n *= 2


@pytest.mark.parametrize("name", ["linear", "attention", "lstm", "conv1d", "add_layer_norm"])
def test_other_python_threads_run_while_a_kernel_runs(name):
    # A second thread stamps the time in a loop: it needs the GIL for every stamp. If the kernel kept
    # the GIL, no stamp could fall in the middle of a call, only near its ends, where the calling
    # thread waits for the GIL for about the switch interval (made short here, 0.1 ms against calls of
    # tens of milliseconds, that a busy machine may stretch); given up, the stamps go on throughout.
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)  # one core for the kernel, one for the stamps
    sys.setswitchinterval(1e-4)
    stamps, stop = [], threading.Event()

    def stamp():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    try:
        with torch.no_grad():
            fn = _lasting(name, 0.03)
            ticker = threading.Thread(target=stamp)
            ticker.start()
            windows = []
            try:
                while len(windows) < 3 or sum(t1 - t0 for t0, t1 in windows) < 0.1:
                    t0 = time.perf_counter()
                    fn()
                    windows.append((t0, time.perf_counter()))
            finally:
                stop.set()
                ticker.join()
    finally:
        torch.set_num_threads(threads)
        sys.setswitchinterval(interval)
    # the middle half of each call, where only the kernel runs
    inside = sum(1 for t0, t1 in windows for s in stamps if t0 + (t1 - t0) / 4 < s < t1 - (t1 - t0) / 4)
    durations = [round((t1 - t0) * 1e3, 1) for t0, t1 in windows]
    assert inside > 0, f"{name}: no other thread ran during {len(windows)} calls of {durations} ms"


def _models():
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=256)).eval()
    gpt = GPTLMHeadModel(GPTConfig(vocab_size=100, n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval()
    cnn = TextCNNClassifier(TextCNNConfig(vocab_size=100, embed_dim=64, num_filters=64)).eval()
    lstm = RNNClassifier(RNNClassifierConfig(vocab_size=100, embed_dim=64, hidden_size=128)).eval()
    gru = RNNClassifier(RNNClassifierConfig(vocab_size=100, embed_dim=64, hidden_size=128, cell="gru")).eval()
    ids = torch.randint(1, 100, (8, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 25:] = mask[3, 10:] = 0  # padded rows: the variable-length paths
    labels = torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(2))

    def grads(model):  # a training step's gradients (dropout off: eval mode), flattened
        def step():
            with torch.enable_grad():
                loss = model(ids, attention_mask=mask, labels=labels).loss
                return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
        return step

    return {
        "bert": lambda: bert(input_ids=ids, attention_mask=mask).logits,
        "bert training": grads(bert),
        "gpt": lambda: gpt.generate(ids[:2, :8], max_new_tokens=6),
        "textcnn": lambda: cnn(ids, attention_mask=mask).logits,
        "lstm": lambda: lstm(ids, attention_mask=mask).logits,
        "lstm training": grads(lstm),
        "gru": lambda: gru(ids, attention_mask=mask).logits,
    }


def test_concurrent_calls_give_the_results_of_calls_one_at_a_time():
    # Each kernel keeps its state in the call (the buffer cache, shared, takes a lock): several threads
    # at once, each through the models in its own order, get what one thread alone got
    models = _models()
    with torch.no_grad():
        alone = {name: fn() for name, fn in models.items()}
    failures, barrier = [], threading.Barrier(4)

    def worker(k):
        barrier.wait()  # all at once
        with torch.no_grad():
            for round_ in range(3):
                for name in list(models)[k:] + list(models)[:k]:
                    try:
                        got = models[name]()
                    except Exception as e:  # (a thread's exception would not fail the test by itself)
                        failures.append(f"thread {k}, round {round_}: {name} raised {type(e).__name__}: {e}")
                        continue
                    if got.shape != alone[name].shape or not torch.allclose(got, alone[name], rtol=1e-5, atol=1e-6):
                        failures.append(f"thread {k}, round {round_}: {name} differs")

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not failures, failures
