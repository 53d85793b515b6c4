"""The README's results are generated from the benchmark CSVs, and say where each came from."""
from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def report(monkeypatch):
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def results(report, tmp_path, monkeypatch):
    """A copy of benchmarks/results that a test may edit, read by ``report``."""
    folder = tmp_path / "results"
    shutil.copytree(report.RESULTS, folder, ignore=shutil.ignore_patterns("*.png", "*.log"))
    monkeypatch.setattr(report, "RESULTS", str(folder))
    return folder


def edit_csv(path, column, match, value):
    with open(path) as f:
        data = list(csv.DictReader(f))
    hits = [r for r in data if all(r[k] == v for k, v in match.items())]
    assert len(hits) == 1
    hits[0][column] = value
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)


def test_readme_and_docs_tables_match_the_csvs(report):
    blocks = []
    for page in report.PAGES:
        text = (ROOT / page).read_text()
        blocks += [m.group(2) for m in report.BLOCK.finditer(text)]
        assert report.stale(text) == [], f"{page}: run python benchmarks/report.py --write"
    assert sorted(blocks) == sorted(report.SECTIONS), "every section has one block, on one page"


def test_readme_fits_on_a_screen_with_the_quick_start_first():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 250
    assert any("## Quick start" in line for line in readme[:40])


def test_check_catches_an_edited_figure_and_an_edited_csv(report, results):
    readme = (ROOT / "docs" / "results.md").read_text()
    edited = readme.replace("| swa_patch_compiled | 1280 |", "| swa_patch_compiled | 1281 |", 1)
    assert edited != readme
    assert report.stale(edited) == ["attention_sinks"]
    edit_csv(results / "compiled_decode.csv", "ms_per_token", {"method": "swa_patch", "position": "32768",
                                                                "compiled": "True"}, "999.0")
    assert set(report.stale(readme)) == {"targets", "compiled_decode"}


def test_a_target_fails_when_its_figure_misses(report, results):
    where = {"method": "swa_patch", "position": "1024", "compiled": "True"}
    edit_csv(results / "compiled_decode.csv", "vs_default_eager", where, "1.31")
    met, text = report.t_compiled()
    assert met is True and text.startswith("1.31x")
    edit_csv(results / "compiled_decode.csv", "vs_default_eager", where, "1.29")
    met, text = report.t_compiled()
    assert met is False and text.startswith("1.29x")
    table = report.targets()
    assert "| **no** | 1.29x" in table


def test_every_target_reads_its_csv(report):
    for target, measured, name in report.TARGETS:
        assert name in report.MEASURES, name
        met, text = measured()   # a missing or ambiguous row raises here, not "not measured"
        assert met in (True, False, None) and text, target


def test_provenance_line_names_the_command(report, results):
    line = report.source("varying_prompts.csv")
    assert "`benchmarks/varying_prompts.py" in line and "torch" in line
    (results / "varying_prompts.csv").unlink()
    assert "not measured yet" in report.source("varying_prompts.csv")
    with pytest.raises(LookupError):
        report.pick([{"a": "1"}, {"a": "1"}], a=1)


def test_recorded_command_reruns(monkeypatch):
    from swa_patch import provenance
    root = str(ROOT)
    monkeypatch.setattr(sys, "argv", [os.path.join(root, "swa_patch", "cli.py"), "stream", "--tokens", "8"])
    assert provenance.run_info()["command"] == "swa-patch stream --tokens 8"
    monkeypatch.setattr(sys, "argv", [os.path.join(root, "benchmarks", "dilation.py"), "--n", "2048"])
    assert provenance.run_info()["command"] == "benchmarks/dilation.py --n 2048"


def test_commit_is_dirty_for_code_changes_only(tmp_path):
    import subprocess

    from swa_patch.provenance import git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "x.csv").write_text("a\n1\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    clean = git_commit(str(tmp_path))
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "benchmarks" / "results" / "x.csv").write_text("a\n2\n")   # a run rewrote its results
    assert git_commit(str(tmp_path)) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(str(tmp_path)) == clean + "+dirty"


