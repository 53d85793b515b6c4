"""The paths a user takes around a patched model on day one: copies (deepcopy, pickling, TRL's
reference model), plain LM labels with decode="full", beams / sampling / several return
sequences with per-row prompt lengths, speculative decoding (a draft model, prompt lookup) and
``pipeline``.  Each is checked against an independent reference: a freshly patched model with
the same weights, the unpatched model under an explicit reference mask, or per-row runs."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from models import reference_logits, tiny_model
from swa_patch import make_cache, original_attention, patch_model, unpatch_model
from swa_patch.patch import layer_specs, patch_settings

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny matrices (see conftest)

W = 5


def _ids(n, b=1, seed=0):
    return torch.randint(3, 90, (b, n), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, new=12, **kw):
    return model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0, **kw)


def _fresh(weights_of, settings, family="llama"):
    """A newly built model of ``family`` (its number of layers from ``weights_of``) with the
    weights of ``weights_of``, patched with ``settings`` (None: left unpatched)."""
    model = tiny_model(family, num_hidden_layers=weights_of.config.num_hidden_layers)
    model.load_state_dict(weights_of.state_dict())
    return model if settings is None else patch_model(model, settings=settings)


# ---- 1. copies carry their own state ----------------------------------------------------------
def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _trl_reference(model):
    try:
        from trl.experimental.utils import create_reference_model
    except ImportError:                                         # TRL < 1.x
        from trl import create_reference_model
    return create_reference_model(model)


CLONES = {"deepcopy": copy.deepcopy, "pickle": _pickled, "trl": _trl_reference}


@pytest.mark.parametrize("decode", ["full", "window"])
@pytest.mark.parametrize("clone", sorted(CLONES))
def test_a_copy_generates_with_its_own_weights(clone, decode):
    model = patch_model(tiny_model("llama"), window=W, sinks=2, decode=decode, backend="sdpa")
    ids = _ids(14)
    before = _greedy(model, ids)
    twin = CLONES[clone](model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    ours = _greedy(twin, ids)
    assert not torch.equal(ours, before)                        # the perturbation shows in the tokens
    torch.testing.assert_close(ours, _greedy(_fresh(twin, patch_settings(model)), ids), atol=0, rtol=0)
    torch.testing.assert_close(_greedy(model, ids), before, atol=0, rtol=0)   # the original is untouched
    with torch.no_grad(), original_attention(twin):
        logits = twin(ids).logits
        reference = _fresh(twin, None)(ids).logits
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=0)
    unpatch_model(twin)                                         # the copy's hooks, not the original's
    assert patch_settings(model) is not None and "generate" not in twin.__dict__
    torch.testing.assert_close(_greedy(model, ids), before, atol=0, rtol=0)


def test_a_shallow_copy_is_the_same_patched_model():
    """``copy.copy`` shares the modules: it runs the patched model (the unpatched model under the
    explicit mask; the tokens of a freshly patched model with the same weights), and a weight
    changed through it changes the original too."""
    model = patch_model(tiny_model("llama"), window=W, sinks=2, decode="full", backend="sdpa")
    ids = _ids(14)
    shallow = copy.copy(model)
    with torch.no_grad():
        torch.testing.assert_close(shallow(ids).logits, reference_logits(_fresh(model, None), layer_specs(model), ids),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(_greedy(shallow, ids), _greedy(_fresh(model, patch_settings(model)), ids),
                                   atol=0, rtol=0)
        before = _greedy(model, ids)
        weight = shallow.model.layers[0].mlp.up_proj.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    after = _greedy(model, ids)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, _greedy(_fresh(shallow, patch_settings(model)), ids), atol=0, rtol=0)


# ---- 2. decode="full" never runs dense without being asked ------------------------------------
def test_plain_labels_with_decode_full_are_refused_unless_the_boundary_is_given():
    model = patch_model(tiny_model("llama"), window=W, decode="full", backend="sdpa")
    ids = _ids(20, b=2)
    with pytest.raises(ValueError, match="-100 prefix"):
        model(ids, labels=ids)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    labels = ids.masked_fill(mask == 0, -100)                   # pads masked, the prompt is not
    with pytest.raises(ValueError, match=r"row\(s\) \[0, 1\]"):
        model(ids, attention_mask=mask, labels=labels)
    prompt = ids.masked_fill(torch.arange(20) < 8, -100)        # a prompt prefix: trains as asked
    assert torch.isfinite(model(ids, labels=prompt).loss)
    explicit = model(ids, labels=ids, prompt_lengths=1).loss     # dense on purpose: the unpatched loss
    torch.testing.assert_close(explicit, unpatch_model(model)(ids, labels=ids).loss, atol=1e-5, rtol=0)


def test_a_one_token_prompt_with_decode_full_runs_and_its_answer_attends_everything():
    """A one-token prompt has nothing to window: its answer attends every earlier key, so the tokens
    are the unpatched model's (and not the window's).  In a left-padded batch a one-token row runs
    too, however generate() feeds the prompt: every step's logits equal the unpatched model's under
    the explicit mask with the batch's boundary, and each row's tokens equal that row alone."""
    model = patch_model(tiny_model("llama"), window=W, decode="full", backend="sdpa")
    one = _ids(1, seed=2)
    unpatched = _greedy(_fresh(model, None), one, new=20)
    torch.testing.assert_close(_greedy(model, one, new=20), unpatched, atol=0, rtol=0)
    windowed = patch_model(_fresh(model, None), window=W, backend="sdpa")
    assert not torch.equal(_greedy(windowed, one, new=20), unpatched)     # a window would show
    ids, mask = _left_padded([12, 1])
    full_mask = torch.cat([mask, torch.ones(2, 20, dtype=mask.dtype)], 1)
    for feed in ({}, dict(prefill_chunk_size=4)):
        out = _greedy(model, ids, attention_mask=mask, new=20, output_logits=True, return_dict_in_generate=True,
                      **feed)
        reference = reference_logits(_fresh(model, None), layer_specs(model), out.sequences, full_mask,
                                     torch.tensor([11, 11]))[:, 11:-1]
        torch.testing.assert_close(torch.stack(out.logits, 1), reference, atol=2e-5, rtol=0, msg=str(feed))
        torch.testing.assert_close(out.sequences[1:, 11:], _greedy(model, ids[1:, 11:], new=20), atol=0, rtol=0)
        torch.testing.assert_close(out.sequences[:1], _greedy(model, ids[:1], new=20), atol=0, rtol=0)
    with pytest.raises(ValueError, match="first real token"):   # a manual stream that starts with one token
        model(_ids(1), cache=make_cache(model))


# ---- 3. beams, sampling, several return sequences with per-row boundaries ---------------------
def _left_padded(lengths, seed=3):
    n = max(lengths)
    ids = _ids(n, b=len(lengths), seed=seed)
    mask = (torch.arange(n)[None] >= n - torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("decode", ["full", "window"])
def test_beam_search_with_per_row_prompt_lengths_equals_each_row_alone(decode):
    model = patch_model(tiny_model("llama", seed=2), window=W, sinks=2, decode=decode, backend="sdpa")
    ids, mask = _left_padded([18, 15])
    rows = dict(prompt_lengths=[12, 18]) if decode == "full" else {}          # stream indices, pads included
    kw = dict(new=10, num_beams=3, num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
    batch = _greedy(model, ids, attention_mask=mask, **kw, **rows)
    for row in range(2):
        pads = int((mask[row] == 0).sum())
        alone_rows = dict(prompt_lengths=rows["prompt_lengths"][row] - pads) if rows else {}
        alone = _greedy(model, ids[row:row + 1, pads:], **kw, **alone_rows)
        got = batch.sequences[2 * row:2 * row + 2, pads:]
        torch.testing.assert_close(got, alone.sequences, atol=0, rtol=0)
        torch.testing.assert_close(batch.sequences_scores[2 * row:2 * row + 2], alone.sequences_scores,
                                   atol=1e-5, rtol=0)


def test_sampled_return_sequences_follow_the_reference_with_per_row_boundaries():
    """Every step's logits of sampled, left-padded, several-return-sequence generation equal the
    unpatched model's under the reference mask over the final sequences, each row with its
    own boundary."""
    model = patch_model(tiny_model("llama", seed=4), window=W, sinks=2, decode="full", backend="sdpa")
    ids, mask = _left_padded([16, 11], seed=5)
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=30,
                         num_return_sequences=3, prompt_lengths=[9, 16], pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True)
    steps = torch.stack(out.logits, 1)                                      # [6, 10, V]
    full_mask = torch.cat([mask.repeat_interleave(3, 0), torch.ones(6, 10, dtype=mask.dtype)], 1)
    full_from = torch.tensor([9, 16]).repeat_interleave(3) - 1
    specs = layer_specs(model)
    reference = reference_logits(_fresh(model, None), specs, out.sequences, full_mask, full_from)[:, 15:-1]
    torch.testing.assert_close(steps, reference, atol=2e-5, rtol=0)
    wrong = reference_logits(_fresh(model, None), specs, out.sequences, full_mask, full_from + 1)[:, 15:-1]
    assert (steps - wrong).abs().max() > 1e-3                                # a boundary one row late fails


def test_static_cache_beams_equal_the_dynamic_cache():
    model = patch_model(tiny_model("llama"), window=W, sinks=2, positions="original", backend="sdpa")
    ids, mask = _left_padded([14, 10])
    kw = dict(new=10, num_beams=3, attention_mask=mask)
    torch.testing.assert_close(_greedy(model, ids, cache=make_cache(model, static=True), **kw),
                               _greedy(model, ids, **kw), atol=0, rtol=0)


# ---- 4. speculative decoding: the rolling cache rolls back what a draft got wrong --------------
def _reference_logits(model, family, ids, positions, sinks):
    """What each token's logits must be, from the unpatched model: in position mode "original" its
    parallel forward under the explicit band + sinks mask; in "shift" (a one-layer model, so a step
    depends on the tokens it keeps) a re-encoding of the sinks and the window at their in-cache
    positions, step by step (``test_cache._kept``)."""
    plain = _fresh(model, None, family)
    if positions == "original":
        return reference_logits(plain, layer_specs(model), ids)
    from test_cache import _kept
    real = torch.ones(ids.shape[1], dtype=torch.bool)
    with torch.no_grad():
        return torch.stack([plain(*_kept(ids[0], real, t, sinks, W)[:1],
                                  position_ids=_kept(ids[0], real, t, sinks, W)[1]).logits[0, -1]
                            for t in range(ids.shape[1])])[None]


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("positions", ["original", "shift"])
def test_crop_within_rollback_equals_never_having_seen_the_dropped_tokens(family, positions):
    """Real tokens interleaved with drafted junk that is cropped again (as a chunk, the way the
    target verifies, or token by token, the way a draft drafts): the real tokens' logits equal the
    unpatched model's on a stream that never saw the junk, past many evictions, sinks and frame
    rebases."""
    k, sinks = 4, 2
    layers = dict(num_hidden_layers=1) if positions == "shift" else {}
    model = patch_model(tiny_model(family, **layers), window=W, sinks=sinks, positions=positions, backend="sdpa")
    ids, junk = _ids(48, seed=1), _ids(48 * k, seed=2)
    cache = make_cache(model, rollback=k)
    got, t = [], 0
    with torch.no_grad():
        while t < ids.shape[1]:
            real = min(1 + t % 3, ids.shape[1] - t)                   # 1-3 real tokens, then junk
            drafted = junk[:, t * k:t * k + 1 + t % k]                # 1..k junk tokens
            if t % 2:                                                 # verified as one chunk
                logits = model(torch.cat([ids[:, t:t + real], drafted], 1), cache=cache).logits[:, :real]
            else:                                                     # or fed one by one, as a draft does
                logits = model(ids[:, t:t + real], cache=cache).logits
                for j in range(drafted.shape[1]):
                    model(drafted[:, j:j + 1], cache=cache)
            cache.crop(-drafted.shape[1])
            got.append(logits)
            t += real
    assert cache.base > 0 or positions == "original"                  # shift mode rebased on the way
    reference = _reference_logits(model, family, ids, positions, sinks)
    torch.testing.assert_close(torch.cat(got, 1), reference, atol=1e-5, rtol=0)
    plain = _reference_logits(model, family, torch.cat([ids[:, :1], junk[:, :47]], 1), positions, sinks)
    assert (torch.cat(got, 1) - plain).abs().max() > 1e-3             # other tokens give other logits


def test_crop_beyond_the_reserved_rollback_is_refused():
    model = patch_model(tiny_model("llama"), window=W, sinks=2, backend="sdpa")
    cache = make_cache(model, rollback=3)
    with torch.no_grad():
        model(_ids(30), cache=cache)
    cache.crop(-3)
    with torch.no_grad():
        model(_ids(3, seed=1), cache=cache)
    with pytest.raises(ValueError, match="rollback=K"):
        cache.crop(-4)
    assert cache.is_croppable and not make_cache(model).is_croppable
    with pytest.raises(ValueError, match="rollback must be an int >= 0"):
        make_cache(model, rollback=-1)
    with pytest.raises(ValueError, match="cannot roll back"):
        make_cache(model, rollback=2, static=True)


def _record_crops(monkeypatch):
    from swa_patch.cache import SWACache
    removed, crop = [], SWACache.crop
    monkeypatch.setattr(SWACache, "crop", lambda self, n: (removed.append(-n), crop(self, n))[1])
    return removed


def _draft_of(model, window, tokens):
    draft = patch_model(unpatch_model(copy.deepcopy(model)), window=window, sinks=1, backend="sdpa")
    draft.generation_config.num_assistant_tokens = tokens
    return draft


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma3_text"])
@pytest.mark.parametrize("positions", ["original", "shift"])
def test_speculative_decoding_gives_the_tokens_of_plain_greedy(monkeypatch, family, positions):
    """A patched draft (the same weights at a smaller window: it agrees often, not always), an
    unpatched draft and prompt lookup: the tokens equal plain greedy decoding of the patched
    model over 40 new tokens (the window of 5 slides 40 times; shift mode rebases)."""
    model = patch_model(tiny_model(family), window=W, sinks=2, positions=positions, backend="sdpa")
    ids = _ids(9, seed=4)
    plain = _greedy(model, ids, new=40)
    removed = _record_crops(monkeypatch)
    unpatched_draft = tiny_model(family, seed=7)
    unpatched_draft.generation_config.num_assistant_tokens = 3
    for how in (dict(assistant_model=_draft_of(model, 3, 4)), dict(assistant_model=unpatched_draft),
                dict(prompt_lookup_num_tokens=3)):
        torch.testing.assert_close(_greedy(model, ids, new=40, **how), plain, atol=0, rtol=0, msg=str(how))
    assert max(removed) >= 2                   # drafted tokens were rejected and rolled back, several at once


def test_speculative_decoding_refusals():
    model = patch_model(tiny_model("llama"), window=W, sinks=2, backend="sdpa")
    draft = _draft_of(model, 3, 4)
    draft.generation_config.num_assistant_tokens_schedule = "heuristic"
    with pytest.raises(ValueError, match="num_assistant_tokens_schedule='heuristic'"):
        _greedy(model, _ids(9), assistant_model=draft)
    with pytest.raises(ValueError, match=r"make_cache\(model, rollback=3\)"):
        _greedy(model, _ids(9), prompt_lookup_num_tokens=3, cache=make_cache(model, rollback=2))


# ---- 6. pipeline, Trainer, peft in either order ------------------------------------------------
def _word_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: token ``wN`` is id ``N``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, 97)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def test_pipeline_text_generation_runs_the_patched_model():
    from transformers import pipeline

    model = patch_model(tiny_model("llama"), window=W, sinks=2, backend="sdpa")
    tokenizer = _word_tokenizer()
    ids = _ids(20, seed=6)
    text = " ".join(f"w{i}" for i in ids[0].tolist())
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator(text, max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    patched = tokenizer.decode(_greedy(model, ids)[0, 20:])
    unpatched = tokenizer.decode(_greedy(_fresh(model, None), ids)[0, 20:])
    assert out.split() == patched.split() and patched != unpatched


def test_hf_trainer_loss_is_the_reference_loss_and_it_trains(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = patch_model(tiny_model("llama").train(), window=W, sinks=2)
    reference = _fresh(model, None).train()
    ids = _ids(40, b=4, seed=8)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
    from models import reference_attention
    with torch.no_grad(), reference_attention(reference, layer_specs(model), 40):
        expected = reference(ids, labels=ids).loss
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=0)
    before = model.lm_head.weight.detach().clone()
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss)) and not torch.equal(model.lm_head.weight, before)


def test_peft_before_or_after_patch_model_is_the_same_patched_model():
    from peft import LoraConfig, get_peft_model

    lora = lambda m: get_peft_model(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],  # noqa: E731
                                                  init_lora_weights=False))
    torch.manual_seed(0)
    before = patch_model(lora(tiny_model("llama")), window=W, sinks=2, backend="sdpa")      # peft, then patch
    after = lora(patch_model(tiny_model("llama"), window=W, sinks=2, backend="sdpa"))      # patch, then peft
    after.load_state_dict(before.state_dict())
    ids = _ids(30, seed=9)
    merged = lora(tiny_model("llama"))
    merged.load_state_dict(before.state_dict())
    merged = merged.merge_and_unload()                                      # the unpatched reference
    expected = reference_logits(merged, layer_specs(before.get_base_model()), ids)
    for model in (before, after):
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
    kw = dict(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(before.generate(**kw), after.generate(**kw), atol=0, rtol=0)
    unpatch_model(before)
    with torch.no_grad():
        torch.testing.assert_close(before(ids).logits, merged(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_pipeline_with_the_real_smollm2():
    from transformers import pipeline

    from swa_patch.models import load_model, load_text
    model, tokenizer = load_model()
    patch_model(model, window=64, sinks=4)
    text = tokenizer.decode(tokenizer(load_text()).input_ids[:300])
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator(text, max_new_tokens=16, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = tokenizer(text, return_tensors="pt").input_ids
    direct = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert out == tokenizer.decode(direct[0, ids.shape[1]:], skip_special_tokens=True)
