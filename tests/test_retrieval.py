"""The retrieval probes: sequences, scoring with logits_to_keep, recall arithmetic, configurations,
the `swa-patch eval retrieval` command; the real-model regimes in a slow test."""
from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from models import tiny_model
from swa_patch import patch_model, unpatch_model
from swa_patch.retrieval import (CopyTrial, bootstrap_interval, config_options, copy_layout, copy_probe,
                                 copy_sequences, default_distances, effective_reach, parse_configs,
                                 passkey_prompt, recall_table, score_repeat, theoretical_reach)


def test_config_names():
    assert config_options("dense", 64, 4, 8) is None
    assert config_options("window", 64, 4, 8) == {"window": [64] * 8, "sinks": 0}      # every layer
    assert config_options("native", 64, 4, 8) == {"window": 64, "sinks": 0}           # the model's globals stay
    assert config_options("sinks+full-layers:4+decode-full", 64, 4, 8) == {
        "window": [64] * 8, "sinks": 4, "full_layers": [3, 7], "decode": "full"}
    assert config_options("sinks:64", 64, 4, 8) == {"window": [64] * 8, "sinks": 64}
    assert config_options("sinks:16+decode-full", 64, 4, 8) == {"window": [64] * 8, "sinks": 16, "decode": "full"}
    assert config_options("native+sinks:128+full-layers:4", 64, 4, 8) == {
        "window": 64, "sinks": 128, "full_layers": [3, 7]}
    assert config_options("sinks+decode-global", 64, 4, 8, {5, 1}) == {"window": [64] * 8, "sinks": 4, "decode": [1, 5]}
    with pytest.raises(ValueError, match="declares global"):
        config_options("sinks+decode-global", 64, 4, 8)                # no global layers: refused, not all-window
    for bad in ("sink", "sinks:0", "full-layers:0", "full-layers:x", "dense+sinks"):
        with pytest.raises(ValueError, match="unknown part"):
            config_options(bad, 64, 4, 8)
    with pytest.raises(ValueError, match="sinks >= 1"):
        config_options("sinks", 64, 0, 8)
    with pytest.raises(ValueError, match="distinct"):
        parse_configs("dense,dense")
    assert default_distances(256) == [64, 128, 256, 512, 1024, 2048, 4096]


def test_copy_sequences_differ_only_in_the_first_copy():
    ids = torch.arange(5000)
    layouts = copy_layout(5000, [100, 300], span=16, lead=8, trials=20, seed=1)
    assert layouts == copy_layout(5000, [100, 300], span=16, lead=8, trials=20, seed=1)   # seeded
    for starts in layouts:
        regions = sorted(zip(starts, (8, 16, 300, 16)))
        assert all(a + n <= b for (a, n), (b, _) in zip(regions, regions[1:]))         # disjoint
        probe, control, at = copy_sequences(ids, starts, 100, 16, 8)
        assert probe.numel() == control.numel() == 8 + 16 + 100 + 16 and at == 124
        assert torch.equal(probe[at:], probe[8:24])                                       # the repeat
        differ = (probe != control).nonzero().flatten()
        assert differ.min() >= 8 and differ.max() < 24                                    # first copy only
    with pytest.raises(ValueError, match="longer text"):
        copy_layout(500, [400], span=16, lead=8, trials=2, seed=0)


def test_score_repeat_keeps_only_the_scored_logits_and_equals_a_full_forward():
    model = tiny_model("llama")
    seq = torch.randint(3, 97, (60,), generator=torch.Generator().manual_seed(0))
    nll, acc = score_repeat(model, seq, 45)
    with torch.no_grad():
        logits = model(seq[None]).logits[0, 44:59]
    assert nll == pytest.approx(F.cross_entropy(logits, seq[45:]).item(), abs=1e-5)
    assert acc == pytest.approx((logits.argmax(-1) == seq[45:]).float().mean().item())
    kept = {}
    model.lm_head.register_forward_hook(lambda m, a, out: kept.update(rows=out.shape[1]))
    score_repeat(model, seq, 45)
    assert kept["rows"] == 16                                     # 15 scored + the last position


