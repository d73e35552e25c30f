"""End-to-end benchmark cases: bignlp_fast.models against transformers' models with the same weights
and inputs (BERT inference and a training step; GPT-2 greedy generation; a Llama-style model's
generation after optimize()). transformers is needed to
build these cases; without it they are left out of the suites (see ``model_cases``)."""

from __future__ import annotations

import copy
import importlib.util

import torch

from bignlp_fast.bench.cases import Case


class _Models:
    """The (ours, reference) model pair of a case, per dtype, built once on ``device``: the float32
    pair by ``build`` (on the CPU, then moved), other dtypes (bf16 runs, the float64 reference) as
    converted copies of one side. ``prepare(model)``, if given, is applied to each of ours once, when
    it is made (outside the timed calls)."""

    def __init__(self, build, device, prepare=None):
        self.build, self.device, self.prepare, self.models = build, device, prepare, {}

    def __call__(self, dtype: torch.dtype, side: int):
        """side 0: ours, 1: the reference."""
        if (torch.float32, 0) not in self.models:
            ours, ref = (m.to(self.device) for m in self.build())
            self.models[torch.float32, 0], self.models[torch.float32, 1] = self._prepared(ours), ref
        if (dtype, side) not in self.models:
            model = copy.deepcopy(self.models[torch.float32, side]).to(dtype)
            self.models[dtype, side] = self._prepared(model) if side == 0 else model
        return self.models[dtype, side]

    def _prepared(self, model):
        if self.prepare is not None:
            self.prepare(model)
        return model


