"""Calibration: retrieval scores per head against transformers' own attention weights (eager,
``output_attentions``), the plan's choice, its round trips (JSON, patch_model, checkpoints) and
the refusals."""
from __future__ import annotations

import json

import pytest
import torch

import swa_patch
from swa_patch import Plan, calibrate, patch_model
import swa_patch.calibration as calibration
from swa_patch.calibration import retrieval_scores
from swa_patch.patch import layer_specs
from tests.models import tiny_model


def eager_scores(model, ids, window, span, trials, seed):
    """The same segments as ``retrieval_scores`` draws, scored from eager attention weights."""
    segment = window + span
    generator = torch.Generator().manual_seed(seed)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    total = 0
    try:
        for _ in range(trials):
            start = int(torch.randint(0, ids.numel() - segment + 1, (1,), generator=generator))
            piece = ids[start:start + segment]
            with torch.no_grad():
                att = model(torch.cat([piece, piece])[None], output_attentions=True).attentions
            t = torch.arange(segment - 1)
            total = total + torch.stack([a[0][:, segment + t, t + 1].mean(-1) for a in att])   # [L, H]
    finally:
        model.set_attn_implementation(previous)
    return total / trials


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_scores_equal_eager_attention_weights(family):
    model = tiny_model(family)
    ids = torch.randint(3, 90, (300,), generator=torch.Generator().manual_seed(1))
    got = retrieval_scores(model, ids, window=20, span=8, trials=3, seed=5)
    want = eager_scores(model, ids, 20, 8, 3, 5)
    assert got.shape == (2, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"          # left as it was


def test_plan_keeps_the_highest_scoring_kv_heads(monkeypatch, tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)              # 4 query heads over 2 KV heads
    fixed = torch.tensor([[0.1, 0.0, 0.0, 0.9],                   # KV head 1 of layer 0: max 0.9
                          [0.2, 0.3, 0.0, 0.0],
                          [0.0, 0.5, 0.4, 0.0]])
    monkeypatch.setattr(calibration, "retrieval_scores", lambda *a, **k: fixed)
    ids = torch.arange(100)
    plan = calibrate(model, ids, window=8, sinks=2, budget=2, source="test")
    assert plan.full_heads == [(0, 1), (2, 0)]
    assert plan.scores == [[0.1, 0.9], [0.3, 0.0], [0.5, 0.4]]
    assert plan.windows() == [[8, None], [8, 8], [None, 8]]
    assert calibrate(model, ids, window=8, budget=0.5).full_heads == [(0, 1), (2, 0), (2, 1)]   # 3 of 6
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    assert json.loads((tmp_path / "plan.json").read_text())["calibration"]["source"] == "test"
    assert plan.patch_options(decode=True) == {"window": 8, "sinks": 2, "decode": [[1], [], [0]]}
    patch_model(model, **plan.patch_options())
    assert [s.kv_windows for s in layer_specs(model)] == [(8, None), None, (None, 8)]
    swa_patch.save_pretrained(model, tmp_path / "ckpt")
    assert layer_specs(swa_patch.from_pretrained(tmp_path / "ckpt")) == layer_specs(model)


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=0.0), r"budget as a share must be in \(0, 1\]"),
    (dict(budget=5), r"budget as a count must be in 1..4"),
    (dict(budget="10%"), r"budget must be a share"),
    (dict(window=0), r"window must be >= 1"),
    (dict(window=200), r"ids has 100 tokens; calibration needs at least window \+ span = 264"),
])
def test_bad_arguments_are_named(kwargs, match):
    model = tiny_model("llama")
    with pytest.raises((ValueError, TypeError), match=match):
        calibrate(model, torch.arange(100), **{"window": 8, **kwargs})


def test_a_patched_model_is_refused():
    model = patch_model(tiny_model("llama"), window=8)
    with pytest.raises(ValueError, match="before patch_model"):
        calibrate(model, torch.arange(100), window=8)


