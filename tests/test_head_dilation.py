"""Per-head dilation: each query head of a layer has its own dilation.

Every check is against a dense reference that builds one mask per head from the shared
predicate (``reference_mask`` of a per-head spec is ``[B, H, n, n]``): random attention
inputs through the registered attention function, patched tiny models, the rolling cache,
checkpoints, and the receptive field (brute force and gradients).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import swa_patch
from swa_patch import SWAConfig, make_cache, patch_model, receptive_field, unpatch_model
from swa_patch.attention import LayerPlan, MaskInfo, _select_heads, contiguous_layout, run_plan
from swa_patch.backends.layout import KeyLayout
from swa_patch.masks import LayerSpec, band, reference_mask
from swa_patch.patch import layer_specs
from swa_patch.receptive import reach_of_specs, reachable_positions
from tests.models import per_head, tiny_model
from tests.test_dilation import check_all_rows, compare_with_reference, dense_reference, model_ids, random_case
from tests.test_receptive import GRAD_MODEL, brute_force, gradient_support


def attend(backend, q, k, v, spec, attention_mask, scale):
    """The registered attention function, as a patched layer calls it."""
    n, lq = k.shape[2], q.shape[2]
    info = MaskInfo(n - lq, None if attention_mask is None else attention_mask.bool())
    return run_plan(LayerPlan(spec, backend), q, k, v, info, scaling=scale)


# ---- the spec ----------------------------------------------------------------------------

def test_spec_keeps_per_head_values_and_covers_the_widest_head():
    spec = LayerSpec(5, (1, 4, 2, 4), 2)
    assert spec.head_dilations == (1, 4, 2, 4) and spec.dilation == 4
    assert spec.span == 4 * 4 + 1 and spec.cache_slots == 16
    assert [(s, heads) for s, heads in spec.head_groups(4)] == [
        (LayerSpec(5, 1, 2), [0]), (LayerSpec(5, 2, 2), [2]), (LayerSpec(5, 4, 2), [1, 3])]
    assert LayerSpec(5, [3, 3]) == LayerSpec(5, 3)                  # one value: a plain dilation
    with pytest.raises(ValueError, match="head_groups"):
        band(torch.tensor(3), torch.tensor(1), spec)
    mask = reference_mask(spec, 20)
    assert mask.shape == (1, 4, 20, 20)
    for head, d in enumerate(spec.head_dilations):
        assert torch.equal(mask[:, head], reference_mask(LayerSpec(5, d, 2), 20))


# ---- attention level -----------------------------------------------------------------------

head_dilations = st.lists(st.integers(1, 4), min_size=4, max_size=4)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n=st.integers(1, 70), dil=head_dilations, w_rel=st.integers(-8, 8),
       sinks=st.integers(0, 4), gqa=st.sampled_from([(4, 4), (4, 2), (4, 1)]), pad=st.integers(0, 9),
       b=st.integers(1, 2), q_frac=st.sampled_from([1.0, 0.5, 0.0]), backend=st.sampled_from(["eager", "sdpa"]))
def test_per_head_attention_matches_reference(seed, n, dil, w_rel, sinks, gqa, pad, b, q_frac, backend):
    """Windows around the sequence length, sinks, GQA groups whole or split across dilations,
    left padding, prefill and chunked continuation."""
    window = max(1, -(-n // max(dil)) + w_rel)
    lq = max(1, int(n * q_frac))
    q, k, v, mask = random_case(seed, b, n, lq, *gqa, pad)
    spec = LayerSpec(window, tuple(dil), sinks)
    out = attend(backend, q, k, v, spec, mask, 8 ** -0.5)
    check_all_rows(out, dense_reference(q, k, v, spec, mask, 8 ** -0.5), mask, lq)


@pytest.mark.parametrize("dil", [(1, 3, 3, 1), (2, 2, 4, 4)])
def test_long_per_head_band_and_gradients(dil):
    """Several query blocks per residue class (the block-sparse path), and its backward."""
    q, k, v, _ = random_case(11, 1, 300, 300, 4, 2, pad=0)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    spec = LayerSpec(40, dil, 3)
    out = attend("sdpa", q, k, v, spec, None, 0.3)
    ref = dense_reference(q, k, v, spec, None, 0.3)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(ref, (q, k, v), grad_out)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dil", [(1, 4, 4, 1), (1, 1, 4, 4)], ids=["split-gqa", "whole-gqa"])
def test_flex_per_head_matches_reference(dil):
    q, k, v, mask = random_case(7, 2, 256, 256, 4, 2, 17, dim=16)
    spec = LayerSpec(24, dil, 3)
    with torch.no_grad():
        out = attend("flex", q, k, v, spec, mask, 0.25)
    check_all_rows(out, dense_reference(q, k, v, spec, mask, 0.25), mask, 256)


def test_head_groups_read_the_right_kv_heads():
    """Whole GQA groups keep their shared kv heads (no copies); split ones get one per query head."""
    q, k, v, _ = random_case(0, 1, 10, 10, 8, 2, pad=0)
    layout = contiguous_layout(MaskInfo(0, None), q, k, v, LayerSpec(4, 2, 1))
    gq, gk, _, group_layout, _ = _select_heads(q, k, v, layout, None, [4, 5, 6, 7])
    assert gk.shape[1] == 1 and gk.data_ptr() == k[:, 1].data_ptr()
    assert group_layout.sink_k.shape[1] == 1
    gq, gk, _, group_layout, _ = _select_heads(q, k, v, layout, None, [0, 1, 6])
    assert torch.equal(gq, q[:, [0, 1, 6]]) and torch.equal(gk, k[:, [0, 0, 1]])
    assert torch.equal(group_layout.sink_k, layout.sink_k[:, [0, 0, 1]])


def test_auto_picks_a_kernel_per_head_group(monkeypatch):
    """On CUDA with flash-attn, ``auto`` runs the undilated heads on flash and the dilated ones
    on a kernel that can express dilation (never flash, never a silent dense fallback)."""
    from swa_patch import attention

    monkeypatch.setattr(attention, "flash_available", lambda kernel="flash": kernel == "flash")

    class FakeQ:   # choose_backend reads only these attributes: a CUDA query stand-in
        shape, is_cuda, requires_grad = (1, 2, 4096, 8), True, False
    choices = [attention.choose_backend("auto", FakeQ, group_spec, KeyLayout(0, 0))
               for group_spec, _ in LayerSpec(64, (1, 1, 2, 4), 0).head_groups(4)]
    assert choices == ["flash", "flex", "flex"]


# ---- model level ---------------------------------------------------------------------------

PER_HEAD = dict(window=[5, 4], dilation=[[1, 1, 1, 4], [3, 3, 1, 1]], sinks=2)   # split, whole GQA groups


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_per_head_model_matches_reference(backend):
    model = tiny_model("llama")                         # 4 query heads, 2 kv heads
    ids, mask = model_ids(70, seed=9)
    specs = compare_with_reference(model, ids, mask, dict(PER_HEAD, backend=backend))
    assert specs == [LayerSpec(5, (1, 1, 1, 4), 2), LayerSpec(4, (3, 3, 1, 1), 2)]


def test_flex_per_head_model_matches_reference():
    model = tiny_model("llama", head_dim=16)
    ids, mask = model_ids(256, seed=2, pad=11)
    compare_with_reference(model, ids, mask, dict(window=24, dilation=[[1, 4, 4, 1], [1, 1, 4, 4]],
                                                  sinks=3, backend="flex"))


def test_per_head_dilation_is_applied_per_head():
    """Each head's own dilation matters: permuting the per-head values changes the logits."""
    model = tiny_model("llama")
    ids, mask = model_ids(40, seed=3)
    logits = []
    for dilation in ([[1, 4, 1, 4]] * 2, [[4, 1, 4, 1]] * 2):
        patch_model(model, window=4, dilation=dilation, backend="sdpa")
        try:
            with torch.no_grad():
                logits.append(model(input_ids=ids, attention_mask=mask).logits)
        finally:
            unpatch_model(model)
    assert (logits[0] - logits[1]).abs().max() > 1e-3