def test_a_table_older_than_its_code_is_marked_stale(report, results):
    import subprocess

    def set_commit(commit):
        path = results / "varying_prompts.csv"
        with open(path) as f:
            data = list(csv.DictReader(f))
        for r in data:
            r["commit"] = commit
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(data[0]))
            writer.writeheader()
            writer.writerows(data)

    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.split()[0]  # noqa: E731
    set_commit(git("rev-list", "--max-parents=0", "HEAD"))                # before any code existed
    line = report.source("varying_prompts.csv")
    assert "**Stale**" in line and "`swa_patch/attention.py`" in line
    set_commit(git("rev-parse", "--short", "HEAD") + "+dirty")     # current code, but uncommitted changes
    assert "**Unverified**: measured at a dirty tree of commit" in report.source("varying_prompts.csv")
    set_commit("0000000")
    assert "not in this history" in report.source("varying_prompts.csv")
    assert set(report.MEASURES) >= {n for n in os.listdir(results) if n.endswith(".csv")
                                    and not n.endswith("_probes.csv")}, "every CSV names the code it measures"
    missing = {f for files in report.MEASURES.values() for f in files if not os.path.exists(os.path.join(ROOT, f))}
    assert not missing, f"MEASURES names paths that do not exist (git diff would never see them change): {missing}"
    assert all("swa_patch/patch.py" in files for files in report.MEASURES.values()), "patch_model runs in every one"


def test_every_benchmarks_module_a_script_imports_is_measured(report):
    """A script's figures depend on the benchmarks/ helpers it imports (common.py: timing rounds,
    fresh-process memory, provenance): a change there must mark its table stale too."""
    import ast

    helpers = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    for name, files in report.MEASURES.items():
        for script in (f for f in files if f.startswith(("benchmarks/", "examples/")) and f.endswith(".py")):
            tree = ast.parse((ROOT / script).read_text())
            imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            needed = {f"benchmarks/{m.split('.')[-1]}.py" for m in imported if m.split(".")[-1] in helpers}
            assert needed <= set(files), f"{name}: {script} imports {sorted(needed - set(files))}, not in MEASURES"
    assert "benchmarks/common.py" in report.MEASURES["long_range_study.csv"]


def test_a_reviewed_change_is_named_and_any_other_change_still_marks_stale(report):
    for path, commits in report.REVIEWED.items():
        for commit, why in commits.items():
            assert why and path in report._git("show", "--name-only", "--format=", commit), (path, commit)
    before = "c84e3d4~1"       # common.py changed after this commit (c84e3d4 dropped timed())
    since = report._git("log", "--format=%H", f"{before}..HEAD", "--", "benchmarks/common.py")
    assert since
    report.REVIEWED = {"benchmarks/common.py": {c[:9]: "reviewed" for c in since}}
    changed, reviewed, rejected = report.changes_since("varying_prompts.csv", before)
    assert "benchmarks/common.py" not in changed and ("benchmarks/common.py", since[0][:9]) in reviewed
    assert rejected == []
    report.REVIEWED = {"benchmarks/common.py": {c[:9]: "reviewed" for c in since[1:]}}   # one left unreviewed
    changed, reviewed, _ = report.changes_since("varying_prompts.csv", before)
    assert "benchmarks/common.py" in changed and not any(p == "benchmarks/common.py" for p, _ in reviewed)


def test_a_dirty_csv_reads_unverified_never_current(report, results):
    """A CSV measured with uncommitted changes (commit ``X+dirty``) cannot be tied to a commit, even
    when X is HEAD: its table and its targets' "from" column say unverified, not current."""
    head = report._git("rev-parse", "--short", "HEAD")[0]
    for commit, status in ((head, None), (head + "+dirty", "unverified")):
        edit_csv_column(results / "varying_prompts.csv", "commit", commit)
        line, short = report.source("varying_prompts.csv"), report.measured_at("varying_prompts.csv")
        if status is None:
            assert "**" not in line and short == f"`varying_prompts.csv` @{head}"
        else:
            assert f"**Unverified**: measured at a dirty tree of commit {head}" in line and "Stale" not in line
            assert short == f"`varying_prompts.csv` @{head}+dirty, **unverified**"
    assert "**unverified**" in report.targets()


def edit_csv_column(path, column, value):
    """Set ``column`` to ``value`` in every row of the CSV at ``path``."""
    with open(path) as f:
        data = list(csv.DictReader(f))
    for r in data:
        r[column] = value
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)


