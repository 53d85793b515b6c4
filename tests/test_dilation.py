"""Dilated windows and per-layer schedules in every backend, against dense references.

Attention level: random q/k/v, a reference that is plain softmax attention under
:func:`swa_patch.masks.reference_mask` (every row of the stream, GQA by repetition), and each
backend called the way the registered attention function calls it.  Model level: patched
tiny models against ``tests.models.reference_attention`` with the same per-layer specs.
"""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from swa_patch import SWAConfig, patch_model, unpatch_model
from swa_patch.attention import MaskInfo, contiguous_layout
from swa_patch.backends import BACKEND_MODULES
from swa_patch.backends import flash as flash_backend
from swa_patch.backends.layout import KeyLayout
from swa_patch.families import native_full_layers
from swa_patch.masks import LayerSpec, reference_mask
from swa_patch.patch import layer_specs
from tests.models import assert_matches_reference_only, per_head, tiny_model


def dense_reference(q, k, v, spec, attention_mask, scale):
    """Softmax attention of the last ``lq`` stream rows under the reference mask."""
    b, h, lq, _ = q.shape
    n = k.shape[2]
    mask = per_head(reference_mask(spec, n, attention_mask))[..., n - lq:, :]   # [B, H|1, lq, n]
    groups = h // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).double(), v.repeat_interleave(groups, 1).double()
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).to(q.dtype)         # [B, lq, H, D]


def run_backend(name, q, k, v, spec, attention_mask, scale):
    n, lq = k.shape[2], q.shape[2]
    info = MaskInfo(n - lq, None if attention_mask is None else attention_mask.bool())
    layout = contiguous_layout(info, q, k, v, spec)
    return BACKEND_MODULES[name].attend(q, k, v, layout, spec, scale)


