"""model.generate() on a patched model: an SWACache by default, greedy/sampling/beam,
left-padded batches, and a cache carried across generate() calls."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from swa_patch import SWACache, make_cache, patch_model
from tests.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny matrices (see conftest)

W = 5
NEW = 12


def patched(positions, sinks=2, family="llama"):
    return patch_model(tiny_model(family), window=W, sinks=sinks, positions=positions, backend="sdpa")


def prompt(n, seed=0, batch=1):
    return torch.randint(3, 90, (batch, n), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, **kw):
    return model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)


@torch.no_grad()
def manual_greedy(model, ids, steps=NEW):
    cache = make_cache(model)
    logits = model(ids, cache=cache).logits[:, -1]
    out = [ids]
    for _ in range(steps):
        tok = logits.argmax(-1, keepdim=True)
        out.append(tok)
        logits = model(tok, cache=cache).logits[:, -1]
    return torch.cat(out, 1)


@pytest.mark.parametrize("positions", ["original", "shift"])
def test_greedy_generate_equals_manual_loop_and_uses_swa_cache(positions):
    model = patched(positions)
    ids = prompt(9)
    out = greedy(model, ids, return_dict_in_generate=True)
    assert isinstance(out.cache if hasattr(out, "cache") else out.past_key_values, SWACache)
    torch.testing.assert_close(out.sequences, manual_greedy(model, ids))


def test_default_cache_is_bounded():
    model = patched("shift")
    small = greedy(model, prompt(4), return_dict_in_generate=True)
    big = model.generate(prompt(4), max_new_tokens=60, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    cache_of = lambda o: o.cache if hasattr(o, "cache") else o.past_key_values
    assert cache_of(big).get_seq_length() == 63
    assert cache_of(big).nbytes() == cache_of(small).nbytes()


def test_sampling_and_beam_search_run():
    model = patched("shift")
    torch.manual_seed(0)
    sampled = model.generate(prompt(6), max_new_tokens=NEW, do_sample=True, top_k=20, pad_token_id=0)
    beams = model.generate(prompt(6), max_new_tokens=NEW, num_beams=3, num_return_sequences=2,
                           do_sample=False, pad_token_id=0)
    assert sampled.shape == (1, 6 + NEW) and beams.shape == (2, 6 + NEW)


def test_beam_search_equals_beam_search_over_a_full_cache():
    """Original positions: the rolling cache (reorder_cache) gives the same beams as a
    DynamicCache that keeps every key (its window comes from the attention mask)."""
    model = patched("original")
    kw = dict(max_new_tokens=NEW, num_beams=3, do_sample=False, pad_token_id=0)
    ours = model.generate(prompt(7, seed=3), **kw)
    full = model.generate(prompt(7, seed=3), cache=DynamicCache(config=model.config), **kw)
    torch.testing.assert_close(ours, full)


@pytest.mark.parametrize("positions", ["original", "shift"])
def test_left_padded_batch_rows_equal_rows_alone(positions):
    model = patched(positions)
    a, b = prompt(9, seed=1), prompt(5, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = greedy(model, batch, attention_mask=mask)
    torch.testing.assert_close(out[0], greedy(model, a)[0])
    torch.testing.assert_close(out[1, 4:], greedy(model, b)[0])


@pytest.mark.parametrize("positions", ["original", "shift"])
def test_cache_carries_across_generate_calls(positions):
    """Turn 2 appends to the same stream: equal to one manual loop over the whole stream."""
    model = patched(positions)
    cache = make_cache(model)
    turn1 = greedy(model, prompt(6, seed=4), cache=cache)
    assert cache.get_seq_length() == turn1.shape[1] - 1
    history = torch.cat([turn1, prompt(5, seed=5)], 1)
    turn2 = greedy(model, history, cache=cache)
    assert cache.get_seq_length() == turn2.shape[1] - 1
    fresh = make_cache(model)
    with torch.no_grad():
        model(turn1[:, :-1], cache=fresh)
        logits = model(history[:, turn1.shape[1] - 1:], cache=fresh).logits[:, -1]
        expected = []
        for _ in range(NEW):
            expected.append(logits.argmax(-1, keepdim=True))
            logits = model(expected[-1], cache=fresh).logits[:, -1]
    torch.testing.assert_close(turn2[:, history.shape[1]:], torch.cat(expected, 1))


def test_static_cache_is_refused_not_misread():
    from models import tiny_model
    from swa_patch import patch_model
    model = patch_model(tiny_model("llama"), window=4, sinks=0, backend="sdpa")
    ids = torch.randint(3, 97, (1, 6))
    with pytest.raises(ValueError, match="pre-allocated cache"):
        model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