def test_a_reviewed_commit_counts_only_if_it_changes_no_name_the_measured_script_uses(report, tmp_path, monkeypatch):
    """In a scratch repository: a CSV measured at commit A by ``bench/script.py``, which imports
    ``used`` (it calls ``_inner``) and reaches ``other`` as ``common.other``; REVIEWED commits to
    ``bench/common.py`` after A hold when they only add or drop names nobody used at A, and are
    rejected, naming the names, when they change ``_inner`` or ``other``."""
    import subprocess

    repo = tmp_path / "repo"

    def commit(files, message):
        for path, text in files.items():
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            (repo / path).write_text(text)
        for args in (["add", "."], ["commit", "-qm", message]):
            subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                           capture_output=True)
        return subprocess.run(["git", "rev-parse", "--short=9", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True).stdout.strip()

    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    code = {"_inner": "1", "used": "_inner()", "other": "2", "unused": "3"}
    common = lambda: "".join(f"def {n}():\n    return {v}\n\n\n" for n, v in code.items())  # noqa: E731
    script = "import common\nfrom common import used\n\nprint(used(), common.other())\n"
    measured = commit({"bench/common.py": common(), "bench/script.py": script}, "A")
    del code["unused"]
    code["paired"] = "4"                         # drops a name nobody used, adds one nobody could use at A
    tidy = commit({"bench/common.py": common()}, "adds paired, drops unused")
    code["_inner"] = "5"
    inner = commit({"bench/common.py": common()}, "changes what used() calls")
    code["other"] = "6"
    other = commit({"bench/common.py": common()}, "changes common.other")
    (tmp_path / "results").mkdir()
    with open(tmp_path / "results" / "x.csv", "w", newline="") as f:
        row = {**_provenance("bench/script.py"), "commit": measured, "value": "1"}
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    monkeypatch.setattr(report, "ROOT", str(repo))
    monkeypatch.setattr(report, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(report, "MEASURES", {"x.csv": ("bench/common.py", "bench/script.py")})

    assert report.review_rejects("x.csv", measured, "bench/common.py", tidy) == []
    assert report.review_rejects("x.csv", measured, "bench/common.py", inner) == ["_inner"]
    assert report.review_rejects("x.csv", measured, "bench/common.py", other) == ["other"]
    monkeypatch.setattr(report, "REVIEWED", {"bench/common.py": {c: "reviewed" for c in (tidy, inner, other)}})
    changed, reviewed, rejected = report.changes_since("x.csv", measured)
    assert changed == ["bench/common.py"] and reviewed == []
    assert rejected == [("bench/common.py", other, ["other"]), ("bench/common.py", inner, ["_inner"])]
    line = report.source("x.csv")
    assert "**Stale**" in line and f"REVIEWED `bench/common.py` {inner} rejected: it changes `_inner`" in line
    # what the script imports at the CSV's commit counts, not what it imports now
    later = commit({"bench/script.py": script.replace("import used", "import paired, used")}, "uses paired")
    code["paired"] = "7"
    paired = commit({"bench/common.py": common()}, "changes paired")
    assert report.review_rejects("x.csv", measured, "bench/common.py", paired) == []
    assert report.review_rejects("x.csv", later, "bench/common.py", paired) == ["paired"]
    subprocess.run(["git", "reset", "-q", "--hard", tidy], cwd=repo, check=True)   # only the tidy commit since A
    assert report.changes_since("x.csv", measured) == ([], [("bench/common.py", tidy)], [])
    assert "Stale" not in (line := report.source("x.csv")) and f"`bench/common.py` {tidy} (reviewed)" in line


def test_attention_sinks_is_judged_on_the_median_paired_speedup(report, results):
    """The comparison's CSV as benchmarks/attention_sinks_compare.py writes it now (medians of paired
    rounds, spread, warm-up): the target reads the median, a best round cannot meet it; an older CSV
    (best of rounds, unpaired) is shown but not judged."""
    met, text = report.t_attention_sinks()                  # whichever format the CSV in results has
    assert met in (True, False, None) and text
    path = results / "attention_sinks_compare.csv"
    columns = ["method", "tokens", "rounds", "warmup_tokens", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max",
               "speedup_vs_attention_sinks", "speedup_min", "speedup_max", "warmup_s", "warmup_s_min",
               "warmup_s_max", "warmup_s_first", "load_s", "ppl"]
    values = {"attention_sinks": [10, 9, 11, 1, 1, 1, 0.7, 0.6, 0.8, 0.8],
              "swa_patch": [11, 10, 12, 1.1, 1.0, 1.2, 0.9, 0.8, 1.0, 0.9],
              "swa_patch_compiled": [14.9, 14, 16, 1.498, 1.4, 1.62, 30, 28, 200, 200]}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for method, v in values.items():
            writer.writerow([method, 1280, 5, 8, *v, 0.5, 12.47])
    met, text = report.t_attention_sinks()
    # three digits: 1.498x must not read as the 1.50x it misses
    assert met is False and text.startswith("1.498x (1.400–1.620)") and "(200.0 s with an empty compile cache)" in text
    assert "| swa_patch_compiled | 1280 | 12.4700 | 14.90 (14.00–16.00) | 1.498x (1.400–1.620) |" in report.attention_sinks()
    edit_csv(path, "speedup_vs_attention_sinks", {"method": "swa_patch_compiled"}, "1.5")
    assert report.t_attention_sinks()[0] is True
    with open(path, "w", newline="") as f:                   # the format before rounds were paired
        f.write("method,tokens,sinks,window,ppl,tokens_per_s,speedup_vs_attention_sinks\n"
                "attention_sinks,1280,4,1020,12.47,9.12,1.0\nswa_patch,1280,4,1020,12.47,10.2,1.12\n"
                "swa_patch_compiled,1280,4,1020,12.47,13.8,1.51\n")
    met, text = report.t_attention_sinks()
    assert met is None and text.startswith("not judged") and "1.51x" in text
    assert "An older run" in report.attention_sinks()


def _provenance(command):
    import subprocess
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"command": command, "commit": commit, "date": "2026-12-02 10:00 UTC", "machine": "x86_64 2 cpus",
            "threads": "2", "torch": "2.13.0+cpu", "transformers": "5.24.0", "settings": "{}"}


def _write_csv(path, data):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)


