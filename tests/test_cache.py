"""SWACache: invariants 2-4 (decode == parallel band forward, chunked == token-by-token,
constant memory), shift-mode positions against an independent re-encoding, batch ops."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import DynamicCache

from swa_patch import SWACache, make_cache, patch_model, unpatch_model
from swa_patch.rope import LayerRope, rotate
from tests.models import reference_attention, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny matrices (see conftest)

W = 4
ATOL = 2e-5


def patched(family="llama", window=W, sinks=2, positions="original", **kw):
    model = tiny_model(family, **kw)
    return patch_model(model, window=window, sinks=sinks, positions=positions, backend="sdpa")


def ids_for(n, batch=1, seed=0):
    return torch.randint(3, 90, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def stepwise(model, ids, cache=None, mask=None):
    """Token-by-token logits ``[B, n, V]`` through an SWACache."""
    cache = make_cache(model) if cache is None else cache
    out = []
    for i in range(ids.shape[1]):
        kw = {} if mask is None else {"attention_mask": mask[:, : i + 1]}
        out.append(model(ids[:, i:i + 1], cache=cache, **kw).logits)
    return torch.cat(out, 1), cache


@torch.no_grad()
def chunked(model, ids, sizes, cache=None):
    cache = make_cache(model) if cache is None else cache
    out, i = [], 0
    for q in sizes:
        if i >= ids.shape[1]:
            break
        out.append(model(ids[:, i:i + q], cache=cache).logits)
        i += q
    if i < ids.shape[1]:
        out.append(model(ids[:, i:], cache=cache).logits)
    return torch.cat(out, 1), cache


# ---- invariant 2: decoding with the cache == the parallel band forward ------------------------
@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma3_text", "qwen2", "phi"])
@pytest.mark.parametrize("sinks", [0, 1, 2, 4])
def test_decode_equals_parallel_forward(family, sinks):
    """Causal: one sequence of S + W + 3 tokens covers the edges n = S+W-1, S+W, S+W+1."""
    model = patched(family, sinks=sinks)
    ids = ids_for(sinks + W + 3, seed=sinks)
    with torch.no_grad():
        parallel = model(ids).logits
    steps, _ = stepwise(model, ids)
    torch.testing.assert_close(steps, parallel, atol=ATOL, rtol=0)


OTHER_FAMILIES = ["mistral", "qwen3", "gemma", "gemma2", "phi3", "starcoder2", "olmo2", "granite",
                  "gpt_oss", "smollm3", "gpt2"]


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_every_family_decodes_and_streams_in_chunks(family):
    """Original positions: decode == parallel forward; shift (RoPE families): chunks == steps."""
    ids = ids_for(13, seed=3)
    model = patched(family, sinks=2)
    with torch.no_grad():
        parallel = model(ids).logits
    steps, _ = stepwise(model, ids)
    torch.testing.assert_close(steps, parallel, atol=ATOL, rtol=0)
    if family != "gpt2":
        model = patched(family, sinks=2, positions="shift")
        steps, _ = stepwise(model, ids)
        chunks, _ = chunked(model, ids, [5, 1, 7])
        torch.testing.assert_close(chunks, steps, atol=5e-5, rtol=0)


def test_parallel_forward_is_the_reference_and_not_dense():
    """Anchor: the parallel forward compared above is the dense reference's band, not full attention."""
    model = patched("llama", sinks=2)
    ids = ids_for(12)
    steps, _ = stepwise(model, ids)
    unpatch_model(model)
    with torch.no_grad():
        dense = model(ids).logits
        with reference_attention(model, model_specs(), 12):
            ref = model(ids).logits
    torch.testing.assert_close(steps, ref, atol=ATOL, rtol=0)
    assert (steps - dense).abs().max() > 1e-3


def model_specs(window=W, sinks=2, n_layers=2, dilation=1):
    from swa_patch.masks import LayerSpec
    return [LayerSpec(window, dilation, sinks)] * n_layers