def test_decode_full_models_get_the_repeat_as_the_answer():
    model = patch_model(tiny_model("llama"), window=6, sinks=2, decode="full", backend="sdpa")
    seq = torch.randint(3, 97, (60,), generator=torch.Generator().manual_seed(1))
    nll, _ = score_repeat(model, seq, 40)
    with torch.no_grad():
        logits = model(seq[None], prompt_lengths=40).logits[0, 39:59]
        windowed = model(seq[None], prompt_lengths=60).logits[0, 39:59]
    assert nll == pytest.approx(F.cross_entropy(logits, seq[40:]).item(), abs=1e-5)
    assert abs(nll - F.cross_entropy(windowed, seq[40:]).item()) > 1e-4
    assert theoretical_reach(model) is None
    unpatch_model(model)
    patch_model(model, window=6)
    assert theoretical_reach(model) == 2 * 5 + 1


def test_recall_is_the_share_of_the_dense_drop():
    rows = [CopyTrial("dense", 10, t, 1.0 + t, 4.0 + t, 0.9, 0.1) for t in range(2)]
    rows += [CopyTrial("window", 10, t, 3.0, 4.5 + t, 0.2, 0.1) for t in range(2)]
    rows += [CopyTrial("dense", 20, 0, 2.0, 4.0, 0.5, 0.1), CopyTrial("window", 20, 0, 3.9, 4.0, 0.1, 0.1)]
    table = {(r.config, r.distance): r for r in recall_table(rows)}
    assert table[("dense", 10)].drop == pytest.approx(3.0) and table[("dense", 10)].recall == pytest.approx(1.0)
    assert table[("window", 10)].drop == pytest.approx(2.0) and table[("window", 10)].recall == pytest.approx(2 / 3)
    assert table[("window", 20)].recall == pytest.approx(0.05)
    assert effective_reach(list(table.values()), "window") == 10
    assert effective_reach(list(table.values()), "dense") == 20


def test_bootstrap_interval():
    assert bootstrap_interval([1, 1, 1, 1]) == (1.0, 1.0)                  # a constant: zero width
    assert bootstrap_interval([0.7]) == (0.7, 0.7)
    sample = [0, 1, 1, 0, 1, 1, 1, 0, 1, 1]
    lo, hi = bootstrap_interval(sample)
    assert lo < 0.7 < hi and 0 <= lo and hi <= 1
    assert bootstrap_interval(sample) == (lo, hi)                          # seeded
    lo_more, hi_more = bootstrap_interval(sample * 10)                     # same mean, 10x the data
    assert lo < lo_more < 0.7 < hi_more < hi
    pairs = [(1.0, 2.0), (2.0, 2.0), (3.0, 4.0)]                           # a ratio of sums over pairs
    lo, hi = bootstrap_interval(pairs, lambda ps: sum(a for a, _ in ps) / sum(b for _, b in ps))
    assert lo <= 6 / 8 <= hi
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_recall_interval_pairs_the_trials():
    """The patched trial t is paired with the dense trial t: a configuration that keeps exactly
    half of every trial's drop has recall 0.5 with a zero-width interval, however unequal the
    trials; one that keeps half on average but not trial by trial gets a wider one."""
    drops = [0.5, 1.0, 3.0, 4.0]
    rows = [CopyTrial("dense", 10, t, 5.0 - d, 5.0, 1.0, 0.0) for t, d in enumerate(drops)]
    rows += [CopyTrial("half", 10, t, 5.0 - d / 2, 5.0, 1.0, 0.0) for t, d in enumerate(drops)]
    rows += [CopyTrial("mixed", 10, t, 5.0 - d, 5.0, 1.0, 0.0) for t, d in enumerate([2.0, 2.25, 0.0, 0.0])]
    table = {r.config: r for r in recall_table(rows)}
    assert (table["dense"].recall_lo, table["dense"].recall_hi) == (1.0, 1.0)
    assert table["half"].recall == pytest.approx(0.5)
    assert table["half"].recall_lo == pytest.approx(0.5) and table["half"].recall_hi == pytest.approx(0.5)
    mixed = table["mixed"]
    assert mixed.recall == pytest.approx(0.5) and mixed.recall_lo < 0.5 < mixed.recall_hi


def test_reach_ends_at_the_first_failure():
    """Recall 0.9, 0.3, 0.8 at 10, 20, 40: the reach is 10, not the farthest pass."""
    rows = [CopyTrial("dense", d, 0, 0.0, 1.0, 1.0, 0.0) for d in (10, 20, 40)]
    rows += [CopyTrial("window", d, 0, 1.0 - r, 1.0, 1.0, 0.0) for d, r in ((10, 0.9), (20, 0.3), (40, 0.8))]
    table = recall_table(rows)
    assert [round(r.recall, 6) for r in table if r.config == "window"] == [0.9, 0.3, 0.8]
    assert effective_reach(table, "window") == 10
    assert effective_reach(table, "window", threshold=0.95) is None