def random_case(seed, b, n, lq, hq, hkv, pad, dim=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, dim, generator=g)
    k = torch.randn(b, hkv, n, dim, generator=g)
    v = torch.randn(b, hkv, n, dim, generator=g)
    mask = None
    if pad:
        mask = torch.ones(b, n, dtype=torch.long)
        for row in range(b):
            mask[row, : min(pad * (row + 1) // b, n - 1)] = 0   # left padding, row 0 least
    return q, k, v, mask


def check_all_rows(out, ref, attention_mask, lq):
    """Compare rows of real queries (a pad query's output is unspecified)."""
    if attention_mask is not None:
        real = attention_mask[:, -lq:].bool()
        out, ref = out[real], ref[real]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n=st.integers(1, 70), d=st.integers(1, 4),
       w_rel=st.integers(-8, 8), sinks=st.integers(0, 4), gqa=st.sampled_from([(4, 4), (4, 2), (4, 1)]),
       pad=st.integers(0, 9), b=st.integers(1, 2), q_frac=st.sampled_from([1.0, 0.5, 0.0]),
       backend=st.sampled_from(["eager", "sdpa"]))
def test_dilated_attention_matches_reference(seed, n, d, w_rel, sinks, gqa, pad, b, q_frac, backend):
    """Windows around the sequence length (in dilated steps), sinks 0..4, GQA, left padding,
    prefill (all queries) and chunked continuation (the last queries over all keys)."""
    window = max(1, -(-n // d) + w_rel)
    lq = max(1, int(n * q_frac))
    q, k, v, mask = random_case(seed, b, n, lq, *gqa, pad)
    spec = LayerSpec(window, d, sinks)
    out = run_backend(backend, q, k, v, spec, mask, 8 ** -0.5)
    check_all_rows(out, dense_reference(q, k, v, spec, mask, 8 ** -0.5), mask, lq)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("n,window,d,sinks", [(300, 17, 3, 0), (300, 40, 4, 4), (257, 64, 2, 2),
                                              (200, 50, 4, 1), (512, 65, 4, 0)])
def test_long_dilated_band(backend, n, window, d, sinks):
    """Several query blocks per residue class (the block-sparse path, not the dense one)."""
    q, k, v, mask = random_case(n + window, 2, n, n, 4, 2, pad=23)
    spec = LayerSpec(window, d, sinks)
    out = run_backend(backend, q, k, v, spec, mask, 8 ** -0.5)
    check_all_rows(out, dense_reference(q, k, v, spec, mask, 8 ** -0.5), mask, n)


def test_sdpa_dilated_band_has_gradients():
    q, k, v, _ = random_case(3, 1, 160, 160, 4, 2, pad=0)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    spec = LayerSpec(20, 3, 2)
    out = run_backend("sdpa", q, k, v, spec, None, 0.3)
    ref = dense_reference(q, k, v, spec, None, 0.3)
    gr = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), gr)
    g2 = torch.autograd.grad(ref, (q, k, v), gr)
    for a, b_ in zip(g1, g2):
        torch.testing.assert_close(a, b_)


# FlexAttention compiles once per shape (5-10 s on CPU): few shapes, shared with the model
# test below (batch 2, 4 query / 2 kv heads, head dim 16, 256 tokens, scale 1/4).
FLEX_CASES = [  # (lq, window, d, sinks, pad)
    (256, 24, 4, 3, 17),      # dilated, sinks, left padding, GQA, several blocks per class
    (130, 30, 3, 2, 0),       # chunked continuation: q_start > 0, class starts differ
]


@pytest.mark.parametrize("lq,window,d,sinks,pad", FLEX_CASES)
def test_flex_dilated_matches_reference(lq, window, d, sinks, pad):
    q, k, v, mask = random_case(7, 2, 256, lq, 4, 2, pad, dim=16)
    spec = LayerSpec(window, d, sinks)
    with torch.no_grad():
        out = run_backend("flex", q, k, v, spec, mask, 0.25)
    check_all_rows(out, dense_reference(q, k, v, spec, mask, 0.25), mask, lq)


def test_flex_dilated_block_mask_is_as_sparse_as_undilated():
    """The residue permutation makes the dilated block mask touch no more blocks than d=1
    (over the raw dilated pattern, span 93 > one 64-block, it would touch 9 blocks, not 7)."""
    from swa_patch.backends import flex

    counts = {}
    for d in (1, 4):
        q, k, v, _ = random_case(d, 2, 256, 256, 4, 2, pad=0, dim=16)
        info = MaskInfo(0, None)
        spec = LayerSpec(24, d, 0)
        layout = contiguous_layout(info, q, k, v, spec)
        with torch.no_grad():
            out = flex.attend(q, k, v, layout, spec, 0.25)
        check_all_rows(out, dense_reference(q, k, v, spec, None, 0.25), None, 256)
        (block_mask,) = [bm for key, bm in info.memo.items() if key[1] == spec and key[0] in ("flex", "flex-chunk")]
        counts[d] = int(block_mask.kv_num_blocks.sum()) + int(block_mask.full_kv_num_blocks.sum())
    assert counts[4] <= counts[1], counts


def test_flash_rejects_dilation():
    with pytest.raises(ValueError, match="dilation"):
        SWAConfig(window=8, dilation=2, backend="flash")
    with pytest.raises(ValueError, match="dilation"):
        SWAConfig(window=8, dilation=[1, 2], backend="flash")
    with pytest.raises(ValueError, match=r"flash.*dilation.*local-to-dilated.*layers \[1, 2, 3\]"):
        SWAConfig(window=8, schedule="local-to-dilated", backend="flash").layer_specs(4)
    q, k, v, _ = random_case(0, 1, 16, 16, 2, 2, pad=0)
    layout = contiguous_layout(MaskInfo(0, None), q, k, v, LayerSpec(4, 2))
    with pytest.raises(ValueError, match="dilation"):
        flash_backend.attend(q, k, v, layout, LayerSpec(4, 2), 0.3)


def test_auto_never_picks_flash_for_dilation(monkeypatch, caplog):
    from swa_patch import attention

    monkeypatch.setattr(attention, "flash_available", lambda kernel="flash": kernel == "flash")
    q = torch.zeros(1, 2, 4096, 8)

    class FakeQ:   # choose_backend reads only these attributes: a CUDA query stand-in
        shape, is_cuda, requires_grad = q.shape, True, False
    layout = KeyLayout(0, 0)
    assert attention.choose_backend("auto", FakeQ, LayerSpec(8, 1), layout) == "flash"
    assert attention.choose_backend("auto", FakeQ, LayerSpec(8, 2), layout) != "flash"


# ---- model level: scheduled stacks ----------------------------------------------------------

def model_ids(n, b=2, pad=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[-1, :pad] = 0
    ids[-1, :pad] = 0
    return ids, mask


def compare_with_reference(model, ids, mask, options, atol=2e-4):
    n = ids.shape[1]
    patch_model(model, **options)
    try:
        specs = layer_specs(model)
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
    finally:
        unpatch_model(model)
    # the reference, and the same tolerance rejects W-1, W+1, dilation+1 and the unpatched model
    assert_matches_reference_only(model, got, specs, ids, mask, atol=atol, rtol=atol)
    return specs


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_scheduled_stack_matches_reference(backend):
    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = model_ids(90)
    specs = compare_with_reference(model, ids, mask, dict(
        window=[6, 9, None, 5], dilation=[1, 2, 1, 4], sinks=2, backend=backend))
    assert specs == [LayerSpec(6, 1, 2), LayerSpec(9, 2, 2), LayerSpec(None), LayerSpec(5, 4, 2)]


def test_named_schedule_and_full_layers_match_reference():
    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = model_ids(80, seed=1)
    specs = compare_with_reference(model, ids, mask, dict(
        window=7, schedule="local-to-dilated", full_layers=[2], sinks=1, backend="sdpa"))
    assert specs == [LayerSpec(7, 1, 1), LayerSpec(7, 2, 1), LayerSpec(None), LayerSpec(7, 8, 1)]


def test_flex_scheduled_stack_matches_reference():
    model = tiny_model("llama", num_hidden_layers=2, head_dim=16)
    ids, mask = model_ids(256, seed=2, pad=11)
    compare_with_reference(model, ids, mask, dict(window=24, dilation=[1, 4], sinks=3, backend="flex"))


@pytest.mark.parametrize("family,native_full", [("gemma3_text", {2}), ("gemma2", {1}), ("gpt_oss", {1}),
                                                ("qwen2", {0})])
def test_hybrid_models_keep_native_global_layers(family, native_full):
    model = tiny_model(family)
    assert native_full_layers(model.config) == native_full
    ids, mask = model_ids(40, seed=3)
    specs = compare_with_reference(model, ids, mask, dict(window=5, dilation=2, sinks=1, backend="sdpa"))
    assert {i for i, s in enumerate(specs) if s.window is None} == native_full
    assert all(s == LayerSpec(5, 2, 1) for i, s in enumerate(specs) if i not in native_full)


def test_hybrid_override_with_per_layer_windows():
    model = tiny_model("gemma3_text")
    ids, mask = model_ids(40, seed=4)
    specs = compare_with_reference(model, ids, mask, dict(window=[5, 5, 6], dilation=[1, 2, 3], backend="sdpa"))
    assert specs[2] == LayerSpec(6, 3, 0)      # the native global layer, overridden


def test_window_covering_sequence_is_unpatched_model_and_dilation_is_not():
    """W >= n with d=1 in every layer gives the unpatched logits; a dilated layer whose span
    covers the sequence still has gaps, so it must differ (the dilation is really applied)."""
    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = model_ids(30, seed=5)
    real = mask.bool()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    for options, same in [(dict(window=[30, 40, None, 30]), True),
                          (dict(window=[30, 15, 8, 4], dilation=[1, 2, 4, 8]), False)]:
        patch_model(model, backend="sdpa", **options)
        try:
            with torch.no_grad():
                got = model(input_ids=ids, attention_mask=mask).logits
        finally:
            unpatch_model(model)
        assert torch.allclose(got[real], want[real], atol=1e-5) == same, options


# ---- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("options,match", [
    (dict(window=[4, 4, 4]), r"window has 3 entries .* 4 layers"),
    (dict(window=4, dilation=[1, 2]), r"dilation has 2 entries .* 4 layers"),
    (dict(window=4, full_layers=[4]), r"full_layers entry 4 is out of range"),
    (dict(window=4, full_layers=[-1]), r"full_layers entry must be >= 0"),
    (dict(window=[4, 4, 4, 0]), r"window must be >= 1"),
    (dict(window=4, dilation=[1, 2, 0, 1]), r"dilation must be >= 1"),
    (dict(window=4, schedule="nope"), r"schedule must be one of"),
    (dict(window=[4, 4, 4, 4], schedule="local-to-dilated"), r"schedule='local-to-dilated' needs window"),
    (dict(schedule="local-to-dilated"), r"schedule='local-to-dilated' needs window"),
    (dict(window=4, dilation=2, schedule="local-to-dilated"), r"sets the dilation of every layer"),
])
def test_schedule_validation_names_the_argument(options, match):
    model = tiny_model("llama", num_hidden_layers=4)
    with pytest.raises((ValueError, TypeError), match=match):
        patch_model(model, **options)
    assert getattr(model, "_swa_patch_state", None) is None      # nothing touched


