"""Packed (padding-free) rows: several documents in one row, each attending only itself.

Every test compares against an independent reference: each document through the model alone,
or the unpatched model with an explicit mask.  fp32, tolerance 1e-5."""
from __future__ import annotations

import pytest
import torch

import swa_patch
from swa_patch import attention, compat, patch_model
from swa_patch.attention import LayerPlan, MaskInfo, run_plan
from swa_patch.backends import flash, flex
from swa_patch.masks import LayerSpec, reference_mask
from tests.attn_cases import random_qkv
from tests.models import reference_attention, tiny_model
from tests.test_backends import flash_stand_in
from swa_patch.backends.layout import math_attention

TOL = dict(atol=1e-5, rtol=1e-5)
LENGTHS = (3, 4, 5, 9)      # W-1, W, W+1 and 2W+1 for W=4; all shorter than W=12


def documents(lengths=LENGTHS, seed=0, vocab=97):
    """Random token documents and their packed row: (docs, ids [1, n], position_ids, doc ids)."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, vocab, (1, n), generator=g) for n in lengths]
    ids = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    doc_ids = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)])[None]
    return docs, ids, positions, doc_ids


def alone(model, docs) -> torch.Tensor:
    """Logits of each document through ``model`` on its own, concatenated."""
    with torch.no_grad():
        return torch.cat([model(doc).logits for doc in docs], dim=1)


def cu_seq_lens(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


CASES = [(model_type, backend, window, sinks) for model_type in ("llama", "qwen2", "gemma3_text")
         for backend in ("eager", "sdpa") for window, sinks in ((4, 0), (4, 4), (12, 4))]
CASES += [("llama", "flex", 4, 4)]     # flex compiles for each spec and length (~25 s here): one case


@pytest.mark.parametrize("model_type,backend,window,sinks", CASES)
def test_packed_row_equals_each_document_alone(one_thread, monkeypatch, model_type, backend, window, sinks):
    ran = []
    if backend == "flex":         # short calls run the sdpa kernel; these documents must reach flex
        monkeypatch.setattr(attention, "DECODE_MAX_QUERIES", 0)
        monkeypatch.setattr(flex, "attend", lambda *a, f=flex.attend: ran.append(1) or f(*a))
    model = patch_model(tiny_model(model_type), window=window, sinks=sinks, backend=backend)
    docs, ids, positions, _ = documents()
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
    torch.testing.assert_close(packed, alone(model, docs), **TOL)
    assert ran or backend != "flex"


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_dilated_window_and_one_token_pads(one_thread, backend):
    """A dilated window, documents of one length in two rows (one call), and the tail of one-token
    documents that TRL's padding-free collator leaves with pad_to_multiple_of (position 0 each)."""
    model = patch_model(tiny_model("llama"), window=3, sinks=2, dilation=2, backend=backend)
    rows = [documents((5, 9, 1, 1, 1), seed=3), documents((9, 5, 3), seed=4)]
    ids, positions = torch.cat([r[1] for r in rows]), torch.cat([r[2] for r in rows])
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
    for row, (docs, *_) in enumerate(rows):
        torch.testing.assert_close(packed[row:row + 1], alone(model, docs), **TOL)


def test_packed_row_equals_unpatched_model_with_explicit_document_mask(one_thread):
    model = tiny_model("llama")
    docs, ids, positions, doc_ids = documents()
    specs = [LayerSpec(4, 1, 2)] * 2
    with torch.no_grad(), reference_attention(model, specs, ids.shape[1], documents=doc_ids):
        ref = model(ids, position_ids=positions).logits
    patch_model(model, window=4, sinks=2, backend="sdpa")
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
    torch.testing.assert_close(packed, ref, **TOL)


def test_reference_mask_of_documents_is_each_document_alone():
    spec = LayerSpec(3, 2, 2)
    lengths = (5, 2, 7)
    mask = reference_mask(spec, sum(lengths), documents=documents(lengths)[3])[0]
    start = 0
    for n in lengths:
        block = mask[start:start + n]
        assert torch.equal(block[:, start:start + n], reference_mask(spec, n)[0])
        assert not block[:, :start].any() and not block[:, start + n:].any()
        start += n