@pytest.mark.parametrize("positions", ["original", "shift"])
def test_per_head_cache_decodes_like_the_parallel_forward(positions):
    """One rolling buffer per layer sized for the widest head; decode == parallel forward
    (original positions), chunks == token-by-token (both modes)."""
    from tests.test_cache import chunked, ids_for, stepwise

    model = patch_model(tiny_model("llama"), backend="sdpa", positions=positions, **PER_HEAD)
    ids = ids_for(31, seed=4)
    steps, cache = stepwise(model, ids)
    assert [layer.keys.shape[2] for layer in cache.layers] == [(5 - 1) * 4 + 1, (4 - 1) * 3 + 1]
    if positions == "original":
        with torch.no_grad():
            torch.testing.assert_close(steps, model(ids).logits, atol=2e-5, rtol=0)
    chunks, _ = chunked(model, ids, [6, 1, 9, 2])
    torch.testing.assert_close(chunks, steps, atol=5e-5, rtol=0)


def test_per_head_generate_and_checkpoint_round_trip(tmp_path):
    model = patch_model(tiny_model("llama"), backend="sdpa", **PER_HEAD)
    ids, _ = model_ids(20, b=1, pad=0)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, cache=make_cache(model))
        expected = model(ids).logits
    assert out.shape[1] == 32
    swa_patch.save_pretrained(model, tmp_path)
    loaded = swa_patch.from_pretrained(tmp_path)
    assert layer_specs(loaded) == layer_specs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