def _padded_batch(b: int, l: int, vocab: int, seed: int = 5):
    """Token ids [B, L] and a right-padding mask whose lengths are uniform in [0.3 L, L] (one full row)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(0.3 * l), l + 1, (b,), generator=g)
    lengths[0] = l
    ids = torch.randint(1, vocab, (b, l), generator=g)
    mask = (torch.arange(l)[None, :] < lengths[:, None]).long()
    return ids, mask, lengths


# ---- BERT -----------------------------------------------------------------------------------------
def _bert_cases(b: int, l: int, dtype: torch.dtype, modes, suites, layers: int = 12, hidden: int = 768,
                via_optimize: bool = False, prepack: bool = False, packed: bool = False):
    """BERT-base-shaped encoder on a right-padded batch: ours (unpadded tokens, varlen attention)
    against transformers' BertModel with attn_implementation="sdpa". FLOPs: the encoder's GEMMs and
    attention over the real tokens only (what a padding-free model must compute). ``via_optimize``:
    ours is transformers' own model after ``bignlp_fast.optimize`` (our attention through its
    AttentionInterface, our LayerNorm and Linear modules, its encoder stack run unpadded:
    hf.unpadded_encoder_class). ``prepack``: our
    model's weights marked for ops.prepack (inference on copies packed once; the first call, timed
    apart as warm-up, packs them). ``packed`` (inference): the batch's real tokens in one row, as
    transformers' DataCollatorWithFlattening(return_flash_attn_kwargs=True) lays out a padding-free
    batch (position_ids restarting at each sequence, flash-attention's cu_seq_lens kwargs), fed to
    both sides: the reference's sdpa attends under the block-diagonal mask transformers builds from
    position_ids, ours (with ``via_optimize``) runs varlen_attention over the sequences."""
    import transformers

    from bignlp_fast import optimize
    from bignlp_fast.ops import prepack as prepack_weights
    from bignlp_fast.models.bert import BertForSequenceClassification, BertModel, bert_flops
    ids, mask, lengths = _padded_batch(b, l, 30522)
    real = mask.bool()
    padding = 1 - real.float().mean().item()
    hf_config = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                     intermediate_size=4 * hidden, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     attn_implementation="sdpa")
    flops = bert_flops(BertModel.config_class(hidden_size=hidden, num_hidden_layers=layers,
                                              num_attention_heads=hidden // 64, intermediate_size=4 * hidden),
                       int(lengths.sum()), lengths.tolist())

    def build(task: bool, device):
        def pair():
            torch.manual_seed(0)
            cls = (transformers.BertForSequenceClassification if task else transformers.BertModel)
            ref = cls(transformers.BertConfig(**hf_config)).eval()
            if via_optimize:
                ours = optimize(ref, inplace=False).model
            else:
                ours = (BertForSequenceClassification if task else BertModel).from_hf(ref).eval()
            return ours, ref
        return _Models(pair, device, prepare=prepack_weights if prepack else None)

    if packed:  # the real tokens in one row
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        longest = int(lengths.max())
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()])[None]
        inputs = dict(input_ids=ids[real][None], position_ids=positions,
                      cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    else:
        inputs = dict(input_ids=ids, attention_mask=mask)

    def make_fwd(device, dt):
        return dict(inputs={k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()},
                    tag=torch.zeros((), dtype=dt), models=build(False, device))

    @torch.no_grad()
    def fwd(model, t):
        out = model(**t["inputs"]).last_hidden_state
        return [out[0] if packed else out[real]]

    def ours_fwd(t, be):
        return fwd(t["models"](t["tag"].dtype, 0), t)

    common = dict(op="attention", shape=(b, l), dtype=dtype, suites=suites, ref_name="transformers BertModel (sdpa)")
    name = "optimize(HF BERT-base)" if via_optimize else "BERT-base"
    out = []
    if "fwd" in modes:
        out.append(Case(mode="fwd", make=make_fwd, ours=ours_fwd,
                        ref=lambda t: fwd(t["models"](t["tag"].dtype, 1), t), flops=flops,
                        variant=(f"{name} encoder, " + (f"{b} sequences packed in one row (padding-free)" if packed
                                                         else f"{padding:.0%} padding")
                                 + (", prepacked" if prepack else "")),
                        **common))
    if "fwd+bwd" in modes:
        labels = torch.randint(0, 2, (b,), generator=torch.Generator().manual_seed(7))

        def make_step(device, dt):
            t = make_fwd(device, dt)
            t.update(labels=labels.to(device), models=build(True, device))
            return t

        def step(model, t):
            """One training step without the optimizer: the loss and every parameter's gradient
            (a few returned for the error check)."""
            for p in model.parameters():
                p.grad = None
            loss = model(**t["inputs"], labels=t["labels"]).loss
            loss.backward()
            named = dict(model.named_parameters())
            keys = ["classifier.weight", "bert.encoder.layer.0.attention.self.query.weight",
                    "bert.embeddings.word_embeddings.weight"]
            return [loss.detach(), *(named[k].grad for k in keys)]

        common["ref_name"] = "transformers BertForSequenceClassification (sdpa)"
        out.append(Case(mode="fwd+bwd", make=make_step, ours=lambda t, be: step(t["models"](t["tag"].dtype, 0), t),
                        ref=lambda t: step(t["models"](t["tag"].dtype, 1), t), flops=3 * flops,
                        variant=f"{name} classifier training step, {padding:.0%} padding", **common))
    return out


def _bert_mlm_cases(b: int, l: int, modes, suites, via_optimize: bool = False, layers: int = 12, hidden: int = 768,
                    vocab: int = 30522):
    """BERT-base-shaped masked LM on a right-padded batch, fp32: ours (our BertForMaskedLM, or with
    ``via_optimize`` transformers' own after ``bignlp_fast.optimize``: its encoder unpadded and its head
    on the real tokens, hf.unpadded_head_class) against transformers' BertForMaskedLM (sdpa). "fwd":
    the logits (compared at real tokens); "fwd+bwd": a training step with 15% of the real tokens
    labelled (-100 elsewhere, as DataCollatorForLanguageModeling leaves them). FLOPs: the encoder's
    and the head's (its dense layer and the vocabulary projection) over the real tokens."""
    import transformers

    from bignlp_fast import optimize
    from bignlp_fast.models.bert import BertForMaskedLM, bert_flops
    ids, mask, lengths = _padded_batch(b, l, vocab)
    labels = ids.masked_fill((mask == 0) | (torch.rand(b, l, generator=torch.Generator().manual_seed(9)) > 0.15), -100)
    tokens = int(lengths.sum())
    flops = (bert_flops(BertForMaskedLM.config_class(hidden_size=hidden, num_hidden_layers=layers,
                                                      num_attention_heads=hidden // 64, intermediate_size=4 * hidden),
                        tokens, lengths.tolist())
             + 2 * tokens * (hidden * hidden + hidden * vocab))
    hf_config = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                        num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                        attn_implementation="sdpa")

    def pair():
        torch.manual_seed(0)
        ref = transformers.BertForMaskedLM(hf_config).eval()  # (dropout 0: the training step's math too)
        return (optimize(ref, inplace=False).model if via_optimize else BertForMaskedLM.from_hf(ref).eval()), ref

    name = "optimize(HF BERT-base)" if via_optimize else "BERT-base"
    return _padded_lm_cases(ids, mask, labels, pair, modes, suites, flops,
                            variants={"fwd": f"{name} masked LM", "fwd+bwd": f"{name} masked LM training step"},
                            ref_name="transformers BertForMaskedLM (sdpa)",
                            grads=["cls.predictions.transform.dense.weight",
                                   "bert.encoder.layer.0.attention.self.query.weight",
                                   "bert.embeddings.word_embeddings.weight"])


def _padded_lm_cases(ids, mask, labels, pair, modes, suites, flops: float, variants: dict, ref_name: str,
                     grads: list[str]) -> list[Case]:
    """A language model's cases on a padded batch (ids, mask [B, L]; ``pair()`` -> (ours, reference)):
    "fwd", the logits at real tokens; "fwd+bwd", a training step against ``labels`` (the loss and the
    gradients of the parameters named in ``grads``, for the error check). ``variants``: mode -> name."""
    real = mask.bool()
    padding = 1 - real.float().mean().item()

    def make(device, dt):
        return dict(ids=ids.to(device), mask=mask.to(device), labels=labels.to(device),
                    tag=torch.zeros((), dtype=dt), models=_Models(pair, device))

    @torch.no_grad()
    def fwd(model, t):
        return [model(input_ids=t["ids"], attention_mask=t["mask"]).logits[real.to(t["ids"].device)]]

    def step(model, t):
        """One training step without the optimizer."""
        for p in model.parameters():
            p.grad = None
        loss = model(input_ids=t["ids"], attention_mask=t["mask"], labels=t["labels"]).loss
        loss.backward()
        named = dict(model.named_parameters())
        return [loss.detach(), *(named[k].grad for k in grads)]

    run = {"fwd": (fwd, flops), "fwd+bwd": (step, 3 * flops)}
    return [Case(op="attention", mode=mode, shape=tuple(ids.shape), dtype=torch.float32, suites=suites, make=make,
                 ours=lambda t, be, f=run[mode][0]: f(t["models"](t["tag"].dtype, 0), t),
                 ref=lambda t, f=run[mode][0]: f(t["models"](t["tag"].dtype, 1), t), flops=run[mode][1],
                 variant=f"{variants[mode]}, {padding:.0%} padding", ref_name=ref_name) for mode in modes]


# ---- GPT-2 ----------------------------------------------------------------------------------------
def _gpt_padded_cases(b: int, l: int, modes, suites, layers: int = 12, hidden: int = 768, vocab: int = 50257):
    """GPT-2-small-shaped causal LM on a right-padded batch (as a fine-tuning collator pads it), fp32,
    without a cache: ours (the batch unpadded, causal varlen attention, the vocabulary projection on
    the real tokens) against transformers' GPT2LMHeadModel (sdpa). "fwd": the logits (compared at real
    tokens); "fwd+bwd": a training step, labels -100 at padding. FLOPs: the blocks' products, causal
    attention and the vocabulary projection over the real tokens."""
    import transformers

    from bignlp_fast.models.gpt import GPTLMHeadModel
    ids, mask, lengths = _padded_batch(b, l, vocab)
    tokens = int(lengths.sum())
    flops = float(layers * (2 * tokens * 12 * hidden * hidden + 2 * hidden * sum(n * n for n in lengths.tolist()))
                  + 2 * tokens * hidden * vocab)
    hf_config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=hidden // 64,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                        eos_token_id=None, attn_implementation="sdpa")

    def pair():
        torch.manual_seed(0)
        ref = transformers.GPT2LMHeadModel(hf_config).eval()  # (dropout 0: the training step's math too)
        return GPTLMHeadModel.from_hf(ref).eval(), ref

    return _padded_lm_cases(ids, mask, ids.masked_fill(mask == 0, -100), pair, modes, suites, flops,
                            variants={"fwd": "GPT-2 small forward", "fwd+bwd": "GPT-2 small training step"},
                            ref_name="transformers GPT2LMHeadModel (sdpa)",
                            grads=["transformer.h.0.attn.c_attn.weight", f"transformer.h.{layers - 1}.mlp.c_fc.weight",
                                   "transformer.wte.weight"])


# ---- GPT-2 generation --------------------------------------------------------------------------------
def _hf_greedy(new: int):
    """transformers' greedy ``generate`` of exactly ``new`` tokens after a case's ``ids`` (end of
    sequence off; its ``mask``, else every token real), as a case's list of outputs."""
    @torch.no_grad()
    def generate(model, t):
        mask = t.get("mask", torch.ones_like(t["ids"]))
        out = model.generate(t["ids"], attention_mask=mask, do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=0)
        return [out.float()]
    return generate



def _gpt_cases(b: int, prompt: int, new: int, dtype: torch.dtype, suites, layers: int = 12, hidden: int = 768,
               vocab: int = 50257, via_optimize: bool = False):
    """Greedy generation of ``new`` tokens after a ``prompt``-token prompt, GPT-2-small-shaped: ours
    (static KV cache, fused ops) against transformers' ``generate`` with its cache. End of sequence is
    off on both sides, so every call makes exactly ``new`` tokens. Bytes: every decoding step must
    read all the weights once (the least a step moves), so "% of copy" is the distance to the
    memory-bandwidth limit (the KV cache reads, a few MB, are left out of the count). ``via_optimize``:
    ours is transformers' own model and ``generate`` after ``bignlp_fast.optimize`` (our attention,
    LayerNorm, Conv1D and lm_head; transformers' cache and decoding loop)."""
    import transformers

    from bignlp_fast import optimize
    from bignlp_fast.models.gpt import GPTLMHeadModel
    hf_config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=hidden // 64,
                                        n_positions=max(1024, prompt + new), eos_token_id=None, bos_token_id=None,
                                        attn_implementation="sdpa")
    ids = torch.randint(0, vocab, (b, prompt), generator=torch.Generator().manual_seed(3))

    def pair():
        torch.manual_seed(0)
        ref = transformers.GPT2LMHeadModel(hf_config).eval()
        return (optimize(ref, inplace=False).model if via_optimize else GPTLMHeadModel.from_hf(ref).eval()), ref

    def make(device, dt):
        return dict(ids=ids.to(device), tag=torch.zeros((), dtype=dt), models=_Models(pair, device))

    hf_generate = _hf_greedy(new)

    def ours(t, be):
        model = t["models"](t["tag"].dtype, 0)
        if via_optimize:
            return hf_generate(model, t)
        return [model.generate(t["ids"], new, eos_token_id=[]).float()]

    def ref(t):
        return hf_generate(t["models"](t["tag"].dtype, 1), t)

    params = (vocab + hf_config.n_positions) * hidden + layers * (12 * hidden * hidden + 13 * hidden) + 2 * hidden
    weight_bytes = params * torch.tensor([], dtype=dtype).element_size()
    return [Case(op="attention", mode="fwd", shape=(b, prompt, new), dtype=dtype, make=make, ours=ours, ref=ref,
                 ref_name="transformers GPT2LMHeadModel.generate (sdpa, cache)", bytes=new * weight_bytes,
                 suites=suites, variant=f"{'optimize(HF GPT-2 small)' if via_optimize else 'GPT-2 small'} greedy "
                                        f"generation, batch {b}")]