def _long_range_row(row, recall_8w, passkey, **extra):
    """One row of long_range_study*.csv as the study's probes part writes it (with intervals)."""
    config, _, adapter = row.partition("@")
    hits = int(passkey.split("/")[0])
    out = {"row": row, "config": config, "adapter": adapter, "model": "gemma3-270m", "window": "512", "sinks": "4"}
    for d in ("W/2", "2W", "8W"):
        value = recall_8w if d == "8W" else 1.0
        out.update({f"recall_{d}": f"{value:.3f}", f"recall_{d}_lo": f"{value - 0.07:.3f}",
                    f"recall_{d}_hi": f"{value + 0.06:.3f}"})
    out.update({"effective_reach": ">=4096", "receptive_field": "all", "passkey_4096": passkey,
                "passkey_4096_lo": f"{max(0, hits / 10 - 0.3):.2f}", "passkey_4096_hi": f"{min(1, hits / 10 + 0.2):.2f}",
                "passkey_4096_prompt_end": "", "passkey_4096_prompt_end_lo": "", "passkey_4096_prompt_end_hi": "",
                "heldout_ppl": "9.000", "train_minutes": "", "probe_minutes": "1.0",
                **_provenance("benchmarks/long_range_study.py --model gemma3-270m --part probes"), **extra})
    return out


def _prefill_row(config, speedup):
    """One row of long_range_study*_prefill.csv as the study's timing part writes it."""
    return {"config": config, "model": "gemma3-270m", "window": "512", "tokens": "16384", "rounds": "5",
            "prefill_s": f"{40 / speedup:.2f}", "prefill_s_min": "1.00", "prefill_s_max": "99.00",
            "prefill_warmup_s": "3.00", "prefill_speedup_vs_dense": f"{speedup:.2f}", "kv_mib": "10.0",
            **_provenance("benchmarks/long_range_study.py --model gemma3-270m --part timing")}