def test_dilated_decode_equals_parallel_forward():
    model = tiny_model("llama")
    patch_model(model, window=3, sinks=1, dilation=2, positions="original", backend="sdpa")
    ids = ids_for(17)
    with torch.no_grad():
        parallel = model(ids).logits
    steps, cache = stepwise(model, ids)
    torch.testing.assert_close(steps, parallel, atol=ATOL, rtol=0)
    assert cache.layers[0].keys.shape[2] == (3 - 1) * 2 + 1       # span slots


def test_left_padded_rows_equal_rows_alone():
    model = patched("llama", sinks=2)
    a, b = ids_for(11, seed=1), ids_for(8, seed=2)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    steps, _ = stepwise(model, ids, mask=mask)
    alone_a, _ = stepwise(model, a)
    alone_b, _ = stepwise(model, b)
    torch.testing.assert_close(steps[0], alone_a[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(steps[1, 3:], alone_b[0], atol=ATOL, rtol=0)


# ---- invariant 3: chunked == token-by-token, both position modes ---------------------------
@pytest.mark.parametrize("family,positions", [("llama", "original"), ("llama", "shift"),
                                               ("gpt_neox", "original"), ("gpt_neox", "shift"),
                                               ("gemma3_text", "original"), ("gemma3_text", "shift"),
                                               ("phi", "shift"), ("qwen2", "original")])
@settings(max_examples=8, deadline=None)
@given(sizes=st.lists(st.integers(1, 13), min_size=1, max_size=6), sinks=st.sampled_from([0, 3]))
def test_chunked_equals_token_by_token(family, positions, sizes, sinks):
    """30 tokens (several evictions and shift-mode frame rebases) in random chunks."""
    key = (family, positions, sinks)
    if key not in TOKEN_BY_TOKEN:
        model = patched(family, sinks=sinks, positions=positions)
        TOKEN_BY_TOKEN[key] = (model, stepwise(model, IDS30)[0])
    model, steps = TOKEN_BY_TOKEN[key]
    chunks, cache = chunked(model, IDS30, sizes)
    torch.testing.assert_close(chunks, steps, atol=5e-5, rtol=0)
    assert cache.get_seq_length() == 30


TOKEN_BY_TOKEN: dict = {}
IDS30 = ids_for(30, seed=7)


def test_shift_positions_differ_from_original():
    ids = ids_for(30)
    shift, _ = stepwise(patched(sinks=2, positions="shift"), ids)
    orig, _ = stepwise(patched(sinks=2, positions="original"), ids)
    assert (shift[:, :W] - orig[:, :W]).abs().max() < ATOL      # every key still in the band
    assert (shift[:, -5:] - orig[:, -5:]).abs().max() > 1e-4


# ---- invariant 4: constant memory, in-place buffer ----------------------------------------------
@pytest.mark.parametrize("positions", ["original", "shift"])
def test_cache_bytes_constant_and_buffer_in_place(positions):
    model = patched(sinks=3, positions=positions)
    cache = make_cache(model)
    sizes, ptrs = [], set()
    with torch.no_grad():
        for i, tok in enumerate(ids_for(60)[0]):
            model(tok.view(1, 1), cache=cache)
            sizes.append(cache.nbytes())
            if i > 3 + W and positions == "original":
                ptrs.add(cache.layers[0].keys.data_ptr())
    assert len(set(sizes[3 + W:])) == 1
    assert positions == "shift" or len(ptrs) == 1
    assert cache.layers[0].keys.shape[2] == W and cache.get_seq_length() == 60


# ---- shift mode against an independent re-encoding ---------------------------------------------
YARN = dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                             "original_max_position_embeddings": 16})
LLAMA3 = dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 16})