# ---- a Llama-style decoder through optimize() -------------------------------------------------------
def _llama_cases(b: int, prompt: int, new: int, dtype: torch.dtype, suites, layers: int = 12, hidden: int = 768,
                 kv_heads: int = 4, intermediate: int = 2048, vocab: int = 32000):
    """Greedy generation with transformers' LlamaForCausalLM (RMSNorm, rotary positions, grouped-query
    attention: ``kv_heads`` key/value heads for hidden // 64 query heads, SwiGLU MLP, untied lm_head)
    after ``bignlp_fast.optimize`` (our attention through the AttentionInterface, our Linears; its
    RMSNorms, rotary code, cache and decoding loop are transformers'), against the same model as it
    is. There is no bignlp_fast Llama model: this is the drop-in path for a model family the library
    does not build. A batch's prompts are left-padded to ``prompt`` tokens (lengths uniform in
    [prompt / 2, prompt], one full), as a batch of real prompts is: every attention call then has a
    mask. Bytes: the weights a decoding step reads (all but the embedding table)."""
    import transformers

    from bignlp_fast import optimize
    heads = hidden // 64
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=max(1024, prompt + new),
                                      bos_token_id=None, eos_token_id=None, pad_token_id=0,
                                      attn_implementation="sdpa")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab, (b, prompt), generator=g)
    lengths = torch.randint(prompt // 2, prompt + 1, (b,), generator=g)
    lengths[0] = prompt
    mask = (torch.arange(prompt)[None, :] >= prompt - lengths[:, None]).long()  # left padding

    def pair():
        torch.manual_seed(0)
        ref = transformers.LlamaForCausalLM(config).eval()
        return optimize(ref, inplace=False).model, ref

    def make(device, dt):
        return dict(ids=ids.to(device), mask=mask.to(device), tag=torch.zeros((), dtype=dt),
                    models=_Models(pair, device))

    generate = _hf_greedy(new)
    kv = kv_heads * 64
    params = vocab * hidden + layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden)
    weight_bytes = (params + hidden) * torch.tensor([], dtype=dtype).element_size()
    return [Case(op="attention", mode="fwd", shape=(b, prompt, new), dtype=dtype, make=make,
                 ours=lambda t, be: generate(t["models"](t["tag"].dtype, 0), t),
                 ref=lambda t: generate(t["models"](t["tag"].dtype, 1), t),
                 ref_name="transformers LlamaForCausalLM.generate (sdpa, cache)", bytes=new * weight_bytes,
                 suites=suites, variant=f"optimize(HF Llama-style, {heads} heads, {kv_heads} key/value heads) "
                                        f"greedy generation, batch {b}" + (", left-padded prompts" if b > 1 else ""))]