def test_an_interval_rounding_to_zero_prints_no_minus_sign(report):
    row = {"recall_8W": "-0.001", "recall_8W_lo": "-0.004", "recall_8W_hi": "0.002"}
    assert report._with_interval(row, "recall_8W", 2) == "0.00 [0.00, 0.00]"
    row["recall_8W_lo"] = "-0.006"                                # a real negative keeps its sign
    assert report._with_interval(row, "recall_8W", 2) == "0.00 [-0.01, 0.00]"


def test_long_range_tables_show_intervals_and_name_the_closest_row(report, results):
    path, timing = results / "long_range_study_gemma3.csv", results / "long_range_study_gemma3_prefill.csv"
    path.unlink(missing_ok=True)
    timing.unlink(missing_ok=True)
    assert "not measured yet" in report.long_range("long_range_study_gemma3.csv")

    data = [_long_range_row("dense", 1.0, "8/10"), _long_range_row("native", 0.95, "5/10"),
            _long_range_row("sinks+decode-global", 0.87, "8/10")]
    data[2]["passkey_4096_prompt_end"], data[2]["passkey_4096_prompt_end_lo"] = "2/10", "0.00"
    data[2]["passkey_4096_prompt_end_hi"] = "0.40"
    _write_csv(path, data)
    text = report.long_range("long_range_study_gemma3.csv")              # probes without their timing part
    assert "| not measured | – |" in text and "`long_range_study_gemma3_prefill.csv` not measured yet" in text
    met, line = report.long_range_target("long_range_study_gemma3.csv")
    assert met == [] and "prefill not measured" in line
    _write_csv(timing, [_prefill_row("dense", 1.0), _prefill_row("native", 1.2), _prefill_row("sinks+decode-global", 2.0)])
    text = report.long_range("long_range_study_gemma3.csv")
    assert text.startswith("`long_range_study_gemma3.csv`: `benchmarks/long_range_study.py --model gemma3-270m --part probes`")
    assert "Prefill: `long_range_study_gemma3_prefill.csv`: `benchmarks/long_range_study.py --model gemma3-270m --part timing`" in text
    assert "Gemma-3-270M, window 512" in text and "| >=4096 (all) |" in text
    assert "| 0.87 [0.80, 0.93] |" in text and "| 8/10 [0.50, 1.00] (end 2/10 [0.00, 0.40]) |" in text
    assert "| 20.00 (1.00–99.00) | 2.00x | 3.00 | 10.0 |" in text
    assert "**not met**: closest: sinks+decode-global, recall at 8W 0.870 (0.030 short of 0.9)" in text
    met, line = report.long_range_target("long_range_study_gemma3.csv")
    assert met == [] and "native" not in line                     # native misses by more: prefill 1.20x
    data[2]["recall_8W"] = "0.900"
    _write_csv(path, data)
    assert report.long_range_target("long_range_study_gemma3.csv") == (
        ["sinks+decode-global"], "met by sinks+decode-global")
    data[2]["passkey_4096"] = "4/10"                                # below dense's interval [0.50, 1.00]
    _write_csv(path, data)
    met, line = report.long_range_target("long_range_study_gemma3.csv")
    assert met == [] and "passkey 4k 4/10 below the unpatched model's interval [0.50, 1.00] by 0.10" in line