@pytest.mark.parametrize("family,extra", [("llama", {}), ("gpt_neox", {}), ("phi", {}),
                                          ("gemma3_text", {"layer_types": ["sliding_attention"]}),
                                          ("gemma3_text", {"layer_types": ["full_attention"]}),
                                          ("llama", YARN), ("llama", LLAMA3)],
                         ids=["llama", "gpt_neox", "phi", "gemma3_text", "gemma3_text_global_windowed", "yarn",
                              "llama3"])
def test_shift_step_equals_reencoding_of_kept_tokens(family, extra):
    """One attention layer, so the step's logits depend only on the kept tokens: re-encode
    [sinks, window] with the unpatched model at the in-cache positions (sinks 0..S-1, the
    window ending at S + W - 1) and compare the logits and the first layer's keys.  A Gemma 3
    global layer, windowed by a per-layer list, keeps its own RoPE base (1e6, not 1e4)."""
    s, n = 2, 23
    overrides = dict(num_hidden_layers=1, **extra)
    window = [W] if family == "gemma3_text" else W        # a list windows a global layer too
    model = patched(family, window=window, sinks=s, positions="shift", **overrides)
    ids = ids_for(n)
    steps, cache = stepwise(model, ids)
    plain = unpatch_model(tiny_model(family, **overrides))
    kept = torch.cat([ids[:, :s], ids[:, n - W:]], 1)
    positions = torch.arange(s + W)[None]
    ref_cache = DynamicCache(config=plain.config)
    with torch.no_grad():
        ref = plain(kept, position_ids=positions, cache=ref_cache).logits[:, -1]
    torch.testing.assert_close(steps[:, -1], ref, atol=ATOL, rtol=0)
    layer = cache.layers[0]
    rope = cache.ropes[0]
    window_slots = torch.arange(n - W, n) % W
    query_pos = n - 1 - cache.base
    ours = rotate(layer.keys[:, :, window_slots], (s + W - 1) - query_pos, rope)
    torch.testing.assert_close(ours, ref_cache.layers[0].keys[:, :, s:], atol=ATOL, rtol=0)
    sinks = rotate(layer.sink_k, torch.arange(s), rope)      # stored un-rotated (position 0)
    torch.testing.assert_close(sinks, ref_cache.layers[0].keys[:, :, :s], atol=ATOL, rtol=0)


def _kept(ids_row, real_row, t, s, w):
    """What shift mode attends from the query at stream index t, as (tokens, positions) of an
    independent re-encoding: the window's real tokens at their true offsets from the query
    (placed at s + w - 1), each sink outside the window at position k (its rank among the
    real tokens), so its offset is s + w - 1 - k: directly before the window, never further."""
    real = [j for j in range(t + 1) if real_row[j]]
    window = [j for j in real if t - j < w]
    sinks = [(k, j) for k, j in enumerate(real[:s]) if t - j >= w]
    tokens = [j for _, j in sinks] + window
    positions = [k for k, _ in sinks] + [s + w - 1 - (t - j) for j in window]
    return ids_row[tokens][None], torch.tensor(positions)[None]


@pytest.mark.parametrize("family,extra", [("llama", {}), ("gpt_neox", {}), ("llama", YARN)],
                         ids=["llama", "gpt_neox-partial-rotary", "yarn"])
def test_shift_every_step_equals_reencoding(family, extra):
    """Every step of a stream ~8 rebase periods long (a left-padded batch, a chunked prefill,
    then token by token) equals an unpatched re-encoding of what the step keeps, at positions
    0..: the sinks, then the window (one layer: a step depends on the kept tokens only)."""
    s, n, prefill = 2, 70, 17
    overrides = dict(num_hidden_layers=1, **extra)
    model = patched(family, sinks=s, positions="shift", **overrides)
    plain = unpatch_model(tiny_model(family, **overrides))
    ids = ids_for(n, batch=2, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    cache = make_cache(model)
    with torch.no_grad():
        logits = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], cache=cache).logits]
        for t in range(prefill, n):
            logits.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits)
        logits = torch.cat(logits, 1)
        assert cache.base > 6 * cache.keep                         # many rebases happened
        for row in range(2):
            for t in range(n):
                if not mask[row, t]:
                    continue
                kept, positions = _kept(ids[row], mask[row].bool(), t, s, W)
                ref = plain(kept, position_ids=positions).logits[0, -1]
                torch.testing.assert_close(logits[row, t], ref, atol=ATOL, rtol=0, msg=f"row {row} step {t}")