def has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def model_cases() -> list[Case]:
    """The end-to-end cases (first in every table); none without transformers, their reference."""
    if not has_transformers():
        return []
    cases = []
    # BERT-base, batch 8 x 128 tokens, ~40% padding: inference fp32 and bf16, a training step. The
    # quick suite keeps one case per model, and transformers' BERT after optimize() (a few minutes on
    # 2 cores); --full has the rest
    cases += _bert_cases(8, 128, torch.float32, ("fwd",), ("quick", "full"))
    cases += _bert_cases(8, 128, torch.float32, ("fwd+bwd",), ("full",))
    cases += _bert_cases(8, 128, torch.bfloat16, ("fwd",), ("full",))  # slow on CPUs without bf16 units
    # one request of 48 tokens (every GEMM 48 rows: the streaming kernels' range where they beat BLAS)
    cases += _bert_cases(1, 48, torch.float32, ("fwd",), ("full",))
    cases += _bert_cases(1, 48, torch.bfloat16, ("fwd",), ("full",))
    cases += _bert_cases(1, 48, torch.float32, ("fwd",), ("full",), prepack=True)
    # one request of 128 tokens, weights packed per call and once (ops.prepack: 33 rows and up)
    cases += _bert_cases(1, 128, torch.float32, ("fwd",), ("full",))
    for dt in (torch.float32, torch.bfloat16):
        cases += _bert_cases(1, 128, dt, ("fwd",), ("full",), prepack=True)
    cases += _bert_cases(1, 128, torch.float32, ("fwd",), ("full",), via_optimize=True, prepack=True)
    # transformers' own BERT after bignlp_fast.optimize(model): what a drop-in call gives
    cases += _bert_cases(8, 128, torch.float32, ("fwd",), ("quick", "full"), via_optimize=True)
    cases += _bert_cases(8, 128, torch.float32, ("fwd+bwd",), ("full",), via_optimize=True)
    # ... and on the same batch without its padding, packed in one row (transformers' padding-free format)
    cases += _bert_cases(8, 128, torch.float32, ("fwd",), ("full",), via_optimize=True, packed=True)
    # the masked LM (the vocabulary projection on every token), ours and transformers' after optimize()
    cases += _bert_mlm_cases(8, 128, ("fwd", "fwd+bwd"), ("full",))
    cases += _bert_mlm_cases(8, 128, ("fwd", "fwd+bwd"), ("full",), via_optimize=True)
    # GPT-2 small on a right-padded batch without a cache (scoring, fine-tuning)
    cases += _gpt_padded_cases(8, 128, ("fwd", "fwd+bwd"), ("full",))
    # GPT-2 small: prompt 32, 64 new tokens, batch 1 (bound by reading the weights) and batch 8
    cases += _gpt_cases(1, 32, 64, torch.float32, ("quick", "full"))
    cases += _gpt_cases(8, 32, 64, torch.float32, ("full",))
    cases += _gpt_cases(1, 32, 64, torch.bfloat16, ("full",))
    cases += _gpt_cases(1, 32, 64, torch.float32, ("full",), via_optimize=True)
    cases += _gpt_cases(8, 32, 64, torch.float32, ("full",), via_optimize=True)
    # a Llama-style model (grouped-query attention, 12 layers x 768) after optimize(): batch 1 and 8
    for b in (1, 8):
        cases += _llama_cases(b, 32, 64, torch.float32, ("full",))
    # the GPU suite (bench --gpu): BERT-base inference at batch 1 and 32 x 128 tokens, GPT-2 small
    # decoding at batch 1 (its "% of copy" is the fraction of memory bandwidth) and 8; bf16
    for b in (1, 32):
        cases += _bert_cases(b, 128, torch.bfloat16, ("fwd",), ("gpu",))
    for b in (1, 8):
        cases += _gpt_cases(b, 32, 64, torch.bfloat16, ("gpu",))
    return cases


