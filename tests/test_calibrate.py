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


def test_nll_scores_equal_the_reference_masks():
    """Each unit's NLL gain, against the unpatched model run under explicit per-head reference masks."""
    from swa_patch.calibration import copy_segments, nll_scores
    from swa_patch.masks import LayerSpec
    from tests.models import reference_logits

    model = tiny_model("llama")
    ids = torch.randint(3, 90, (200,), generator=torch.Generator().manual_seed(2))
    window, sinks, span = 12, 1, 6
    got = nll_scores(model, ids, window, sinks, span, trials=2, seed=3)
    segments = copy_segments(ids, window + span, 2, 3)

    def nll(specs):
        total = 0.0
        for copies in segments:
            logits = reference_logits(model, specs, copies[None])[0, window + span - 1:-1]
            total += torch.nn.functional.cross_entropy(logits, copies[window + span:]).item()
        return total / len(segments)
    base = nll([LayerSpec(window, 1, sinks)] * 2)
    for layer in range(2):
        for head in range(2):
            specs = [LayerSpec(window, 1, sinks)] * 2
            specs[layer] = LayerSpec(tuple(None if h == head else window for h in range(2)), 1, sinks)
            assert got[layer, head].item() == pytest.approx(base - nll(specs), abs=1e-4)
    assert got.abs().max() > 1e-3                       # the units differ: a check that can fail
    layers = nll_scores(model, ids, window, sinks, span, trials=2, seed=3, unit="layer")
    whole = base - nll([LayerSpec(None), LayerSpec(window, 1, sinks)])
    assert layers[0].tolist() == pytest.approx([whole] * 2, abs=1e-4)


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
