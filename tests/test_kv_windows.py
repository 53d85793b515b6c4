"""Per-KV-head windows: ``window=[[W or None per KV head] per layer]``.

A KV head's window applies to the query heads of its GQA group; ``None`` keeps that head
full.  Every check is against a dense reference that builds one mask per query head from the
shared predicate, worked out head by head (``reference_mask(spec, n, heads=H)``): random
attention inputs on every backend (with gradients), patched tiny models (whose tolerance must
reject a head one key off, a head made full and the windows moved to the wrong heads), the
rolling cache (token by token, chunks, ``generate()``, shift positions, decode="full"), the
cache's bytes (only the full heads grow), checkpoints, and the refusals.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import swa_patch
from swa_patch import SWAConfig, export_for_serving, make_cache, patch_model, receptive_field, unpatch_model
from swa_patch.attention import LayerPlan, MaskInfo, run_plan
from swa_patch.cache import FullLayer, SlidingLayer, SplitLayer
from swa_patch.masks import LayerSpec, band, reference_mask
from swa_patch.patch import layer_specs
from tests.models import per_head, reference_logits, tiny_model
from tests.test_cache import chunked, ids_for, stepwise
from tests.test_dilation import check_all_rows, compare_with_reference, model_ids, random_case


def attend(backend, q, k, v, spec, attention_mask, scale):
    """The registered attention function, as a patched layer calls it."""
    n, lq = k.shape[2], q.shape[2]
    info = MaskInfo(n - lq, None if attention_mask is None else attention_mask.bool())
    return run_plan(LayerPlan(spec, backend), q, k, v, info, scaling=scale)


def dense_reference(q, k, v, spec, attention_mask, scale):
    """Softmax attention of the last ``lq`` stream rows under the per-query-head reference mask."""
    b, h, lq, _ = q.shape
    n = k.shape[2]
    mask = per_head(reference_mask(spec, n, attention_mask, heads=h))[..., n - lq:, :]
    groups = h // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).double(), v.repeat_interleave(groups, 1).double()
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).to(q.dtype)


# ---- the spec ----------------------------------------------------------------------------

def test_spec_keeps_per_kv_head_windows():
    spec = LayerSpec((5, None, 3, 5), 1, 2)
    assert spec.kv_windows == (5, None, 3, 5) and spec.window == 5 and spec.span == 5
    assert spec.per_head and spec.has_full_heads
    # 8 query heads over 4 KV heads: query heads 2h and 2h+1 follow KV head h
    assert spec.head_groups(8, 4) == [(LayerSpec(3, 1, 2), [4, 5]), (LayerSpec(5, 1, 2), [0, 1, 6, 7]),
                                      (LayerSpec(None), [2, 3])]
    assert LayerSpec((4, 4)) == LayerSpec(4)                     # one value: a plain window
    assert LayerSpec((None, None)).window is None
    assert not LayerSpec((4, 6)).has_full_heads and LayerSpec((4, 6)).span == 6
    with pytest.raises(ValueError, match="head_groups"):
        band(torch.tensor(3), torch.tensor(1), spec)
    with pytest.raises(ValueError, match="4 per-KV-head windows but the call has 2 KV heads"):
        spec.head_groups(8, 2)
    mask = reference_mask(spec, 20, heads=8)
    assert mask.shape == (1, 8, 20, 20)
    for head, window in enumerate((5, None, 3, 5)):
        one = LayerSpec(None) if window is None else LayerSpec(window, 1, 2)
        for q_head in (2 * head, 2 * head + 1):
            assert torch.equal(mask[:, q_head], reference_mask(one, 20))


def test_per_kv_head_windows_with_per_head_dilation():
    """Both at once: a query head takes its KV head's window and its own dilation."""
    spec = LayerSpec((4, None), (1, 2, 3, 3), 1)
    assert spec.head_groups(4, 2) == [(LayerSpec(4, 1, 1), [0]), (LayerSpec(4, 2, 1), [1]), (LayerSpec(None), [2, 3])]
    mask = reference_mask(spec, 30)
    assert torch.equal(mask[:, 1], reference_mask(LayerSpec(4, 2, 1), 30))
    assert torch.equal(mask[:, 3], reference_mask(LayerSpec(None), 30))


# ---- attention level -----------------------------------------------------------------------

kv_entry = st.one_of(st.none(), st.integers(-6, 6))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n=st.integers(1, 60), rel=st.lists(kv_entry, min_size=2, max_size=2),
       sinks=st.integers(0, 3), gqa=st.sampled_from([(4, 2), (2, 2), (6, 2)]), pad=st.integers(0, 9),
       b=st.integers(1, 2), q_frac=st.sampled_from([1.0, 0.5, 0.0]), backend=st.sampled_from(["eager", "sdpa"]))