def tiny_model_cases() -> list[Case]:
    if not has_transformers():
        return []
    return (_bert_cases(3, 9, torch.float32, ("fwd", "fwd+bwd"), ("tiny",), layers=2, hidden=128)
            + _bert_cases(3, 9, torch.float32, ("fwd",), ("tiny",), layers=2, hidden=128, via_optimize=True)
            + _bert_cases(3, 9, torch.float32, ("fwd",), ("tiny",), layers=2, hidden=128, via_optimize=True,
                          packed=True)
            + _bert_mlm_cases(3, 9, ("fwd", "fwd+bwd"), ("tiny",), layers=2, hidden=128, vocab=301)
            + _bert_mlm_cases(3, 9, ("fwd", "fwd+bwd"), ("tiny",), via_optimize=True, layers=2, hidden=128, vocab=301)
            + _gpt_padded_cases(3, 9, ("fwd", "fwd+bwd"), ("tiny",), layers=2, hidden=128, vocab=301)
            + _gpt_cases(2, 5, 4, torch.float32, ("tiny",), layers=2, hidden=128, vocab=301)
            + _gpt_cases(2, 5, 4, torch.float32, ("tiny",), layers=2, hidden=128, vocab=301, via_optimize=True)
            + _llama_cases(2, 5, 4, torch.float32, ("tiny",), layers=2, hidden=128, kv_heads=1, intermediate=256,
                           vocab=301))