def test_cli_writes_a_plan(tmp_path, monkeypatch, capsys):
    from swa_patch import models
    from swa_patch.cli import main

    class Tok:
        def __call__(self, text, return_tensors):
            return type("Enc", (), {"input_ids": torch.arange(3, 200)[None] % 90 + 3})()
    monkeypatch.setattr(models, "load_model", lambda name: (tiny_model("llama"), Tok()))
    monkeypatch.setattr(models, "load_text", lambda text=None: "text")
    assert main(["calibrate", "--window", "16", "--budget", "1", "--trials", "2", "--out", str(tmp_path / "p.json")]) == 0
    plan = Plan.load(tmp_path / "p.json")
    assert len(plan.full_heads) == 1 and plan.calibration["source"] == "embedded text"
    assert "1 of 4 KV heads full" in capsys.readouterr().out
    assert main(["calibrate", "--window", "16", "--budget", "0.3", "--length", "400", "--method", "nll", "--target",
                 "text", "--skip", "20", "--trials", "1", "--out", str(tmp_path / "q.json")]) == 0
    plan = Plan.load(tmp_path / "q.json")
    assert plan.method == "nll/text" and plan.calibration["tokens"] == 177 and plan.calibration["length"] == 400
    assert plan.kv_share(400) <= 0.3 and plan.calibration["source"] == "embedded text, from token 20"
    with pytest.raises(ValueError, match="--skip must be >= 0"):
        main(["calibrate", "--window", "16", "--skip", "-1", "--out", str(tmp_path / "r.json")])


def streamed_nll(model, windows, sinks, tokens) -> float:
    """NLL of the second half of ``tokens``, fed token by token through the patched model's cache."""
    from swa_patch import make_cache, unpatch_model
    patch_model(model, window=windows, sinks=sinks)
    try:
        cache, half = make_cache(model), tokens.numel() // 2
        with torch.no_grad():
            logits = torch.cat([model(tokens[None, i:i + 1], cache=cache, use_cache=True).logits[0]
                                for i in range(tokens.numel() - 1)])
        return torch.nn.functional.cross_entropy(logits[half - 1:], tokens[half:]).item()
    finally:
        unpatch_model(model)


@pytest.mark.parametrize("target", ["copy", "text"])
def test_nll_scores_equal_token_by_token_streaming(target):
    """Each unit's NLL gain, against the model streamed token by token through its rolling cache with
    that unit alone full (what the plan will run, StreamingLLM positions included)."""
    from swa_patch.calibration import copy_segments, nll_scores

    model = tiny_model("llama")
    ids = torch.randint(3, 90, (200,), generator=torch.Generator().manual_seed(2))
    window, sinks, span = 12, 1, 6
    got = nll_scores(model, ids, window, sinks, span, trials=2, seed=3, target=target)
    segments = copy_segments(ids, window + span, 2, 3, repeat=target == "copy")
    assert all(s.numel() == 2 * (window + span) for s in segments)
    assert (target == "copy") == all(torch.equal(s[:window + span], s[window + span:]) for s in segments)

    def nll(windows):
        return sum(streamed_nll(model, windows, sinks, s) for s in segments) / len(segments)
    base = nll([[window] * 2] * 2)
    for layer in range(2):
        for head in range(2):
            windows = [[window] * 2, [window] * 2]
            windows[layer] = [None if h == head else window for h in range(2)]
            assert got[layer, head].item() == pytest.approx(base - nll(windows), abs=1e-5)
    assert got.abs().max() > 1e-3                       # the units differ: a check that can fail
    layers = nll_scores(model, ids, window, sinks, span, trials=2, seed=3, unit="layer", target=target)
    assert layers[0].tolist() == pytest.approx([base - nll([[None, None], [window] * 2])] * 2, abs=1e-5)


def test_trained_windowed_layers_are_never_opened():
    """Gemma 3's local layers (trained with a window) score NaN and stay windowed; only global layers open."""
    kinds = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    model = tiny_model("gemma3_text", num_hidden_layers=4, layer_types=kinds, num_key_value_heads=1)
    ids = torch.randint(3, 90, (200,), generator=torch.Generator().manual_seed(2))
    for method in ("retrieval", "nll"):
        plan = calibrate(model, ids, window=12, sinks=1, budget=1, method=method, span=6, trials=1)
        assert len(plan.full_heads) == 1 and plan.full_heads[0][0] in (1, 3)
        assert [row[0] is None for row in plan.scores] == [True, False, True, False]
    with pytest.raises(ValueError, match=r"budget asks for 4 full heads, but only 2 may be opened: layers \[0, 2\]"):
        calibrate(model, ids, window=12, sinks=1, budget=1.0, method="nll", span=6, trials=1)