def test_per_kv_head_attention_matches_reference(seed, n, rel, sinks, gqa, pad, b, q_frac, backend):
    """Windows around the sequence length (W-1, W, W+1 of n and beyond), full heads, sinks,
    GQA, left padding, prefill and chunked continuation."""
    windows = tuple(None if r is None else max(1, n // 2 + r) for r in rel)
    lq = max(1, int(n * q_frac))
    q, k, v, mask = random_case(seed, b, n, lq, *gqa, pad)
    spec = LayerSpec(windows, 1, sinks)
    out = attend(backend, q, k, v, spec, mask, 8 ** -0.5)
    check_all_rows(out, dense_reference(q, k, v, spec, mask, 8 ** -0.5), mask, lq)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_long_per_kv_head_band_and_gradients(backend):
    """The block-sparse paths (several query blocks), and their backward (sdpa) / forward (flex)."""
    q, k, v, _ = random_case(11, 1, 300, 300, 6, 3, pad=0, dim=16)
    spec = LayerSpec((40, None, 17), 1, 3)
    if backend == "flex":
        with torch.no_grad():
            torch.testing.assert_close(attend("flex", q, k, v, spec, None, 0.25),
                                       dense_reference(q, k, v, spec, None, 0.25), atol=2e-5, rtol=2e-5)
        return
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out = attend("sdpa", q, k, v, spec, None, 0.25)
    ref = dense_reference(q, k, v, spec, None, 0.25)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(ref, (q, k, v), grad_out)):
        torch.testing.assert_close(got, want)


# ---- model level ---------------------------------------------------------------------------

PER_KV = dict(window=[[5, None], [None, 3]], sinks=2)     # llama tiny: 4 query heads over 2 KV heads


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_per_kv_head_model_matches_reference(backend):
    """The tolerance also rejects a head one key off, a head made full, sinks +-1, the windows on
    the wrong heads and the unpatched model (``tests.models.wrong_specs``)."""
    model = tiny_model("llama", head_dim=16)
    ids, mask = model_ids(40, seed=9)
    specs = compare_with_reference(model, ids, mask, dict(PER_KV, backend=backend))
    assert specs == [LayerSpec((5, None), 1, 2), LayerSpec((None, 3), 1, 2)]


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_per_kv_head_families(family):
    model = tiny_model(family)
    ids, mask = model_ids(30, seed=4)
    layers = model.config.num_hidden_layers
    compare_with_reference(model, ids, mask, dict(window=[[4, None]] * layers, sinks=1, backend="sdpa"))


def test_training_gradients_match_reference():
    """A training step's gradients through a patched model equal the reference's."""
    model = tiny_model("llama")
    ids, mask = model_ids(36, seed=2)
    patch_model(model, backend="sdpa", **PER_KV)
    specs = layer_specs(model)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    unpatch_model(model)
    model.zero_grad()
    from tests.models import reference_attention
    with reference_attention(model, specs, ids.shape[1], mask):
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-5, rtol=1e-4)


# ---- the rolling cache ---------------------------------------------------------------------

@pytest.mark.parametrize("positions", ["original", "shift"])
def test_cache_decodes_like_the_parallel_forward(positions):
    """Windowed heads roll, full heads grow: decode == parallel forward (original positions),
    chunks == token-by-token (both modes)."""
    model = patch_model(tiny_model("llama"), backend="sdpa", positions=positions, **PER_KV)
    ids = ids_for(31, seed=4)
    steps, cache = stepwise(model, ids)
    assert all(isinstance(layer, SplitLayer) for layer in cache.layers)
    assert [layer.window_part.keys.shape for layer in cache.layers] == [(1, 1, 5, 16), (1, 1, 3, 16)]
    assert [layer.full_part.keys.shape for layer in cache.layers] == [(1, 1, 31, 16)] * 2
    if positions == "original":
        with torch.no_grad():
            torch.testing.assert_close(steps, model(ids).logits, atol=2e-5, rtol=0)
    chunks, _ = chunked(model, ids, [6, 1, 9, 2])
    torch.testing.assert_close(chunks, steps, atol=5e-5, rtol=0)