def test_named_schedules_expand_as_documented():
    cfg = lambda name, w=512: SWAConfig(window=w, schedule=name)
    assert [s.dilation for s in cfg("local-to-dilated").layer_specs(24)] == [1] * 6 + [2] * 6 + [4] * 6 + [8] * 6
    assert [s.window for s in cfg("small-to-large").layer_specs(8)] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [s.window for s in cfg("local-global").layer_specs(12)] == [512] * 5 + [None] + [512] * 5 + [None]
    # named schedules keep a hybrid model's native global layers global
    assert cfg("local-to-dilated").layer_specs(4, {3})[3] == LayerSpec(None)


@pytest.mark.parametrize("chunks", [(37, 1, 1, 25), (5, 58)])
def test_chunked_prefill_of_dilated_stack_equals_full_forward(chunks):
    """Chunks of any size (1 = decode steps) over transformers' default cache give the logits
    of one full forward (keys kept in full here; the rolling cache is tested with the cache)."""
    model = tiny_model("llama", num_hidden_layers=3)
    ids, _ = model_ids(sum(chunks), b=1, pad=0, seed=6)
    patch_model(model, window=[5, 4, 3], dilation=[1, 3, 4], sinks=2, backend="sdpa")
    try:
        with torch.no_grad():
            full = model(input_ids=ids).logits
            cache, parts, start = None, [], 0
            for size in chunks:
                out = model(input_ids=ids[:, start:start + size], cache=cache, use_cache=True)
                cache, start = out.past_key_values, start + size
                parts.append(out.logits)
    finally:
        unpatch_model(model)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def test_qwen2_without_sliding_window_patches_every_layer():
    """Real Qwen2 checkpoints set use_sliding_window=False: no native global layers then."""
    model = tiny_model("qwen2", use_sliding_window=False)
    assert native_full_layers(model.config) == set()
    ids, mask = model_ids(30, seed=8)
    specs = compare_with_reference(model, ids, mask, dict(window=4, dilation=3, backend="sdpa"))
    assert specs == [LayerSpec(4, 3, 0)] * 2


def test_dilation_benchmark_runs_and_counts_flex_blocks(tmp_path):
    """benchmarks/dilation.py end to end at a small size: every flex row reports the blocks its
    masks touch (the dilated band as sparse as the undilated one), every row a timing."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(root / "benchmarks" / "dilation.py"), "--n", "1024", "--window", "64",
                    "--repeats", "1", "--out", str(tmp_path)], check=True, env=env, capture_output=True, timeout=600)
    with open(tmp_path / "dilation.csv") as f:
        rows = list(csv.DictReader(f))
    flex_rows = [r for r in rows if r["backend"] == "flex"]
    assert len(flex_rows) == 3 and all(int(r["flex_blocks"]) > 0 for r in flex_rows)
    d1, d4 = (next(int(r["flex_blocks"]) for r in flex_rows if r["dilation"] == d) for d in ("1", "4"))
    assert d4 <= 1.2 * d1
    assert all(float(r["median_s"]) > 0 and r["command"] for r in rows)
