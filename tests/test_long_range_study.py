"""benchmarks/long_range_study.py's grid: defaults per model, the keep-first-k sweep, what the
LoRA recipe can train, and the runtime estimate (the study itself runs for hours: not here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("long_range_study", ROOT / "benchmarks" / "long_range_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_meet_the_issue(study):
    args = study.parse_args([])
    assert args.trials >= 10 and len(args.depths.split(",")) >= 10 and args.passkey_tries == 1
    assert args.window == 256 and args.out.endswith("results/long_range_study") and args.prefill_rounds >= 5
    gemma = study.parse_args(["--model", "gemma3-270m"])
    assert gemma.window == 512 and gemma.out.endswith("results/long_range_study_gemma3")
    assert "native" in gemma.rows.split(",") and "@" not in gemma.rows          # no LoRA rows by default
    quick = study.parse_args(["--quick", "--model", "gemma3-270m"])
    assert "results" not in quick.out and quick.trials >= 2 and quick.prefill_rounds >= 2
    assert args.sink_sweep == "4,16,64,128" and quick.sink_sweep == "4,16"
    assert study.parse_args(["--quick", "--sink-sweep", ""]).sink_sweep == ""


def test_sink_sweep_adds_rows_once(study):
    args = study.parse_args(["--rows", "dense,sinks+decode-full,sinks@ce", "--sink-sweep", "4,64"])
    assert [label for label, _, _ in study.expand_rows(args)] == [
        "dense", "sinks+decode-full", "sinks@ce", "sinks:4+full-layers:4", "sinks:64+decode-full",
        "sinks:64+full-layers:4"]                                   # sinks:4+decode-full is the second row
    assert study.expand_rows(study.parse_args(["--rows", "dense,sinks", "--sink-sweep", ""]))[1] == ("sinks", "sinks", "")
    with pytest.raises(SystemExit, match="adapter"):
        study.expand_rows(study.parse_args(["--rows", "sinks@lora"]))


def test_gemma_decode_rows_open_its_global_layers_only(study):
    """Gemma's local layers were trained with their window: its decode rows and sweep open the
    3 global layers (decode=[5, 11, 17]), never every layer."""
    args = study.parse_args(["--model", "gemma3-270m"])
    labels = [label for label, _, _ in study.expand_rows(args)]
    assert "sinks+decode-global" in labels and "sinks:128+decode-global" in labels
    assert not any("decode-full" in label for label in labels)
    assert study.options_of(args, "sinks:16+decode-global")["decode"] == [5, 11, 17]
    assert "decode-global" not in study.parse_args([]).rows                 # SmolLM2 has no global layers


def test_gemma_adapters_train_on_its_own_pattern(study):
    """The recipe's --window keeps Gemma's global layers full: a training configuration that
    says otherwise is refused, not silently trained on something else."""
    assert study.train_options(study.parse_args(["--model", "gemma3-270m"]))["window"] == 512
    with pytest.raises(SystemExit, match="native"):
        study.train_options(study.parse_args(["--model", "gemma3-270m", "--train-config", "sinks"]))
    with pytest.raises(SystemExit, match="window, native and sinks"):
        study.train_options(study.parse_args(["--train-config", "sinks+decode-full"]))
    assert study.train_options(study.parse_args([]))["sinks"] == 4


def test_estimate(study):
    def minutes(*argv):
        args = study.parse_args(list(argv))
        w = args.window
        return sum(study.estimate_minutes(args, study.expand_rows(args), [w // 2, w, 2 * w, 4 * w, 8 * w],
                                          [int(x) for x in args.passkey_lengths.split(",")],
                                          args.depths.split(",")).values())
    full, one_thread = minutes(), minutes("--threads", "1")
    assert 120 < full < 600 and one_thread > full
    assert minutes("--part", "timing") < full and minutes("--part", "probes") < full


def test_reach_passing_every_distance_is_a_lower_bound(study):
    from swa_patch.retrieval import RecallRow

    def rows(*recalls):
        return [RecallRow("c", d, 10, 1.0, 2.0, 1.0, r, 1.0, 0.0) for d, r in zip((128, 256, 512), recalls)]
    assert study.reach_column(rows(1.0, 0.9, 0.8), "c", [128, 256, 512]) == ">=512"
    assert study.reach_column(rows(1.0, 0.4, 0.8), "c", [128, 256, 512]) == "128"
    assert study.reach_column(rows(0.4, 0.9, 0.8), "c", [128, 256, 512]) == "0"


def test_the_first_copy_lies_past_every_rows_sinks(study, monkeypatch):
    """With 128 sinks and a 32-token lead the sinks held the first copy (recall 1.05 at 8W with
    full layers): the default lead clears the most sinks of any row, the same for every row."""
    seen = {}

    def stop(args, parsed, *rest):
        seen["lead"] = args.lead
    monkeypatch.setattr(study, "probes_part", stop)
    monkeypatch.setattr("sys.argv", ["x", "--part", "probes"])
    study.main()
    assert seen["lead"] == 32 + 128
    monkeypatch.setattr("sys.argv", ["x", "--part", "probes", "--sink-sweep", "", "--rows", "dense,sinks"])
    study.main()
    assert seen["lead"] == 32 + 4


def test_calibrated_rows_use_plans_from_the_training_split(study, tmp_path, monkeypatch):
    """``heads:SHARE`` rows are calibrated once, on the training split only, and their options are
    the saved plan's per-KV-head windows (with the row's other parts)."""
    import torch

    import swa_patch
    from swa_patch import Plan
    from swa_patch.models import load_model   # noqa: F401  (the name monkeypatched below)

    args = study.parse_args(["--rows", "dense,heads:0.1+sinks,layers-nll:0.25", "--work", str(tmp_path),
                             "--sink-sweep", ""])
    seen, lengths = [], []

    class Tok:
        def __call__(self, text, return_tensors):
            seen.append(text)
            return type("Enc", (), {"input_ids": torch.arange(500)[None]})()

    def fake_calibrate(model, ids, window, sinks, budget, method, unit, trials, source, length):
        lengths.append(length)
        full = [(0, 1)] if unit == "head" else [(0, 0), (0, 1), (0, 2)]
        return Plan(window, sinks, full, [[0.0] * 3 for _ in range(30)], budget, method=method, calibration={"source": source})
    monkeypatch.setattr(swa_patch, "calibrate", fake_calibrate)
    monkeypatch.setattr("swa_patch.models.load_model", lambda name: (None, Tok()))
    labels = [(r, r, "") for r in args.rows.split(",")]
    minutes = study.calibrate_plans(args, labels)
    assert sorted(minutes) == ["heads:0.1", "layers-nll:0.25"]
    train, held = (tmp_path / "train.txt").read_text(), (tmp_path / "heldout.txt").read_text()
    assert seen == [train] and held not in seen              # tokenized once, for both plans
    options = study.options_of(args, "heads:0.1+sinks")
    assert options["window"][0] == [256, None, 256] and options["window"][1] == [256] * 3 and options["sinks"] == 4
    assert study.options_of(args, "layers-nll:0.25")["window"][0] == [None] * 3
    assert [label for label, _, _ in study.expand_rows(args)] == ["dense", "heads:0.1+sinks", "layers-nll:0.25"]
    child = study.parse_args(["--time-config", "heads:0.1+sinks", "--work", str(tmp_path)])   # a timing process
    assert study.options_of(child, "heads:0.1+sinks") == options
    calls = []
    monkeypatch.setattr(study.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or type(
        "Done", (), {"returncode": 0, "stdout": '{"warmup_s": 1, "seconds": [1], "kv_bytes": 1}'})())
    study.prefill(args, "heads:0.1+sinks")
    assert calls[0][calls[0].index("--work") + 1] == str(tmp_path)            # the child finds the plans
    decoding = study.options_of(args, "decode-heads:0.1+sinks")           # the heads:0.1 plan, decoding instead
    assert decoding["window"] == [256] * 30 and decoding["decode"][0] == [1] and decoding["decode"][1] == []
    assert lengths == [None, None]
    # --calibrate-length: SHARE of the KV at that length, in its own plan file, which the timing child finds
    budgeted = study.parse_args(["--rows", "heads:0.1+sinks", "--work", str(tmp_path), "--sink-sweep", "",
                                 "--calibrate-length", "16384"])
    study.calibrate_plans(budgeted, [("heads:0.1+sinks", "heads:0.1+sinks", "")])
    assert lengths[-1] == 16384 and study.plan_path(budgeted, "heads:0.1") != study.plan_path(args, "heads:0.1")
    study.prefill(budgeted, "heads:0.1+sinks")
    assert calls[-1][calls[-1].index("--calibrate-length") + 1] == "16384"
    assert "--calibrate-length" not in calls[0]


def test_train_as_row_trains_each_rows_own_configuration(study, tmp_path, monkeypatch):
    """--train-as-row: one adapter per (kind, row), each trained on the row's sinks, plan and decode;
    @lr adds the long-range data, its @ce control the same steps and length on running text."""
    import swa_patch.models
    from swa_patch import Plan

    rows = ("sinks@ce,sinks@lr,heads:0.25+sinks@lr,sinks+decode-full@lr,sinks+decode-full@ce,"
            "decode-heads:0.25+sinks@lr")
    args = study.parse_args(["--rows", rows, "--train-as-row", "--seq-len", "2176", "--work", str(tmp_path),
                             "--sink-sweep", ""])
    plan = study.plan_path(args, "heads:0.25")
    Plan(256, 4, [(0, 1)], [[0.0] * 3 for _ in range(30)], 0.25).save(plan)
    keys = list(dict.fromkeys(study.adapter_key(args, a, c) for _, c, a in study.expand_rows(args) if a))
    assert len(keys) == 6 and keys[0] == ("ce", "sinks")
    calls = []
    monkeypatch.setattr(study.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setitem(swa_patch.models.ALIASES, "smollm2-135m", lambda: ("/m", "m.gguf"))
    cmds = {}
    for key in keys:
        study.train_adapter(args, key, "train.txt", "held.txt")
        cmds[key] = calls[-1]
    flag = lambda key, name: cmds[key][cmds[key].index(name) + 1] if name in cmds[key] else None
    assert flag(("lr", "sinks"), "--long-range-distances") == "512,1024,2048"
    assert flag(("lr", "sinks"), "--long-range-tasks") == "copy,passkey,multikey,variable"
    assert flag(("ce", "sinks"), "--long-range-tasks") is None and flag(("ce", "sinks"), "--sinks") == "4"
    assert flag(("lr", "heads:0.25+sinks"), "--plan") == plan and flag(("lr", "heads:0.25+sinks"), "--decode") is None
    assert flag(("lr", "sinks+decode-full"), "--decode") == "full"
    assert flag(("ce", "sinks+decode-full"), "--decode") is None            # running text: its prefill
    assert flag(("lr", "decode-heads:0.25+sinks"), "--decode") == "plan"
    assert flag(("lr", "decode-heads:0.25+sinks"), "--plan") == plan
    assert {(flag(k, "--max-steps"), flag(k, "--seq-len")) for k in keys} == {("60", "2176")}
    assert len({flag(k, "--output") for k in keys}) == 6
    with pytest.raises(SystemExit, match="add --train-as-row"):
        study.expand_rows(study.parse_args(["--rows", "sinks@lr"]))
    with pytest.raises(SystemExit, match="cannot express"):
        study.recipe_window_flags(args, "sinks+full-layers:4")