def test_shift_rebases_frame_and_bounds_positions():
    model = patched(sinks=2, positions="shift")
    cache = make_cache(model)
    seen_positions = []
    hook = model.model.register_forward_pre_hook(
        lambda m, a, k: seen_positions.append(int(k["position_ids"].max())), with_kwargs=True)
    chunked(model, ids_for(200), [7, 1, 1, 30, 3], cache=cache)
    hook.remove()
    assert cache.base > 0
    assert max(seen_positions[:-1]) < 2 * cache.keep + 30


def test_rotate_composes_and_keeps_pass_through_channels():
    rope = LayerRope(1.0 / (10000 ** (torch.arange(0, 4, 2).float() / 4)))
    x = torch.randn(2, 3, 5, 6)
    y = rotate(rotate(x, 7, rope), -3, rope)
    torch.testing.assert_close(y, rotate(x, 4, rope), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[..., 4:], x[..., 4:])


# ---- batch operations, crop, reset, errors -----------------------------------------------------
def test_reorder_and_select_follow_rows():
    model = patched(sinks=2)
    ids = ids_for(15, batch=2)
    cache = make_cache(model)
    with torch.no_grad():
        model(ids[:, :9], cache=cache)
        cache.reorder_cache(torch.tensor([1, 0]))
        swapped = model(ids.flip(0)[:, 9:], cache=cache).logits
    ref, _ = chunked(model, ids.flip(0), [9, 6])
    torch.testing.assert_close(swapped, ref[:, 9:], atol=ATOL, rtol=0)
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].keys.shape[0] == 4 and cache.first_real.shape[0] == 4
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert cache.layers[1].sink_k.shape[0] == 2


def test_crop_reset_and_errors():
    model = patched(sinks=1)
    cache = make_cache(model)
    chunked(model, ids_for(12), [12], cache=cache)
    with pytest.raises(ValueError, match="evicted"):
        cache.crop(-5)
    cache.crop(-1)
    assert cache.get_seq_length() == 11
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    with pytest.raises(TypeError, match="window_size"):
        make_cache(model, window_size=3)
    with pytest.raises(ValueError, match="patched"):
        make_cache(tiny_model("llama"))
    with pytest.raises(ValueError, match="positions"):
        make_cache(model, positions="absolute")


def test_shift_refused_where_it_cannot_be_exact():
    with pytest.raises(ValueError, match="absolute"):
        patch_model(tiny_model("gpt2"), window=4, sinks=2, positions="shift")
    dyn = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="dynamic"):
        patch_model(dyn, window=4, sinks=2, positions="shift")
    assert not hasattr(dyn, "_swa_patch_state")
    with pytest.raises(ValueError, match="dynamic"):                # default positions with sinks: shift
        patch_model(tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                         "rope_theta": 1e4}), window=4, sinks=2)
    gpt2 = patch_model(tiny_model("gpt2"), window=4, sinks=2)     # absolute positions: default original
    assert make_cache(gpt2).position_mode == "original"
    with pytest.raises(ValueError, match="positions='original'"):
        make_cache(gpt2, positions="shift")


def test_unpatch_removes_every_hook():
    model = tiny_model("llama")
    before = [len(m._forward_pre_hooks) for m in model.modules()]
    patch_model(model, window=4, sinks=2)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) > sum(before)
    unpatch_model(model)
    assert [len(m._forward_pre_hooks) for m in model.modules()] == before