def test_padded_batch_through_the_cache_matches_reference():
    model = tiny_model("llama")
    ids, mask = model_ids(26, seed=5)
    patch_model(model, backend="sdpa", positions="original", **PER_KV)
    specs = layer_specs(model)
    steps, _ = stepwise(model, ids, mask=mask)
    unpatch_model(model)
    ref = reference_logits(model, specs, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(steps[real], ref[real], atol=2e-5, rtol=0)


def test_generate_equals_greedy_over_the_parallel_forward():
    """``generate()`` with the default (patched) cache gives the tokens of greedy decoding by
    full parallel forwards under the reference, well past every window."""
    model = tiny_model("llama")
    ids = ids_for(12, seed=7)
    patch_model(model, backend="sdpa", positions="original", **PER_KV)
    specs = layer_specs(model)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    unpatch_model(model)
    seq = ids
    for _ in range(20):
        nxt = reference_logits(model, specs, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_decode_full_with_per_kv_head_windows():
    """decode="full": prompt queries of windowed heads see their window, answer queries every key."""
    model = tiny_model("llama")
    ids = ids_for(30, seed=3)
    patch_model(model, backend="sdpa", decode="full", **PER_KV)
    specs = layer_specs(model)
    assert all(s.decode_full and s.kv_windows is not None for s in specs)
    with torch.no_grad():
        out = model(ids, prompt_lengths=18).logits
    streamed, _ = chunked(model, ids, [18, 1, 5, 6], cache=make_cache(model, prompt_lengths=18))
    unpatch_model(model)
    ref = reference_logits(model, specs, ids, full_from=torch.tensor([17]))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(streamed, ref, atol=5e-5, rtol=0)


def growth(options, n1=40, n2=70) -> float:
    """Cache bytes each token adds from ``n1`` to ``n2`` tokens fed one at a time (8 query, 4 KV heads
    of 16, float32); a decoding model gets a 10-token prompt."""
    model = patch_model(tiny_model("llama", num_key_value_heads=4, num_attention_heads=8, head_dim=16),
                        backend="sdpa", **options)
    prompt = {"prompt_lengths": 10} if "decode" in options else {}
    _, cache = stepwise(model, ids_for(n1, seed=1), cache=make_cache(model, **prompt))
    small = cache.nbytes()
    _, cache = stepwise(model, ids_for(n2, seed=1), cache=make_cache(model, **prompt))
    return (cache.nbytes() - small) / (n2 - n1)


def test_cache_bytes_grow_only_for_full_heads():
    """Past the window, each new token adds exactly the full heads' share of what a dense cache
    adds (keys, values and the real-token flag of each full part); the windowed heads stay."""
    one_full = growth(dict(window=[[6, None, 6, 6], [6, 6, 6, 6]], sinks=2))
    dense = growth(dict(window=[None, None], sinks=2))
    windowed = growth(dict(window=6, sinks=2))
    per_head_bytes = 2 * 16 * 4               # one head's key and value, float32
    assert windowed == 0
    assert dense == 2 * (4 * per_head_bytes + 1)          # 2 layers x (4 heads + the real flag)
    assert one_full == 1 * per_head_bytes + 1             # one head of one layer + its real flag


def test_crop_and_speculative_decoding():
    """Assisted decoding crops the cache: the windowed part rolls back, the full part truncates."""
    model = patch_model(tiny_model("llama"), backend="sdpa", positions="original", **PER_KV)
    draft = patch_model(tiny_model("llama", seed=1), backend="sdpa", positions="original", **PER_KV)
    ids = ids_for(10, seed=2)
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=16, do_sample=False)
        assisted = model.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=draft)
    assert torch.equal(plain, assisted)


# ---- checkpoints, refusals, reach ----------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    model = patch_model(tiny_model("llama"), backend="sdpa", **PER_KV)
    ids = ids_for(20, seed=1)
    with torch.no_grad():
        expected = model(ids).logits
    swa_patch.save_pretrained(model, tmp_path)
    assert '"window": [\n      [\n        5,\n        null' in (tmp_path / "config.json").read_text().replace("\r", "")
    loaded = swa_patch.from_pretrained(tmp_path)
    assert layer_specs(loaded) == layer_specs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("options,match", [
    (dict(window=[[4, None, 4], [4, 4]]), r"window\[0\] has 3 per-KV-head entries .* 2 KV heads"),
    (dict(window=[[4, 0], 4]), r"window\[0\] entry must be >= 1"),
    (dict(window=[4, [4, 2.5]]), r"window\[1\] entry must be an int"),
])
def test_validation_names_the_argument(options, match):
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises((ValueError, TypeError), match=match):
        patch_model(model, **options)
    assert getattr(model, "_swa_patch_state", None) is None
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="num_key_value_heads"):
        SWAConfig(window=[[4, None]]).layer_specs(1)


def test_static_cache_and_export_refuse(tmp_path):
    model = patch_model(tiny_model("llama"), backend="sdpa", **PER_KV)
    with pytest.raises(ValueError, match=r"static=True: layers \[0, 1\] have a window per KV head"):
        make_cache(model, static=True, max_cache_len=64)
    with pytest.raises(ValueError, match=r"a window per KV head in layers \[0, 1\]"):
        export_for_serving(model, tmp_path / "out", engine="vllm")