@pytest.mark.parametrize("given", ["cu_seq_lens", "seq_idx", "trl_collator"])
def test_boundaries_from_flash_kwargs_and_seq_idx(one_thread, given):
    """Without position_ids (RoPE positions then run on across documents, which RoPE's relative
    scores do not see), the boundaries come from the other keywords alone."""
    model = patch_model(tiny_model("llama"), window=4, sinks=4, backend="sdpa")
    docs, ids, positions, doc_ids = documents()
    cu = cu_seq_lens(LENGTHS)
    kwargs = {"cu_seq_lens": dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9),
              "seq_idx": dict(seq_idx=doc_ids.int()),
              "trl_collator": dict(position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9,
                                   max_length_k=9, seq_idx=doc_ids.int())}[given]
    with torch.no_grad():
        packed = model(ids, **kwargs).logits
    torch.testing.assert_close(packed, alone(model, docs), **TOL)


def test_a_token_of_one_document_changes_nothing_in_another(one_thread):
    model = patch_model(tiny_model("llama"), window=8, sinks=4, backend="sdpa")
    _, ids, positions, _ = documents((6, 10))
    edited = ids.clone()
    edited[0, 2] = (edited[0, 2] + 1) % 97              # a token of document A
    with torch.no_grad():
        before, after = (model(x, position_ids=positions).logits for x in (ids, edited))
    assert not torch.allclose(before[:, 2:6], after[:, 2:6])                 # A did change
    torch.testing.assert_close(after[:, 6:], before[:, 6:], atol=0, rtol=0)  # B did not, not even by rounding


def test_rows_of_a_batch_hold_their_own_documents(one_thread):
    model = patch_model(tiny_model("qwen2"), window=4, sinks=2, backend="sdpa")
    rows = [documents((3, 4, 5, 9), seed=1), documents((9, 12), seed=2)]
    ids = torch.cat([r[1] for r in rows])
    positions = torch.cat([r[2] for r in rows])
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
    for row, (docs, *_) in enumerate(rows):
        torch.testing.assert_close(packed[row:row + 1], alone(model, docs), **TOL)