# ---- soak --------------------------------------------------------------------------------------
def test_soak_100k_tokens_constant_memory():
    model = patch_model(tiny_model("llama", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1),
                        window=64, sinks=4, backend="sdpa")          # shift mode (sinks > 0)
    cache = make_cache(model)
    chunk = 1000
    ids = ids_for(chunk)
    sizes = set()
    with torch.no_grad():
        for i in range(100):
            logits = model(ids.roll(i, 1), cache=cache).logits
            assert torch.isfinite(logits).all()
            if i:
                sizes.add(cache.nbytes())
    assert cache.get_seq_length() == 100_000 and len(sizes) == 1


def test_full_layers_in_the_cache_keep_the_unmasked_causal_kernel(monkeypatch):
    """A full-attention layer prefilled through the cache without padding runs torch's plain
    causal SDPA (no [n, n] mask: O(n) memory, the fast kernel), and a padded one a masked call."""
    from swa_patch.backends import sdpa
    calls, plain_sdpa = [], sdpa.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape[-2], attn_mask is None, is_causal))
        return plain_sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)
    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", spy)
    model = patch_model(tiny_model("llama"), window=[4, None], backend="sdpa")
    ids = ids_for(30)
    with torch.no_grad():
        model(ids, cache=make_cache(model))
        assert (30, True, True) in calls
        calls.clear()
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        model(ids, attention_mask=mask, cache=make_cache(model))
        assert (30, True, True) not in calls and (30, False, False) in calls


@pytest.mark.parametrize("positions,sinks", [("original", 2), ("shift", 2), ("shift", 0)])
@pytest.mark.parametrize("rollback", [0, 3])
def test_decode_drops_the_mask_only_where_every_slot_is_visible(monkeypatch, positions, sinks, rollback):
    """A decode step over a full ring without pads, with every sink older than the window, runs
    without a mask (``layout.unmasked``) over ``[sink slots, ring]`` as one view of the cache's
    buffer.  Wherever it does, the mask it skips is all True, and the logits equal those of the
    same stream with the mask always built.  The ring filling (sinks inside the band), pads still
    in the ring (left padding, a pad mid-stream), spare rollback slots and a dilated window keep
    the mask."""
    import dataclasses

    from swa_patch import cache as cache_module
    from swa_patch.backends import sdpa
    seen, dense = [], sdpa._dense

    def spy(q, k, v, layout, spec, *args):
        if layout.key_index is not None:                 # a decode step over a sliding layer's ring
            mask = dataclasses.replace(layout, memo=None).dense_mask(spec, 1, k.shape[2], q.shape[0], q.device)
            joined = layout.keys_with_sinks(k, v)[0]
            view = not layout.n_sinks or joined.data_ptr() == layout.sink_k.data_ptr()
            seen.append((spec.dilation, layout.unmasked, bool(mask.all()), view))
        return dense(q, k, v, layout, spec, *args)
    monkeypatch.setattr(sdpa, "_dense", spy)
    model = patch_model(tiny_model("llama"), window=W, sinks=sinks, dilation=[1, 2], positions=positions,
                        backend="sdpa")
    ids = ids_for(30, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[0, 15] = 0
    streams = [(ids, mask), (ids[:1], None)]          # with pads, and without (the ring filling alone)
    outs = [stepwise(model, x, make_cache(model, rollback=rollback), m)[0] for x, m in streams]
    assert all(full for _, unmasked, full, _ in seen if unmasked), "a mask that hides a slot was dropped"
    assert all(view for *_, view in seen), "the sink slots and the ring were copied, not joined"
    assert any(unmasked for _, unmasked, *_ in seen) == (rollback == 0)
    assert not any(unmasked for d, unmasked, *_ in seen if d > 1)
    monkeypatch.setattr(cache_module.SlidingLayer, "_all_visible", lambda self, i: False)
    for out, (x, m) in zip(outs, streams):
        masked, _ = stepwise(model, x, make_cache(model, rollback=rollback), m)
        torch.testing.assert_close(out, masked, atol=ATOL, rtol=0)