# ---- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("options,match", [
    (dict(window=4, dilation=[[1, 2, 4], [1, 1, 1, 1]]), r"dilation\[0\] has 3 per-head entries .* 4 attention heads"),
    (dict(window=4, dilation=[[1, 2, 0, 1], 1]), r"dilation\[0\] entry must be >= 1"),
    (dict(window=4, dilation=[1, [1, 2, 2.5, 1]]), r"dilation\[1\] entry must be an int"),
    (dict(window=4, dilation=[[1, 1, 2, 2]] * 2, backend="flash"), r"flash.*dilation"),
    (dict(window=4, dilation=[1, 1, 2, 2]), r"dilation has 4 entries .* 2 layers"),
])
def test_per_head_validation_names_the_argument(options, match):
    model = tiny_model("llama")
    with pytest.raises((ValueError, TypeError), match=match):
        patch_model(model, **options)
    assert getattr(model, "_swa_patch_state", None) is None
    with pytest.raises(ValueError, match="num_attention_heads"):
        SWAConfig(window=4, dilation=[[1, 2]]).layer_specs(1)


# ---- receptive field -----------------------------------------------------------------------

per_head_spec = st.builds(LayerSpec, st.integers(1, 6), st.lists(st.integers(1, 4), min_size=2, max_size=3).map(tuple),
                          st.integers(0, 3))


@settings(max_examples=150, deadline=None)
@given(specs=st.lists(st.one_of(per_head_spec, st.just(LayerSpec(None))), min_size=1, max_size=4),
       n=st.integers(1, 50))
def test_per_head_reach_equals_brute_force(specs, n):
    """A layer reads the union of its heads' offsets: brute force ORs the per-head masks."""
    positions = brute_force(specs, n)
    last = reach_of_specs(specs, n)[-1]
    assert (last.reach, last.reachable) == (n - positions[0], len(positions))


def fft_reach(offsets: list[int], n_layers: int) -> torch.Tensor:
    """Reachable distances of a stack, by repeated FFT convolution of 0/1 vectors (an
    independent check of the bitset arithmetic at sizes brute force cannot reach)."""
    layer = torch.zeros(max(offsets) + 1, dtype=torch.float64)
    layer[offsets] = 1
    reach = torch.ones(1, dtype=torch.float64)
    for _ in range(n_layers):
        size = reach.numel() + layer.numel() - 1
        reach = (torch.fft.irfft(torch.fft.rfft(reach, size) * torch.fft.rfft(layer, size), size) > 0.5).double()
    return reach


def test_per_head_reach_figures_and_cli(capsys):
    """Heads at 1/2/4/8 in every layer reach as far as the widest head (8x the undilated
    reach) at the attention work of an undilated layer; the d=1 heads fill the gaps except
    near the far edge."""
    config = tiny_model("llama", num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2).config
    heads = [1, 1, 2, 2, 4, 4, 8, 8]
    rows = reach_of_specs(swa_patch.receptive.specs_for(config, window=512, dilation=[heads] * 24))
    independent = fft_reach(sorted({k * d for d in heads for k in range(512)}), 24)
    assert rows[-1].reach == 24 * 511 * 8 + 1 == independent.numel() == 98113
    assert rows[-1].reachable == int(independent.sum()) == 95304
    assert receptive_field(config, window=512, dilation=[heads] * 24) == 98113
    from swa_patch.cli import main
    with pytest.raises(SystemExit, match=r"dilation\[0\] has 8 per-head entries .* 32 attention heads"):
        main(["receptive-field", "--model", "llama", "--layers", "24", "--window", "512",
              "--dilation", ",".join(map(str, heads))])     # llama's default config: 32 heads
    per_32_heads = ",".join(str(2 ** (h // 8)) for h in range(32))
    assert main(["receptive-field", "--model", "llama", "--layers", "24", "--window", "512",
                 "--dilation", per_32_heads]) == 0
    out = capsys.readouterr().out
    assert "1/2/4/8" in out and "receptive field: 98113 tokens (95304 reachable, 2809 holes)" in out


def test_gradient_support_with_per_head_dilation():
    model = tiny_model("llama", num_hidden_layers=3, **GRAD_MODEL, hidden_size=32, intermediate_size=32)
    patch_model(model, backend="sdpa", window=3, dilation=[[2, 2, 4, 4], [3, 3, 3, 3], [2, 5, 2, 5]], sinks=1)
    try:
        expected = reachable_positions(model, 60)
        assert gradient_support(model, 60) == expected
        assert 59 - 1 not in expected and 59 - 5 in expected   # distance 1: a hole; 5: the d=5 heads
    finally:
        unpatch_model(model)