def _loss_and_grads(model, ids, **kwargs):
    model.zero_grad()
    out = model(ids, **kwargs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_and_gradients_equal_the_sum_over_documents(one_thread, backend, checkpointing):
    """Labels as TRL's padding-free collator makes them (-100 at each document's first token):
    the packed mean loss times its token count equals the per-document losses times theirs."""
    model = patch_model(tiny_model("llama"), window=4, sinks=2, backend=backend).train()
    if checkpointing:
        compat.enable_activation_checkpointing(model)
    docs, ids, positions, _ = documents()
    labels = ids.masked_fill(positions == 0, -100)
    count = sum(n - 1 for n in LENGTHS)
    loss, grads = _loss_and_grads(model, ids, position_ids=positions, labels=labels)
    per_doc_loss, per_doc_grads = 0.0, {}
    for doc in docs:
        l, g = _loss_and_grads(model, doc, labels=doc)
        weight = (doc.shape[1] - 1) / count
        per_doc_loss += l * weight
        for name, grad in g.items():
            per_doc_grads[name] = per_doc_grads.get(name, 0) + grad * weight
    torch.testing.assert_close(loss, per_doc_loss, **TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, per_doc_grads[name], **TOL, msg=name)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("spec", [LayerSpec(5, 1, 2), LayerSpec(3, 2, 1), LayerSpec(3, (1, 2, 1, 3), 2), LayerSpec(None)])
def test_attention_of_packed_rows_with_padding_matches_the_reference(backend, spec):
    """run_plan on two packed rows (their own documents, pads in front of some documents, as
    cu_seq_lens with a padding mask gives) against the explicit mask with documents."""
    lengths = [(7, 1, 12, 4), (4, 9, 11)]
    q, k, v = random_qkv(2, 4, 2, 24, 16, seed=5)
    padding = torch.ones(2, 24, dtype=torch.bool)
    padding[0, 8:10] = padding[1, 4:7] = False           # the second document of each row starts with pads
    starts = tuple(tuple(torch.tensor((0, *row[:-1])).cumsum(0).tolist()) for row in lengths)
    out = run_plan(LayerPlan(spec, backend), q, k, v, MaskInfo(0, padding, documents=starts))
    doc_ids = torch.cat([documents(row)[3] for row in lengths])
    mask = reference_mask(spec, 24, padding, documents=doc_ids)
    mask = mask[:, None] if mask.dim() == 3 else mask
    ref = math_attention(q, k, v, mask, 16 ** -0.5).transpose(1, 2)
    torch.testing.assert_close(out[padding], ref[padding], atol=2e-5, rtol=0)


@pytest.mark.parametrize("sinks", [0, 3])
def test_flash_path_runs_each_document_on_its_own(monkeypatch, sinks):
    """Documents longer than the decode cut-off (128 queries), so flash runs them, right padding and
    all (a stand-in of flash_attn_func here, as in test_backends); reference: the explicit mask with
    documents."""
    calls = []
    monkeypatch.setattr(flash, "flash_attn_func", lambda *a, **k: calls.append(a[0].shape[1]) or flash_stand_in(*a, **k))
    lengths = (140, 131, 150)
    spec = LayerSpec(32, 1, sinks)
    q, k, v = random_qkv(1, 4, 2, sum(lengths), 16)
    info = MaskInfo(0, None, documents=((0, 140, 271),))
    out = run_plan(LayerPlan(spec, "flash"), q, k, v, info)
    mask = reference_mask(spec, sum(lengths), documents=documents(lengths)[3])
    ref = math_attention(q, k, v, mask[:, None], 16 ** -0.5).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    assert 160 in calls          # the band call: the three documents as rows right-padded to 160


# ---- refusals: before any weight is touched ----

def _untouched(model):
    """A pre-hook on the embeddings that records whether the forward reached any weight."""
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(lambda *a: seen.append(True))
    return seen


@pytest.mark.parametrize("cache", ["swa", "dynamic"])
def test_packed_documents_with_a_cache_are_refused(cache):
    model = patch_model(tiny_model("llama"), window=4, sinks=2)
    _, ids, positions, _ = documents()
    seen = _untouched(model)
    given = swa_patch.make_cache(model) if cache == "swa" else __import__("transformers").DynamicCache()
    with pytest.raises(ValueError, match="cannot be combined with a cache.*use_cache=False"):
        model(ids, position_ids=positions, cache=given)
    assert not seen


@pytest.mark.parametrize("with_labels", [False, True])
def test_decode_full_takes_each_documents_own_boundary(one_thread, with_labels):
    """decode="full" on a packed row: each document's prompt ends where its -100 prefix of labels
    ends (completion-only labels), or at its last token without labels, as for the document alone."""
    model = patch_model(tiny_model("llama"), window=3, sinks=1, decode="full", backend="sdpa")
    lengths, prompts = (9, 4, 12), (5, 2, 7)
    docs, ids, positions, _ = documents(lengths)
    doc_labels = [d.clone() for d in docs]
    for labels, p in zip(doc_labels, prompts):
        labels[:, :p] = -100
    kwargs = lambda labels: {"labels": labels} if with_labels else {}
    with torch.no_grad():
        packed = model(ids, position_ids=positions, use_cache=False, **kwargs(torch.cat(doc_labels, 1)))
        single = [model(d, use_cache=False, **kwargs(l)) for d, l in zip(docs, doc_labels)]
    torch.testing.assert_close(packed.logits, torch.cat([o.logits for o in single], 1), **TOL)
    if with_labels:
        answers = [int((l[:, 1:] != -100).sum()) for l in doc_labels]
        expected = sum(o.loss * a for o, a in zip(single, answers)) / sum(answers)
        torch.testing.assert_close(packed.loss, expected, **TOL)


def test_decode_full_refuses_packed_labels_without_a_prompt_prefix():
    """TRL's padding-free labels (-100 only at each document's first token) would make every
    document dense under decode="full": refused, before any weight is touched."""
    model = patch_model(tiny_model("llama"), window=3, sinks=1, decode="full", backend="sdpa")
    _, ids, positions, _ = documents((9, 4, 12))
    labels = ids.masked_fill(positions == 0, -100)
    seen = _untouched(model)
    with pytest.raises(ValueError, match=r"packed document\(s\) at \(row, start\) \[\(0, 0\), \(0, 9\), \(0, 13\)\]"):
        model(ids, position_ids=positions, use_cache=False, labels=labels)
    assert not seen


def test_decode_full_refuses_one_prompt_length_per_row_for_packed_documents():
    model = patch_model(tiny_model("llama"), window=4, sinks=2, decode="full")
    _, ids, positions, _ = documents()
    seen = _untouched(model)
    with pytest.raises(ValueError, match="prompt_lengths gives one prompt boundary per row.*pass labels"):
        model(ids, position_ids=positions, use_cache=False, prompt_lengths=5)
    assert not seen


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])),
     "disagree"),
    (dict(cu_seq_lens_q=torch.tensor([0, 3, 21]), cu_seq_lens_k=torch.tensor([0, 4, 21])), "cu_seq_lens_k differs"),
    (dict(cu_seq_lens_q=torch.tensor([0, 3, 20])), "rise strictly from 0"),
])
def test_inconsistent_boundaries_are_refused(kwargs, match):
    model = patch_model(tiny_model("llama"), window=4, sinks=2)
    _, ids, positions, _ = documents()
    seen = _untouched(model)
    with pytest.raises(ValueError, match=match):
        model(ids, position_ids=positions, use_cache=False, **kwargs)
    assert not seen