def test_kv_budget_at_a_length_fills_full_heads_then_widens_one(monkeypatch, tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)              # 6 KV heads
    fixed = torch.tensor([[0.1, 0.9], [0.3, 0.0], [0.5, 0.4]])
    monkeypatch.setattr(calibration, "nll_scores", lambda *a, **k: fixed)
    ids = torch.arange(100)
    # 6 heads x 1000 tokens; each keeps 8 + 2 = 10 (60); budget 0.4 -> 2400: two full (+1980) leave 360
    plan = calibrate(model, ids, window=8, sinks=2, budget=0.4, method="nll", length=1000)
    assert plan.full_heads == [(0, 1), (2, 0)] and plan.wide_heads == [(2, 1, 8 + 360)]
    assert plan.windows() == [[8, None], [8, 8], [None, 368]]
    assert plan.kv_share(1000) == pytest.approx(0.4)
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    with pytest.raises(ValueError, match=r"decode=True\) needs a plan of full heads only"):
        plan.patch_options(decode=True)
    for bad in (2, 1.5, 0.0):
        with pytest.raises(ValueError, match=r"length= makes budget a share .* give a float in \(0, 1\]"):
            calibrate(model, ids, window=8, budget=bad, method="nll", length=1000)
    with pytest.raises(ValueError, match="length must be >= 11"):
        calibrate(model, ids, window=8, sinks=2, budget=0.4, method="nll", length=10)
    with pytest.raises(ValueError, match="target must be 'copy', or 'text' with method='nll'"):
        calibrate(model, ids, window=8, target="text")


def test_kv_share_is_what_the_cache_holds_and_a_widened_layer_shares_its_ring(monkeypatch):
    """The plan's KV share against the bytes a patched prefill's cache really holds: a widened head
    widens every windowed head of its layer (one ring), and is charged for all of them."""
    from transformers import DynamicCache
    from swa_patch import make_cache
    from swa_patch.streaming import cache_bytes
    model = tiny_model("llama", num_hidden_layers=3)              # 2 KV heads per layer
    fixed = torch.tensor([[0.1, 0.9], [0.3, 0.0], [0.5, 0.4]])
    monkeypatch.setattr(calibration, "nll_scores", lambda *a, **k: fixed)
    length, ids = 400, torch.arange(100)
    # 6 x 400 tokens; each keeps 8 + 2 = 10 (60); budget 0.3 -> 720: one full (+390) leaves 270 for
    # layer 2's two windowed heads, 135 each (not 270 to head (2, 0) alone: head 1 would hold as many)
    plan = calibrate(model, ids, window=8, sinks=2, budget=0.3, method="nll", length=length)
    assert plan.full_heads == [(0, 1)] and plan.wide_heads == [(2, 0, 8 + 135), (2, 1, 8 + 135)]
    hand_made = Plan(8, 2, [(0, 1)], fixed.tolist(), 0.3, wide_heads=[(2, 0, 8 + 262)])   # head 1 rolls in its ring
    ids = torch.arange(length)[None] % 90 + 3
    model(ids, cache=(dense := DynamicCache(config=model.config)))
    for p in (plan, hand_made):
        patched = patch_model(tiny_model("llama", num_hidden_layers=3), **p.patch_options())
        patched(ids, cache=(cache := make_cache(patched)))
        # the cache adds rotated sink copies and slot bookkeeping (~4 tokens a head here); a share
        # that missed the ring would be 0.11 off
        assert p.kv_share(length) == pytest.approx(cache_bytes(cache) / cache_bytes(dense), abs=0.02)
    assert plan.kv_share(length) == pytest.approx(0.3) and hand_made.kv_share(length) == pytest.approx(974 / 2400)


def test_layer_unit_keeps_whole_layers(monkeypatch):
    model = tiny_model("llama", num_hidden_layers=3)
    fixed = torch.tensor([[0.1, 0.1], [0.5, 0.5], [0.3, 0.3]])
    monkeypatch.setattr(calibration, "nll_scores", lambda *a, **k: fixed)
    plan = calibrate(model, torch.arange(100), window=8, budget=4, method="nll", unit="layer")
    assert plan.windows() == [[8, 8], [None, None], [None, None]] and plan.method == "nll/layer"
    with pytest.raises(ValueError, match="less than one layer"):
        calibrate(model, torch.arange(100), window=8, budget=1, method="nll", unit="layer")
    with pytest.raises(ValueError, match="unit must be 'head', or 'layer' with method='nll'"):
        calibrate(model, torch.arange(100), window=8, unit="layer")
    with pytest.raises(ValueError, match="method must be one of"):
        calibrate(model, torch.arange(100), window=8, method="gates")