def test_receptive_field_of_a_layer_with_a_full_head():
    config = tiny_model("llama").config
    with pytest.raises(ValueError, match=r"layers \[0\] use full attention \(in some head\)"):
        receptive_field(config, window=[[4, None], [4, 4]])
    assert receptive_field(config, window=[[4, 7], [4, 3]]) == (7 - 1) + (4 - 1) + 1
    assert receptive_field(config, seq_len=50, window=[[4, None], [4, 3]]) == 50


# ---- decode="full" on some KV heads only ---------------------------------------------------

PER_KV_DECODE = dict(window=[[5, 5], [None, 3]], decode=[[1], [1]], sinks=2)


def test_spec_keeps_per_kv_head_decode_modes():
    spec = LayerSpec((5, None, 5), 1, 2, kv_decode_full=(True, False, False))
    assert spec.any_decode_full and not spec.decode_full and spec.grows and spec.per_head
    assert spec.head_groups(6, 3) == [(LayerSpec(5, 1, 2), [4, 5]), (LayerSpec(5, 1, 2, decode_full=True), [0, 1]),
                                      (LayerSpec(None), [2, 3])]
    assert LayerSpec(5, kv_decode_full=(True, True)) == LayerSpec(5, decode_full=True)
    assert LayerSpec(5, kv_decode_full=(False, False)) == LayerSpec(5)
    full_from = torch.tensor([12])
    mask = reference_mask(spec, 20, full_from=full_from, heads=6)
    assert torch.equal(mask[:, 0], reference_mask(LayerSpec(5, 1, 2, decode_full=True), 20, full_from=full_from))
    assert torch.equal(mask[:, 4], reference_mask(LayerSpec(5, 1, 2), 20))


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_decode_heads_match_reference(backend):
    """Prompt queries of a decoding head see their window, its answer queries every key; the other
    heads keep their windows.  The tolerance rejects the decode on the wrong head, on none and on all."""
    from tests.models import assert_matches_reference_only

    model = tiny_model("llama", head_dim=16)
    ids = ids_for(40, seed=3)
    patch_model(model, backend=backend, **PER_KV_DECODE)
    specs = layer_specs(model)
    assert [s.kv_decode_full for s in specs] == [(False, True), (False, True)]
    with torch.no_grad():
        out = model(ids, prompt_lengths=25).logits
    streamed, cache = chunked(model, ids, [25, 1, 1, 6, 7], cache=make_cache(model, prompt_lengths=25))
    unpatch_model(model)
    assert_matches_reference_only(model, out, specs, ids, full_from=torch.tensor([24]), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(streamed, out, atol=5e-5, rtol=0)
    # layer 0: head 0 rolls (5 slots), head 1 keeps every key; layer 1: head 0 full, head 1 decodes: all kept
    first, second = cache.layers
    assert first.window_part.keys.shape[1:3] == (1, 5) and first.full_part.keys.shape[1:3] == (1, 40)
    assert isinstance(second, FullLayer) and second.keys.shape[1:3] == (2, 40)


def test_generate_with_decode_heads_equals_greedy_over_the_reference():
    model = tiny_model("llama")
    ids = ids_for(14, seed=5)
    patch_model(model, backend="sdpa", **PER_KV_DECODE)
    specs = layer_specs(model)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    unpatch_model(model)
    seq = ids
    for _ in range(16):
        nxt = reference_logits(model, specs, seq, full_from=torch.tensor([13]))[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_decode_heads_cache_bytes_grow_only_for_those_heads():
    assert growth(dict(window=6, sinks=2, decode=[[2], []])) == 2 * 16 * 4 + 1      # one head's k, v + the flag
    assert growth(dict(window=6, sinks=2, positions="original")) == 0


@pytest.mark.parametrize("options,match", [
    (dict(window=4, decode=[[1]]), r"decode has 1 per-layer entries but the model has 2 layers"),
    (dict(window=4, decode=[[2], []]), r"decode\[0\] entry 2 is out of range: the model has KV heads 0..1"),
    (dict(window=4, decode=[[0], 1]), r"decode\[1\] must be a list of KV head indices"),
    (dict(window=4, decode=[[0], []], positions="shift"), r"positions='shift'"),
])
def test_decode_heads_validation(options, match):
    model = tiny_model("llama")
    with pytest.raises((ValueError, TypeError), match=match):
        patch_model(model, **options)
    assert getattr(model, "_swa_patch_state", None) is None


def test_cache_bytes_counts_every_part():
    """What the streaming table and the study's KV column read: both parts of a split layer."""
    from swa_patch.streaming import cache_bytes

    model = patch_model(tiny_model("llama"), backend="sdpa", positions="original", **PER_KV)
    _, cache = stepwise(model, ids_for(30, seed=1))
    parts = sum(p.nbytes() for layer in cache.layers for p in layer.parts)
    assert cache_bytes(cache) == cache.nbytes() == parts > 0