def test_a_document_across_rows_is_refused():
    model = patch_model(tiny_model("llama"), window=4, sinks=2)
    ids = torch.randint(3, 97, (2, 6))
    with pytest.raises(ValueError, match="across rows 0 and 1"):
        model(ids, cu_seq_lens_q=torch.tensor([0, 3, 9, 12]), use_cache=False)


# ---- TRL: SFTTrainer with padding_free=True and with packing=True ----

WORDS = "the a cat dog sat ran on under mat log and then slept barked".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def _texts(count=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
            for n in torch.randint(3, 12, (count,), generator=g)]


def _trainer(tmp_path, lr, **config):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    tokenizer = _tokenizer()
    model = patch_model(tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=2),
                        window=4, sinks=2, backend="sdpa")
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, learning_rate=lr, per_device_train_batch_size=6,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=False, logging_steps=1,
                     dataloader_num_workers=0, seed=0, **config)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": _texts()}),
                      processing_class=tokenizer)


def _per_document_loss(model, ids, labels, starts):
    """The token-weighted mean loss of each document through the model alone."""
    total, count = 0.0, 0
    for start, end in zip(starts, starts[1:] + [ids.shape[1]]):
        doc, doc_labels = ids[:, start:end], labels[:, start:end]
        n = int((doc_labels[:, 1:] != -100).sum())
        if n:
            total += model(doc, labels=doc_labels, use_cache=False).loss * n
            count += n
    return total / count


@pytest.mark.parametrize("mode", [dict(padding_free=True, max_length=None), dict(packing=True, max_length=32)])
def test_trl_sft_trainer_loss_is_the_per_document_loss(one_thread, tmp_path, mode):
    trainer = _trainer(tmp_path, 1e-2, **mode)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) > 1
    model = trainer.model
    with torch.no_grad():
        model.train()
        loss = trainer.compute_loss(model, dict(batch))
        expected = _per_document_loss(model, batch["input_ids"], batch["labels"], starts)
    torch.testing.assert_close(loss, expected, **TOL)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
