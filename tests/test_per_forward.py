"""What one forward or ``generate()`` call works out belongs to that call: forwards in other threads,
the backbone called directly, a ``generate()`` that re-enters itself, a model unpickled in a fresh
process, a copy taken inside ``original_attention`` and a Trainer that pops the labels each see
exactly their own settings.  Every check compares against an independent reference: the same call
run alone, each document alone, the unpatched model under the explicit mask, plain greedy."""
from __future__ import annotations

import copy
import io
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from models import reference_attention, reference_logits, tiny_model
from swa_patch import original_attention, patch_model, unpatch_model
from swa_patch.patch import layer_specs, patch_settings
from test_packed import cu_seq_lens, documents

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny matrices (see conftest)

W = 5


def _ids(n, b=1, seed=0):
    return torch.randint(3, 90, (b, n), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, new=12, **kw):
    return model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0, **kw)


def _unpatched(model, family="llama"):
    """A newly built, unpatched model of ``family`` with ``model``'s weights."""
    plain = tiny_model(family)
    plain.load_state_dict(model.state_dict())
    return plain


def _prompt_labels(ids, prompt_lengths):
    """``ids`` as labels with ``-100`` over each row's prompt."""
    return ids.masked_fill(torch.arange(ids.shape[1]) < torch.tensor(prompt_lengths)[:, None], -100)