def test_a_probes_table_split_over_commands_joins_its_parts_and_refuses_a_mismatch(report, results):
    """frontier_gemma3's probes run as two commands (PROBE_PARTS): the table shows both parts' rows,
    one provenance line each, and refuses parts with other columns or a row in both."""
    for name in ("frontier_gemma3.csv", "frontier_gemma3_more.csv", "frontier_gemma3_prefill.csv"):
        (results / name).unlink(missing_ok=True)
    assert report.long_range("frontier_gemma3.csv") == "*(`frontier_gemma3.csv` not measured yet)*"
    _write_csv(results / "frontier_gemma3_prefill.csv", [_prefill_row("dense", 1.0), _prefill_row("sinks", 2.0)])
    text = report.long_range("frontier_gemma3.csv")                     # the timing part alone: its own table
    assert "not measured yet" in text and "Gemma-3-270M, window 512, timing part only" in text
    assert "| sinks | 20.00 (1.00–99.00) | 2.00x | 3.00 | 10.0 |" in text
    _write_csv(results / "frontier_gemma3.csv", [_long_range_row("dense", 1.0, "8/10"), _long_range_row("sinks", 0.0, "1/10")])
    text = report.long_range("frontier_gemma3.csv")
    assert "More rows: *(`frontier_gemma3_more.csv` not measured yet)*" in text and "| sinks |" in text
    _write_csv(results / "frontier_gemma3_more.csv", [_long_range_row("heads:0.1+sinks", 0.3, "4/10")])
    text = report.long_range("frontier_gemma3.csv")
    assert "More rows: `frontier_gemma3_more.csv`: `benchmarks/long_range_study.py" in text
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "/10" in line] == [
        "dense", "sinks", "heads:0.1+sinks"]
    no_dense = {f"recall_{d}{s}": "nan" for d in ("W/2", "2W", "8W") for s in ("", "_lo", "_hi")}
    _write_csv(results / "frontier_gemma3_more.csv", [_long_range_row("heads:0.1+sinks", 0.3, "4/10", **no_dense)])
    text = report.long_range("frontier_gemma3.csv")     # a part without dense: no recall, and no reach read off nan
    assert "| heads:0.1+sinks | – | – | – | – (all) | 4/10" in text and "nan" not in text
    assert "Copy recall and reach of heads:0.1+sinks: – (recall is a ratio to dense's drop" in text
    _write_csv(results / "frontier_gemma3_more.csv", [_long_range_row("sinks", 0.0, "1/10")])
    with pytest.raises(ValueError, match="more than one part"):
        report.long_range("frontier_gemma3.csv")
    _write_csv(results / "frontier_gemma3_more.csv", [_long_range_row("heads:0.1+sinks", 0.3, "4/10", ruler_niah_single_1_1024="3/3")])
    with pytest.raises(ValueError, match="different columns"):
        report.long_range("frontier_gemma3.csv")