def test_copy_probe_sees_nothing_beyond_the_receptive_field():
    """2 layers of W=8 reach 15 tokens back: at distance 64 the first copy cannot reach the
    repeat, so probe and control score bit-identically; the dense model tells them apart."""
    model = patch_model(tiny_model("llama"), window=8, backend="sdpa")
    assert theoretical_reach(model) == 15
    ids = torch.randint(3, 97, (3000,), generator=torch.Generator().manual_seed(2))
    rows = copy_probe(model, ids, [16, 64], span=8, lead=4, trials=3, progress=False, config="w")
    assert [(r.distance, r.trial) for r in rows] == [(16, 0), (16, 1), (16, 2), (64, 0), (64, 1), (64, 2)]
    assert all(r.nll_probe == r.nll_control and r.acc_probe == r.acc_control for r in rows if r.distance == 64)
    dense = copy_probe(unpatch_model(model), ids, [64], span=8, lead=4, trials=3, progress=False, config="d")
    assert all(r.nll_probe != r.nll_control for r in dense)


class _CharTokenizer:
    """Characters as token ids (enough for the passkey prompt's layout)."""
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [3 + ord(c) % 90 for c in text]})()


def test_passkey_prompt_layout():
    from swa_patch.retrieval import PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION

    tok = _CharTokenizer()
    size = lambda text: len(tok(text).input_ids)
    hay = torch.arange(1000)
    prompt = passkey_prompt(tok, hay, 600, 0.25, "12345").tolist()
    needle = tok(PASSKEY_NEEDLE.format(key="12345")).input_ids
    room = 600 - size(PASSKEY_INTRO) - len(needle) - size(PASSKEY_QUESTION)
    at = size(PASSKEY_INTRO) + round(0.25 * room)
    assert len(prompt) == 600 and prompt[at:at + len(needle)] == needle
    assert prompt[size(PASSKEY_INTRO):at] == list(range(at - size(PASSKEY_INTRO)))     # haystack before
    with pytest.raises(ValueError, match="haystack"):
        passkey_prompt(tok, hay, 100, 0.5, "12345")


def test_eval_retrieval_command(tmp_path):
    from test_recipe import _tiny_checkpoint

    from swa_patch.cli import main

    _tiny_checkpoint(tmp_path / "m")
    text = tmp_path / "t.txt"
    from pydoc_data.topics import topics
    text.write_text("\n\n".join(topics[k] for k in sorted(topics))[:60_000])
    plot = tmp_path / "r.png"
    assert main(["eval", "retrieval", "--model", str(tmp_path / "m"), "--text", str(text), "--window", "16",
                 "--compare", "dense,window,sinks+decode-full", "--distances", "8,64", "--span", "8",
                 "--trials", "2", "--passkey-lengths", "300", "--depths", "0.5", "--plot", str(plot),
                 "--no-progress"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    copy = [r for r in rows if r["probe"] == "copy"]
    assert {(r["config"], r["distance"]) for r in copy} == {(c, d) for c in ("dense", "window", "sinks+decode-full")
                                                            for d in ("8", "64")}
    assert all(float(r["recall"]) == 1.0 for r in copy if r["config"] == "dense")
    assert {r["receptive_field"] for r in copy if r["config"] == "window"} == {str(2 * 15 + 1)}
    assert len([r for r in rows if r["probe"] == "passkey"]) == 3
    assert plot.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="--compare: copy recall is a share of dense's NLL drop.*'window,sinks'"):
        main(["eval", "retrieval", "--model", str(tmp_path / "missing"), "--compare", "window,sinks"])


@pytest.mark.slow
def test_smollm2_copy_probe_separates_the_regimes():
    """On the real model: dense copies a span 2W back, a plain window keeps none of that,
    decode="full" keeps most of it."""
    from swa_patch.models import default_text, load_model
    from swa_patch.retrieval import compare

    model, tokenizer = load_model()
    ids = tokenizer(default_text()[:200_000], return_tensors="pt").input_ids[0]
    copies, _, _ = compare(model, tokenizer, ids, ["dense", "window", "sinks+decode-full"], window=128, sinks=4,
                           distances=[256], trials=3, passkey_lengths=(), progress=False)
    table = {r.config: r for r in recall_table(copies)}
    assert table["dense"].drop > 1.5
    assert abs(table["window"].recall) < 0.1
    assert table["sinks+decode-full"].recall > 0.8