# ---- 1. threads -------------------------------------------------------------------------------
def _thread_calls(models, thread: int) -> list:
    """200 forwards (packed and plain rows, decode="full" and window) and 20 generate() calls of
    one thread, each a zero-argument function returning a tensor; inputs differ per thread, so a
    call that reads another thread's documents, boundary or generate() state gives other numbers."""
    full, window = models
    calls = []
    for i in range(200):
        seed = 1000 * thread + i
        lengths = [(3 + (seed + k) % 7) for k in range(3)]
        docs, ids, positions, _ = documents(lengths, seed=seed)
        prompts = [2 + (seed + k) % (n - 2) for k, n in enumerate(lengths)]
        labels = torch.cat([_prompt_labels(doc, [p]) for doc, p in zip(docs, prompts)], 1)
        plain = _ids(8 + seed % 9, b=2, seed=seed)
        calls.append([lambda: full(ids, position_ids=positions, labels=labels).logits,
                      lambda: window(ids, position_ids=positions).logits,
                      lambda: full(plain, prompt_lengths=[2 + seed % 6, 3 + seed % 5]).logits,
                      lambda: window(plain).logits][i % 4])
        if i % 10 == 9:
            prompt = _ids(6 + thread, seed=seed)
            calls.append([lambda: _greedy(full, prompt, new=8, prompt_lengths=2 + thread),
                          lambda: _greedy(window, prompt, new=8)][(i // 10) % 2])
    return calls


def test_forwards_and_generate_calls_in_threads_equal_each_call_run_alone():
    full = patch_model(tiny_model("llama", seed=1), window=W, sinks=2, decode="full", backend="sdpa")
    window = patch_model(tiny_model("qwen2", seed=2), window=W, sinks=2, backend="sdpa")
    calls = [_thread_calls((full, window), thread) for thread in range(4)]
    with torch.no_grad():
        alone = [[call() for call in thread] for thread in calls]
    for run in range(5):
        results, errors = [[None] * len(thread) for thread in calls], []

        def work(thread):
            try:
                torch.set_num_threads(1)
                with torch.no_grad():
                    for k, call in enumerate(calls[thread]):
                        results[thread][k] = call()
            except BaseException as err:       # noqa: BLE001 (reported below)
                errors.append(err)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        mismatches = [(t, k) for t in range(4) for k, (got, want) in enumerate(zip(results[t], alone[t]))
                      if got.shape != want.shape or not torch.allclose(got.float(), want.float(), atol=1e-6, rtol=0)]
        assert not mismatches, f"run {run}: {len(mismatches)} calls differ from the same call alone: {mismatches[:8]}"


# ---- 2. the backbone called directly ----------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_the_backbone_called_directly_keeps_packed_documents_apart(family):
    model = patch_model(tiny_model(family), window=4, sinks=2, backend="sdpa")
    docs, ids, positions, doc_ids = documents()
    plain = _unpatched(model, family)
    with torch.no_grad():
        with reference_attention(plain.model, layer_specs(model), ids.shape[1], documents=doc_ids):
            reference = plain.model(ids, position_ids=positions).last_hidden_state
        mixed = model.model(ids).last_hidden_state                     # one stream: documents see each other
        for backbone in (model.model, model.get_decoder()):
            hidden = backbone(ids, position_ids=positions).last_hidden_state
            each = torch.cat([backbone(doc).last_hidden_state for doc in docs], 1)
            torch.testing.assert_close(hidden, each, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(hidden, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids, position_ids=positions).logits, model.lm_head(hidden),
                                   atol=1e-5, rtol=1e-5)
    assert (mixed - reference).abs().max() > 1e-3


def test_the_backbone_takes_prompt_lengths_and_refuses_training_without_a_boundary():
    model = patch_model(tiny_model("llama"), window=W, sinks=2, decode="full", backend="sdpa")
    ids = _ids(20, b=2)
    with torch.no_grad():
        hidden = model.model(ids, prompt_lengths=[8, 13]).last_hidden_state
        reference = reference_logits(_unpatched(model), layer_specs(model), ids, full_from=torch.tensor([7, 12]))
    torch.testing.assert_close(model.lm_head(hidden), reference, atol=1e-5, rtol=0)
    model.train()
    for forward in (lambda: model.model(ids), lambda: model(ids)):
        with pytest.raises(ValueError, match="no prompt boundary"):
            forward()


# ---- 3. generate() re-entering itself ---------------------------------------------------------
@pytest.mark.parametrize("decode", ["full", "window"])
@pytest.mark.parametrize("draft", ["assistant_model", "assistant_early_exit"])
def test_self_speculation_gives_the_tokens_of_plain_greedy(draft, decode):
    """The model drafts for itself (the whole model, or its first layer): the inner generate()
    must not clear the outer call's prompt boundary or rollback.  W=5, a prompt of 14 and 40 new
    tokens: the window slides past 40 tokens."""
    model = patch_model(tiny_model("llama", seed=3), window=W, sinks=2, decode=decode, backend="sdpa")
    model.generation_config.num_assistant_tokens = 4
    how = dict(assistant_model=model) if draft == "assistant_model" else dict(assistant_early_exit=1)
    for seed in range(3):
        ids = _ids(14, seed=seed)
        plain = _greedy(model, ids, new=40)
        torch.testing.assert_close(_greedy(model, ids, new=40, **how), plain, atol=0, rtol=0, msg=f"prompt {seed}")


# ---- 4. pickled, then loaded in a fresh process -----------------------------------------------
FRESH_PROCESS = """
import sys, torch
model = torch.load(sys.argv[1], weights_only=False)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
tokens = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
torch.save({"logits": logits, "tokens": tokens}, sys.argv[3])
"""


@pytest.mark.parametrize("decode", ["full", "window"])
def test_a_pickled_model_loads_in_a_fresh_process(tmp_path, decode):
    model = patch_model(tiny_model("llama"), window=W, sinks=2, decode=decode, backend="sdpa")
    ids = _ids(24)
    torch.save(model, tmp_path / "model.pt")
    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, "model.pt", "ids.pt", "out.pt"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(ids).logits, atol=1e-6, rtol=0)
        assert (out["logits"] - _unpatched(model)(ids).logits).abs().max() > 1e-3      # not the unpatched model
    torch.testing.assert_close(out["tokens"], _greedy(model, ids, new=20), atol=0, rtol=0)


# ---- 5. training without labels in the forward ------------------------------------------------
def _loss_func(outputs, labels, num_items_in_batch=None):
    return F.cross_entropy(outputs.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


TRAINER_LOSSES = {"label_smoothing": dict(args=dict(label_smoothing_factor=0.1)),
                  "compute_loss_func": dict(compute_loss_func=_loss_func)}


@pytest.mark.parametrize("how", sorted(TRAINER_LOSSES))
def test_a_trainer_that_pops_labels_gets_the_boundary_or_a_clear_error(tmp_path, how):
    """Trainer pops ``labels`` before the forward with label smoothing or a compute_loss_func: without
    a ``prompt_lengths`` column that reaches the forward the first step raises (no weight moves);
    with it, the loss is the reference loss (the unpatched model under the explicit mask)."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_pt_utils import LabelSmoother

    model = patch_model(tiny_model("llama").train(), window=W, sinks=2, decode="full")
    ids, prompts = _ids(30, b=4, seed=8), [10, 12, 14, 16]
    labels = _prompt_labels(ids, prompts)
    extra = TRAINER_LOSSES[how]

    def trainer(rows, **args):
        return Trainer(model=model, train_dataset=rows, compute_loss_func=extra.get("compute_loss_func"),
                       args=TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                                              learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                              **extra.get("args", {}), **args))

    before = model.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match=r"remove_unused_columns=False"):
        trainer([{"input_ids": r, "labels": lab} for r, lab in zip(ids, labels)]).train()
    assert torch.equal(model.lm_head.weight, before)

    rows = [{"input_ids": r, "labels": lab, "prompt_lengths": p} for r, lab, p in zip(ids, labels, prompts)]
    with_column = trainer(rows, remove_unused_columns=False)
    loss = with_column.compute_loss(model, with_column.data_collator(rows))
    plain = _unpatched(model).train()
    with torch.no_grad(), reference_attention(plain, layer_specs(model), 30,
                                              full_from=torch.tensor(prompts) - 1):
        outputs = plain(ids)
    expected = _loss_func(outputs, labels) if how == "compute_loss_func" else \
        LabelSmoother(epsilon=0.1)(outputs, labels, shift_labels=True)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=0)
    assert torch.isfinite(torch.tensor(with_column.train().training_loss))


def test_shift_labels_give_the_boundary_as_labels_do():
    """transformers' and TRL's pre-shifted ``shift_labels`` (no ``labels``) mark the prompt too."""
    model = patch_model(tiny_model("llama"), window=W, sinks=2, decode="full", backend="sdpa").train()
    ids = _ids(24, b=2, seed=3)
    labels = _prompt_labels(ids, [9, 15])
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    by_labels = model(ids, labels=labels)
    by_shift = model(ids, shift_labels=shifted)
    torch.testing.assert_close(by_shift.logits, by_labels.logits, atol=0, rtol=0)
    reference = reference_logits(_unpatched(model), layer_specs(model), ids, full_from=torch.tensor([8, 14]))
    torch.testing.assert_close(by_labels.logits.detach(), reference, atol=1e-5, rtol=0)


def test_packed_rows_with_padding_follow_the_rule_of_unpacked_rows():
    """decode="full": labels that mask only the left pads of a packed document leave no windowed
    prompt (dense attention): refused, as the same document alone is.  With its prompt masked it
    equals the document alone."""
    model = patch_model(tiny_model("llama"), window=W, sinks=2, decode="full", backend="sdpa")
    first, second = _ids(8, seed=1), _ids(11, seed=2)
    second[:, :3] = 0
    ids = torch.cat([first, second], 1)
    mask = torch.ones_like(ids)
    mask[:, 8:11] = 0
    packed = dict(attention_mask=mask, cu_seq_lens_q=cu_seq_lens([8, 11]), cu_seq_lens_k=cu_seq_lens([8, 11]))
    pads_only = torch.cat([_prompt_labels(first, [4]), second.masked_fill(mask[:, 8:] == 0, -100)], 1)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"\(row, start\) \[\(0, 8\)\]"):
            model(ids, labels=pads_only, **packed)
        with pytest.raises(ValueError, match=r"row\(s\) \[0\]"):
            model(second, attention_mask=mask[:, 8:], labels=pads_only[:, 8:])
        prompt = torch.cat([_prompt_labels(first, [4]), _prompt_labels(second, [6])], 1)
        got = model(ids, labels=prompt, **packed).logits
        alone = [model(first, labels=prompt[:, :8]).logits,
                 model(second, attention_mask=mask[:, 8:], labels=prompt[:, 8:]).logits]
    torch.testing.assert_close(got[:, :8], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 11:], alone[1][:, 3:], atol=1e-5, rtol=1e-5)


# ---- 6. copies taken inside original_attention ------------------------------------------------
def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("clone", ["deepcopy", "pickle"])
def test_a_copy_taken_inside_original_attention_is_a_patched_model_of_its_own(clone):
    model = patch_model(tiny_model("llama"), window=W, sinks=2, backend="sdpa")
    ids = _ids(20)
    with torch.no_grad():
        plain = _unpatched(model)(ids).logits
        patched = reference_logits(_unpatched(model), layer_specs(model), ids)
        close = lambda m, want: torch.testing.assert_close(m(ids).logits, want, atol=1e-5, rtol=0)  # noqa: E731
        with original_attention(model):
            twin = copy.deepcopy(model) if clone == "deepcopy" else _pickled(model)
            close(model, plain)
            close(twin, patched)
        close(twin, patched)
        with original_attention(twin):
            close(twin, plain)
            close(model, patched)
        close(twin, patched)
        unpatch_model(twin)
        close(twin, plain)
        close(model, patched)
    assert patch_settings(model) is not None


def test_an_attention_implementation_set_behind_the_patch_is_refused():
    model = patch_model(tiny_model("llama"), window=W, sinks=2, backend="sdpa")
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="original_attention"):
        model(_ids(8))