def test_paired_rounds_warms_every_callable_alike_and_alternates_the_order():
    """Every callable gets one warm-up call before any timed round, ``prepare`` runs before each
    call, rounds alternate forward and reverse order, and the ratios are paired per round (so the
    baseline's own speed-up is exactly 1 and a callable that is always twice as slow reads 0.5)."""
    spec = importlib.util.spec_from_file_location("common", ROOT / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    calls, clock = [], [0.0]
    cost = {"dense": 2.0, "fast": 1.0, "slow": 4.0}

    def fake(name):
        def run():
            calls.append(name)
            clock[0] += cost[name]
        return run

    prepared = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(common.time, "perf_counter", lambda: clock[0])
        out = common.paired_rounds({n: fake(n) for n in cost}, rounds=3, baseline="dense", prepare=prepared.append)
    assert calls == ["dense", "fast", "slow"] * 2 + ["slow", "fast", "dense"] + ["dense", "fast", "slow"]
    assert prepared == calls
    assert {n: (r["speedup"], r["speedup_min"], r["speedup_max"], r["rounds"]) for n, r in out.items()} == {
        "dense": (1.0, 1.0, 1.0, 3), "fast": (2.0, 2.0, 2.0, 3), "slow": (0.5, 0.5, 0.5, 3)}
    assert out["slow"]["seconds"] == out["slow"]["warmup_s"] == 4.0
    with pytest.raises(ValueError, match="baseline"):
        common.paired_rounds({"a": fake("fast")}, rounds=1, baseline="dense")


def test_adaptation_target_fails_on_each_criterion(report):
    """Issue 30's verdict: the adapted calibrated row must fit 25 % of dense KV, reach dense's recall
    at 8W, keep RULER at the longest length in dense's interval and not lose perplexity; each
    figure moved past its bound turns the verdict."""
    def row(config, adapter, recall_hi, ruler, ppl, calibrated=""):
        return {"row": config + (f"@{adapter}" if adapter else ""), "config": config, "adapter": adapter,
                "recall_8W": "1.000", "recall_8W_lo": "0.900", "recall_8W_hi": recall_hi,
                "ruler_niah_single_1_1024": "10/10", "ruler_niah_single_1_4096": ruler,
                "ruler_niah_single_1_4096_lo": "0.72", "ruler_niah_single_1_4096_hi": "1.00",
                "heldout_ppl": ppl, "calibrate_minutes": calibrated}
    data = [row("dense", "", "1.000", "10/10", "8.0"), row("heads:0.24+sinks", "", "0.6", "4/10", "8.8", "0.1"),
            row("heads:0.24+sinks", "lr", "1.05", "8/10", "8.1", "0.1")]
    timing = {"dense": {"kv_mib": "720.0"}, "heads:0.24+sinks": {"kv_mib": "175.0"}}
    text = report.adaptation_target(data, timing)
    assert "**met** by heads:0.24+sinks + long-range LoRA (KV 24.3% of dense" in text and "before 8.8" in text
    for where, key, value, missed in ((timing["heads:0.24+sinks"], "kv_mib", "181.0", "KV 25.1% of dense"),
                                      (data[2], "recall_8W_hi", "0.99", "recall 8W"),
                                      (data[2], "ruler_niah_single_1_4096", "7/10", "RULER 4k 7/10"),
                                      (data[2], "heldout_ppl", "8.9", "held-out ppl 8.9 (before 8.8)")):
        old, where[key] = where[key], value
        text = report.adaptation_target(data, timing)
        assert "**not met**" in text and f"misses {missed}" in text, (key, text)
        where[key] = old
    assert "**not measured**" in report.adaptation_target(data[:2], timing)     # no adapted calibrated row
    assert "misses KV not measured" in report.adaptation_target(data, {"dense": timing["dense"]})


def test_frontier_target_fails_on_each_criterion_and_names_the_closest_rows(report):
    """Issue 29's verdict: a training-free row within the KV budget, ≥ 1.5x dense prefill, recall ≥ 0.9
    at 8W and RULER at the longest length in dense's interval with ≥ 30 samples; each figure moved
    past its bound turns it, and the verdict then names, per axis, the best row within the budget
    and the least KV of a row that meets the axis."""
    def row(name, recall, ruler, lo=""):
        return {"row": name, "config": name, "adapter": "", "recall_8W": recall, "recall_8W_lo": "0.8",
                "recall_8W_hi": "1.0", "ruler_niah_single_1_1024": "30/30", "ruler_niah_single_1_4096": ruler,
                "ruler_niah_single_1_4096_lo": lo or "0.10", "ruler_niah_single_1_4096_hi": "1.00"}
    data = [row("dense", "1.000", "30/30", "0.89"), row("heads:0.2+sinks", "0.950", "28/30"),
            row("sinks+decode-full", "0.990", "30/30")]
    timing = {"dense": {"kv_mib": "720.0", "tokens": "16384", "prefill_speedup_vs_dense": "1.00"},
              "heads:0.2+sinks": {"kv_mib": "170.0", "prefill_speedup_vs_dense": "1.60"},
              "sinks+decode-full": {"kv_mib": "720.5", "prefill_speedup_vs_dense": "2.50"}}
    text = report.frontier_target(data, timing)
    assert "**met** by heads:0.2+sinks (KV 23.6%; prefill 1.60x" in text and "sinks+decode-full" not in text
    for where, key, value, closest in ((timing["heads:0.2+sinks"], "kv_mib", "181.0", "least KV meeting it heads:0.2"),
                                       (timing["heads:0.2+sinks"], "prefill_speedup_vs_dense", "1.49", "prefill 1.49x"),
                                       (data[1], "recall_8W", "0.890", "recall 8W 0.89 [0.80, 1.00]"),
                                       (data[1], "ruler_niah_single_1_4096", "26/30", "4k 26/30 (dense 30/30")):
        old, where[key] = where[key], value
        text = report.frontier_target(data, timing)
        assert "**not met**" in text and closest in text, (key, text)
        where[key] = old
    few = [dict(r, ruler_niah_single_1_4096=r["ruler_niah_single_1_4096"].replace("/30", "/10")
                .replace("28/", "9/").replace("30/", "10/")) for r in data]
    text = report.frontier_target(few, timing)
    assert "**not met**" in text and "(fewer than 30 samples)" in text
    assert "**not met**" in report.frontier_target(data, timing, share=0.10)
    assert "**not measured**" in report.frontier_target(data, {k: v for k, v in timing.items() if k != "dense"})
