"""The README's results, generated from ``benchmarks/results/*.csv`` (and the export rules table
from the code) only.

    python benchmarks/report.py                      # print every section
    python benchmarks/report.py --write              # rewrite each <!-- report:NAME --> block of PAGES
    python benchmarks/report.py --check              # exit 1 naming the blocks that differ

Each block (in the README and the docs pages, :data:`PAGES`) sits between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``;
NAME is a key of :data:`SECTIONS`.  Every table says which command, commit, machine and
versions produced its CSV (the CSV's provenance columns), so a figure can be traced to one run,
and is marked **stale** when a file it measures (:data:`MEASURES`) changed in a later commit
(a commit in :data:`REVIEWED` is named instead, once a parse shows it changes no name the measured
scripts use), or **unverified** when the CSV was measured with uncommitted changes (``+dirty``).
"""
from __future__ import annotations

import argparse
import ast
import csv
import functools
import json
import math
import os
import re
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NO_PROVENANCE = "no recorded command: this CSV predates the provenance rule"


# ---- reading ------------------------------------------------------------------------------
def rows(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def pick(data, **match):
    """The one row whose columns equal ``match`` (compared as strings)."""
    found = [r for r in data if all(r.get(k) == str(v) for k, v in match.items())]
    if len(found) != 1:
        raise LookupError(f"{len(found)} rows match {match}")
    return found[0]


# The code each CSV measures: a change to any of these after the CSV's commit makes it stale.
# PATCH: what patch_model itself runs (every benchmark patches through it); REAL: the loader of
# the real models (SmolLM2, Gemma-3-270M); STREAM: the `swa-patch stream` command.
PATCH = ("swa_patch/__init__.py", "swa_patch/patch.py", "swa_patch/state.py", "swa_patch/config.py",
         "swa_patch/schedules.py", "swa_patch/families.py", "swa_patch/compat.py")
ATTENTION = PATCH + ("swa_patch/attention.py", "swa_patch/masks.py", "swa_patch/backends")
CACHE = ATTENTION + ("swa_patch/cache.py", "swa_patch/generation.py", "swa_patch/rope.py")
REAL = ("swa_patch/models.py",)
STREAM = REAL + ("swa_patch/streaming.py", "swa_patch/commands.py")
# COMMON: the benchmarks' shared timing rounds, fresh-process memory and provenance, for every script that
# imports it (tests/test_report.py checks each script's benchmarks/ imports are listed).
COMMON = ("benchmarks/common.py",)
STUDY = CACHE + REAL + COMMON + ("swa_patch/retrieval.py", "benchmarks/long_range_study.py")
MEASURES = {
    "prefill_scaling.csv": ATTENTION + COMMON + ("benchmarks/prefill_scaling.py",),
    "varying_prompts.csv": ATTENTION + COMMON + ("benchmarks/varying_prompts.py",),
    "dilation.csv": ATTENTION + ("benchmarks/dilation.py",),
    "receptive.csv": ATTENTION + ("swa_patch/receptive.py", "benchmarks/dilation.py"),
    "train_step.csv": ATTENTION + COMMON + ("benchmarks/train_step.py", "benchmarks/plot_train_step.py"),
    "cache_decode.csv": CACHE + COMMON + ("benchmarks/cache_decode.py",),
    "decode_step.csv": CACHE + REAL + COMMON + ("benchmarks/decode_step.py",),
    "packed_documents.csv": CACHE + REAL + COMMON + ("swa_patch/packing.py", "benchmarks/packed_documents.py"),
    "kv_head_decode.csv": CACHE + REAL + COMMON + ("benchmarks/decode_step.py", "benchmarks/kv_head_decode.py"),
    "compiled_decode.csv": CACHE + REAL + COMMON + ("swa_patch/static_cache.py", "benchmarks/compiled_decode.py"),
    "decode_after_long_prefill.csv": CACHE + REAL + COMMON + ("swa_patch/static_cache.py",
                                                              "benchmarks/decode_after_long_prefill.py"),
    "speculative.csv": CACHE + REAL + COMMON + ("benchmarks/speculative.py",),
    "streaming_demo.csv": CACHE + REAL + ("swa_patch/streaming.py", "examples/streaming_demo.py"),
    "stream_smollm2_40k.csv": CACHE + STREAM,
    "stream_gemma3_40k.csv": CACHE + STREAM,
    "streaming_demo_gemma3.csv": CACHE + REAL + ("swa_patch/streaming.py", "examples/streaming_demo.py"),
    "gemma3_prefill.csv": CACHE + REAL + COMMON + ("benchmarks/gemma3_prefill.py",),
    "stream_gemma3_16k_w1020.csv": CACHE + STREAM,
    "stream_chunked_vs_tbt.csv": CACHE + REAL + COMMON + ("swa_patch/streaming.py", "benchmarks/stream_chunked.py"),
    "attention_sinks_compare.csv": CACHE + REAL + COMMON + ("swa_patch/static_cache.py",
                                                            "benchmarks/attention_sinks_compare.py",
                                                            "benchmarks/attention_sinks_side.py"),
    "smollm2_window_finetune.csv": ATTENTION + ("recipes", "benchmarks/smollm2_window_finetune.py"),
    "long_range_study.csv": STUDY + ("recipes",),
    "long_range_study_gemma3.csv": STUDY + ("recipes",),
    "long_range_study_prefill.csv": STUDY,
    "long_range_study_gemma3_prefill.csv": STUDY,
    "frontier_smollm2.csv": STUDY + ("swa_patch/calibration.py", "swa_patch/ruler.py"),
    "frontier_smollm2_prefill.csv": STUDY + ("swa_patch/calibration.py",),
    "frontier_gemma3.csv": STUDY + ("swa_patch/calibration.py", "swa_patch/ruler.py"),
    "frontier_gemma3_more.csv": STUDY + ("swa_patch/calibration.py", "swa_patch/ruler.py"),
    "frontier_gemma3_prefill.csv": STUDY + ("swa_patch/calibration.py",),
    "adaptation_smollm2.csv": STUDY + ("recipes", "swa_patch/calibration.py", "swa_patch/ruler.py"),
    "adaptation_smollm2_prefill.csv": STUDY + ("swa_patch/calibration.py",),
    "gemma3_calibrated.csv": CACHE + STREAM + COMMON + ("swa_patch/calibration.py", "benchmarks/gemma3_calibrated.py"),
    "gpu_check_h200.csv": CACHE + ("swa_patch/static_cache.py", "benchmarks/gpu_check.py"),
    "vllm_roundtrip.csv": ATTENTION + REAL + COMMON + ("swa_patch/export.py", "swa_patch/checkpoint.py",
                                                       "swa_patch/verify.py", "swa_patch/_vllm_driver.py",
                                                       "benchmarks/vllm_roundtrip.py"),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Commits that changed a measured file and were read and found not to change what any CSV measured
# before them shows (as git's blame.ignoreRevs does for blame): file -> {commit: why}.  A table is not
# marked stale for them, and its provenance line names them, but only while a parse agrees
# (:func:`review_rejects`: the commit changes no top-level name that the CSV's measured files, as of its
# commit, import or use from that file); otherwise the table stays stale and says which names.
# tests/test_report.py checks that each commit exists and changed that file.
REVIEWED = {
    "swa_patch/retrieval.py": {
        "a9bf982": "run_cli (the swa-patch eval retrieval command) refuses a --compare without dense; no study calls it",
    },
    "benchmarks/common.py": {
        "e92908d": "adds paired_rounds(), which no script measured before it could call",
        "c84e3d4": "drops timed(), which no benchmark called any more",
    },
}


def _git(*args):
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return out.stdout.split() if out.returncode == 0 else None


def _reviewed(path, full_hash):
    """The :data:`REVIEWED` key of ``path`` that names this commit, or None."""
    return next((c for c in REVIEWED.get(path, {}) if full_hash.startswith(c)), None)


@functools.lru_cache(maxsize=None)
def _file_at(root, commit, path):
    """The text of ``path`` at ``commit`` in the checkout ``root`` ("" where it does not exist)."""
    out = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True, text=True, check=False)
    return out.stdout if out.returncode == 0 else ""


MODULE_CODE = "(module-level code)"      # top-level statements that bind no name: they run on every import


def _binds(node):
    """The top-level names a module statement binds (none: code that runs on import)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Import):
        return [a.asname or a.name.split(".")[0] for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module != "__future__":
        return [a.asname or a.name for a in node.names if a.name != "*"]
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


@functools.lru_cache(maxsize=None)
def _definitions(text):
    """name -> (the ``ast.dump`` of each statement binding it, the names those statements mention).
    Compared as parsed, so comments and layout do not count as a change; the docstring is left out."""
    tree = ast.parse(text)
    body = tree.body[1:] if ast.get_docstring(tree, clean=False) is not None else tree.body
    defs = {}
    for node in body:
        mentions = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        for name in _binds(node) or [MODULE_CODE]:
            dumps, refs = defs.setdefault(name, ([], set()))
            dumps.append(ast.dump(node))
            refs |= mentions
    return defs


@functools.lru_cache(maxsize=None)
def _uses(text, stem):
    """The names code ``text`` takes from a module called ``stem``: ``from stem import a``, or
    ``import stem`` then ``stem.a``; "*" where it may use any (a star import, the module passed on).
    Matched on the import's last dotted part, so a sys.path or relative import is never missed."""
    if stem not in text:
        return frozenset()
    nodes = list(ast.walk(ast.parse(text)))
    used, aliases = set(), set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.module and node.module.split(".")[-1] == stem:
                used |= {a.name for a in node.names}
            aliases |= {a.asname or a.name for a in node.names if a.name == stem}     # from pkg import stem
        elif isinstance(node, ast.Import):
            for a in (a for a in node.names if a.name.split(".")[-1] == stem):
                if a.asname or "." not in a.name:
                    aliases.add(a.asname or a.name)
                else:
                    used.add("*")        # import pkg.stem: reached as pkg.stem.x, not followed here
    attributes = [n for n in nodes if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                  and n.value.id in aliases]
    used |= {n.attr for n in attributes}
    if sum(isinstance(n, ast.Name) and n.id in aliases for n in nodes) > len(attributes):
        used.add("*")
    return frozenset(used)


def _needed(defs, used):
    """``used`` and every top-level name they reach through ``defs`` (module-level code always runs)."""
    todo, seen = [*used, MODULE_CODE], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += defs.get(name, ((), ()))[1]
    return seen


def review_rejects(name, measured, path, commit):
    """Why the :data:`REVIEWED` ``commit`` cannot count as leaving ``name`` (measured at ``measured``)
    unchanged: the top-level names of ``path`` that ``commit`` changed (source differs between its
    parent and it, added or removed) which the Python files :data:`MEASURES` lists, as of ``measured``,
    import or use, directly or through other names of ``path``.  Empty: the review holds."""
    if not path.endswith(".py"):
        return ["(not Python: cannot be checked)"]
    stem = os.path.basename(os.path.dirname(path)) if path.endswith("/__init__.py") else os.path.basename(path)[:-3]
    files = [f for f in _git("ls-tree", "-r", "--name-only", measured, "--", *MEASURES[name]) or []
             if f.endswith(".py") and f != path]
    try:
        before, after = (_definitions(_file_at(ROOT, c, path)) for c in (f"{commit}^", commit))
        used = set().union(*(_uses(_file_at(ROOT, measured, f), stem) for f in files))
    except SyntaxError as e:
        return [f"(does not parse: {e.msg})"]
    changed = {n for n in before.keys() | after.keys() if before.get(n, ([],))[0] != after.get(n, ([],))[0]}
    return sorted(changed if "*" in used else changed & _needed(before, used))


def dirty(commit):
    """Measured with uncommitted changes: the figures cannot be tied to any commit."""
    return commit.endswith("+dirty")


def changes_since(name, commit):
    """``(changed, reviewed, rejected)``: the files :data:`MEASURES` lists for ``name`` that commits
    after ``commit`` changed (up to HEAD); the :data:`REVIEWED` commits left out of that (a file whose
    every change since is reviewed, and passes :func:`review_rejects`, is not changed); and the
    reviews that failed, as ``(path, key, names)``.  None when ``commit`` is not in this history
    (a ``+dirty`` commit is none: see :func:`dirty`)."""
    files = None if dirty(commit) else _git("diff", "--name-only", commit, "HEAD", "--", *MEASURES[name])
    if files is None:
        return None
    changed, reviewed, rejected = [], [], []
    for path in files:
        since = _git("log", "--format=%H", f"{commit}..HEAD", "--", path)
        keys = [_reviewed(path, c) for c in since]
        if not keys or None in keys:       # no commits: the tree differs some other way, so changed
            changed.append(path)
            continue
        bad = [(path, key, names) for key, c in zip(keys, since) if (names := review_rejects(name, commit, path, c))]
        if bad:
            changed.append(path)
            rejected += bad
        else:
            reviewed += [(path, key) for key in keys]
    return changed, reviewed, rejected


def changed_since(name, commit):
    """The files of ``name`` changed after ``commit`` (see :func:`changes_since`), or None."""
    changes = changes_since(name, commit)
    return None if changes is None else changes[0]


def source(name):
    """Where a CSV's figures come from: its command, commit, date, machine and versions; and
    whether the code it measures changed since (then the table is stale, and says so)."""
    data = rows(name)
    if not data:
        return f"*(`{name}` not measured yet)*"
    r = data[0]
    if not r.get("command"):
        return f"*(`{name}`: {NO_PROVENANCE})*"
    threads = f", {r['threads']} thread{'' if r.get('threads') == '1' else 's'}" if r.get("threads") else ""
    line = (f"`{name}`: `{r['command']}` at {r['commit']} ({r['date']}; {r['machine']}{threads}; "
            f"torch {r['torch']}, transformers {r['transformers']})")
    if dirty(r["commit"]):
        return (f"{line}. **Unverified**: measured at a dirty tree of commit {r['commit'].removesuffix('+dirty')} "
                "(uncommitted changes), so its figures cannot be tied to a commit")
    changes = changes_since(name, r["commit"])
    if changes is None:
        return f"{line}. **Stale?** commit {r['commit']} is not in this history"
    changed, reviewed, rejected = changes
    if changed:
        files = ", ".join(f"`{f}`" for f in changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        why = "".join(f"; REVIEWED `{path}` {key} rejected: it changes {', '.join(f'`{n}`' for n in names)}, which "
                      "the measured code uses" for path, key, names in rejected)
        return f"{line}. **Stale**: measured at {r['commit']}; changed since: {files}{why}"
    if reviewed:
        line += ". Changed since, reviewed as not what it measures: " + ", ".join(
            f"`{path}` {key} ({REVIEWED[path][key]})" for path, key in reviewed)
    return line


# ---- formatting ---------------------------------------------------------------------------
def f(x, digits=2):
    return f"{float(x):.{digits}f}"


def num(x):
    """Integers as they are, other numbers with 3 significant decimals."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return x
    if v.is_integer() and "." not in str(x):
        return str(int(v))
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.3f}"


def table(header, body):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def simple(name, columns):
    data = rows(name)
    return table(columns, [[num(r[c]) for c in columns] for r in data]) if data else ""


def with_source(name, text):
    return f"{source(name)}\n\n{text}"


def csv_table(name, columns):
    """A section that is one CSV's columns as they are, under its provenance line."""
    return lambda: with_source(name, simple(name, columns))


# ---- one function per results table -------------------------------------------------------
def prefill():
    name = "prefill_scaling.csv"
    data = rows(name)
    out = []
    for mode in ("fwd", "fwd+bwd"):
        sizes = sorted({int(r["n"]) for r in data if r["level"] == "attention" and r["mode"] == mode})
        methods = [m for m in ("dense_sdpa", "hf_sliding_mask", "swa_sdpa", "swa_flex", "swa_eager")
                   if any(r["method"] == m and r["mode"] == mode for r in data)]
        body = []
        for n in sizes:
            cell = {r["method"]: r for r in data if r["level"] == "attention" and r["mode"] == mode and int(r["n"]) == n}
            body.append([n] + [_attention_cell(cell[m]) if m in cell else "–" for m in methods])
        out.append(f"Attention {mode}, W=512, 8 heads, head dim 64, fp32, against dense causal SDPA: "
                   f"{_timing_method(data, 'attention')}, peak MB above baseline (one call in a fresh process); block masks are built inside the "
                   f"timed call:\n\n" + table(["n"] + methods, body))
    model = [r for r in data if r["level"] == "model"]
    if model:
        body = [[r["n"], r["method"], f(r["seconds"], 2) + _min_max(r, "min_s", "max_s", 2), f(r["warmup_s"], 2),
                 _xr(r, digits=2), r["rounds"]] for r in model]
        out.append("Model-level prefill, SmolLM2-135M-shaped random Llama (30 layers), W=1024 "
                   "(`hf_sliding_mask`: a Mistral of the same shape with `sliding_window=1024`): "
                   + _timing_method(data, "model") + ":\n\n"
                   + table(["tokens", "method", "median s (min–max)", "warm-up s", "speed-up vs unpatched [min–max]",
                            "rounds"], body))
    return with_source(name, "\n\n".join(out))


def _attention_cell(r) -> str:
    return f"{f(r['seconds'], 3)} s ({_xr(r)}; warm-up {f(r['warmup_s'], 2)} s; {f(r['peak_mb'], 0)} MB)"


def _min_max(r, lo, hi, digits) -> str:
    return f" [{f(r[lo], digits)}–{f(r[hi], digits)}]"


def _timing_method(data, level) -> str:
    """How the CSV's seconds were taken (``common.paired_rounds``), with the rounds' count."""
    counts = sorted({int(r["rounds"]) for r in data if r["level"] == level})
    rounds = f"{counts[0]}–{counts[-1]}" if len(counts) > 1 else str(counts[0])
    return (f"median seconds of {rounds} paired rounds after one warm-up call each, speed-up the median of "
            "the per-round ratios [min–max], first-call seconds (warm-up, flex's compile included)")


def decode():
    name = "cache_decode.csv"
    data = rows(name)
    steps = [[r["method"], r["position"], f(r["value"], 2), f"{f(r['min'], 2)}–{f(r['max'], 2)}",
              f(r["ratio_vs_2k"], 2), f(r["kv_cache_mb"], 1)] for r in data if r["metric"] == "decode_ms_per_token"]
    memory = [[r["method"], f"{num(r['from_position'])} → {num(r['position'])}", f(r["value"], 1),
               f(r["kv_growth_mb"], 1)] for r in data if r["metric"] == "resident_growth_mb"]
    return with_source(name, table(["method", "position", "ms per token (median)", "min–max", "ratio to 2k",
                                    "KV MiB"], steps) + "\n\n" +
                       table(["method", "tokens", "resident growth MiB", "KV growth MiB"], memory))


def stream():
    name = "stream_smollm2_40k.csv"
    data = rows(name)
    if not data:
        return source(name)
    by = {}
    for r in data:
        by.setdefault(r["mode"], []).append(r)
    body = [[mode, rs[-1]["tokens"], f(rs[-1]["ppl"], 3), f(int(rs[-1]["kv_bytes"]) / 2**20, 1),
             f(rs[-1]["tokens_per_s"], 0)] for mode, rs in by.items()]
    text = table(["mode", "tokens streamed", "cumulative ppl", "KV MiB", "tokens/s (chunk 512)"], body)
    return with_source(name, text + f"\n\nsinks at {stream_gap()[0]} tokens / dense at 4,096 tokens: "
                                     f"{stream_gap()[1]:.3f}")


def stream_gap():
    data = rows("stream_smollm2_40k.csv")
    sinks = [r for r in data if r["mode"] == "sinks"][-1]
    return int(sinks["tokens"]), float(sinks["ppl"]) / float(pick(data, mode="dense", tokens=4096)["ppl"])


def varying_prompts():
    """Total wall time of prompts of many lengths, compiles included: auto and flex vs the sdpa band."""
    name = "varying_prompts.csv"
    data = rows(name)
    if not data:
        return source(name)
    backends = [b for b in ("sdpa", "auto", "flex") if f"{b}_s" in data[0]]
    total = {b: sum(float(r[f"{b}_s"]) for r in data) for b in backends}
    later = {b: sum(float(r[f"{b}_s"]) for r in data[1:]) for b in backends}   # after the first (compiling) prompt
    body = [[b, f(total[b], 1), f(total[b] / total["sdpa"], 3), f(float(data[0][f"{b}_s"]), 1),
             f(later[b] / later["sdpa"], 3)] for b in backends]
    return with_source(name, f"{len(data)} prompts of {min(int(r['tokens']) for r in data)}–"
                       f"{max(int(r['tokens']) for r in data)} tokens, {data[0]['layers']} layers, "
                       f"W={data[0]['window']}, each backend in a fresh process:\n\n"
                       + table(["backend", "total s", "vs sdpa band", "first prompt s (compiles)",
                                "other prompts vs sdpa band"], body))


def compiled_decode():
    name = "compiled_decode.csv"
    text = simple(name, ["method", "position", "compiled", "ms_per_token", "ms_min", "ms_max", "vs_default_eager",
                         "vs_eager_same_position", "vs_unpatched_1k_same_mode", "warmup_s"])
    after = "decode_after_long_prefill.csv"
    text += (f"\n\nThe same cache, eager, one process, 1k then 32k then 1k again ({source(after)}):\n\n"
             + simple(after, ["order", "position", "after_32k_prefill", "ms_per_token", "vs_first_1k"]))
    return with_source(name, text)


def train():
    name = "train_step.csv"
    data = rows(name)
    if not data:
        return source(name)
    cell = {(r["mode"], r["metric"], r["seq_len"]): float(r["value"]) for r in data}
    body = []
    def step(mode, n):
        spread = (f" ({f(cell[(mode, 'step_s_min', n)], 1)}–{f(cell[(mode, 'step_s_max', n)], 1)})"
                  if (mode, "step_s_max", n) in cell else "")
        return f(cell[(mode, "step_s", n)], 1) + spread
    for n in sorted({r["seq_len"] for r in data}, key=int):
        d, w = cell[("dense", "step_s", n)], cell[("window", "step_s", n)]
        body.append([n, step("dense", n), step("window", n), f(d / w, 2), f(cell[("dense", "peak_mb", n)], 0),
                     f(cell[("window", "peak_mb", n)], 0)])
    r = data[0]
    return with_source(name, f"Median of {r['repeats']} steps after {r['warmup']} untimed warm-up step(s), "
                       f"each length and mode in a fresh process:\n\n"
                       + table(["tokens", "dense step s (min–max)", "window step s (min–max)", "speed-up", "dense peak MB",
                                "window peak MB"], body))


def gpu():
    name = "gpu_check_h200.csv"
    data = [r for r in rows(name) if r["section"] == "attention"]
    if not data:
        return source(name)
    cols = [(16384, "fwd"), (16384, "fwd+bwd"), (32768, "fwd"), (32768, "fwd+bwd")]
    body = []
    for window in sorted({int(r["window"]) for r in data}):
        for method in ("swa_flex", "swa_sdpa"):
            cells = {(int(r["n"]), r["mode"]): r for r in data if r["method"] == method and int(r["window"]) == window}
            if cells:
                body.append([f"W={window}, {method.removeprefix('swa_')}"]
                            + [f"{f(cells[c]['speedup_vs_dense'], 2)}x" if c in cells else "–" for c in cols])
    text = table(["attention, speed-up vs flash SDPA"] + [f"n={n // 1024}k {m}" for n, m in cols], body)
    model = [r for r in rows(name) if r["section"] == "model_prefill"]
    text += ("\n\nModel prefill, SmolLM2-135M shape (30 layers), W=1024, bf16:\n\n"
             + table(["tokens", "method", "ms", "speed-up vs unpatched"],
                     [[r["n"], r["method"], r["ms"], f"{f(r['speedup_vs_dense'])}x"] for r in model]))
    dil = [r for r in rows(name) if r["section"] == "dilation"]
    text += ("\n\nDilation, flex, n=16k, W=512, forward:\n\n"
             + table(["dilation", "ms", "vs d=1"], [[r["dilation"], r["ms"], f"{f(r['ratio_vs_d1'])}x"] for r in dil]))
    return with_source(name, text)


MODEL_TITLES = {"smollm2-135m": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma-3-270M"}


def _tokens(n):
    """1024 -> '1k', 16384 -> '16k', 512 -> '512'."""
    return f"{int(n) // 1024}k" if int(n) % 1024 == 0 else str(n)


def _passkey_lengths(row):
    return [m.group(1) for c in row if (m := re.fullmatch(r"passkey_(\d+)", c))]


def _with_interval(r, col, digits):
    """``value [lo, hi]`` where the CSV has the interval (recall to 2 decimals, passkey as hits/n)."""
    value, lo, hi = r.get(col, ""), r.get(f"{col}_lo"), r.get(f"{col}_hi")
    if not value or value == "nan":
        return "–"
    if "/" not in value and lo:
        value = _fixed(value, digits)
    return f"{value} [{_fixed(lo, digits)}, {_fixed(hi, digits)}]" if lo else value


def _fixed(x, digits):
    """``x`` to ``digits`` decimals, with no "-0.00" for a tiny negative (adding 0.0 turns -0.0 into 0.0)."""
    return f"{round(float(x), digits) + 0.0:.{digits}f}"


def _prefill_name(name):
    """The study's timing part beside its probes part: long_range_study.csv -> long_range_study_prefill.csv."""
    return name.removesuffix(".csv") + "_prefill.csv"


def _speed_cells(t):
    """A timing-part row's prefill (min–max), speed-up over the unpatched model, warm-up and KV cells."""
    if not t:
        return ["not measured", "–", "–", "–"]
    return [f"{f(t['prefill_s'])} ({f(t['prefill_s_min'])}–{f(t['prefill_s_max'])})",
            f"{float(t['prefill_speedup_vs_dense']):.2f}x", f(t["prefill_warmup_s"]), t["kv_mib"]]


def _timing_alone(name):
    """The timing part's own table, for a study whose probes part has not run yet ('' if neither)."""
    timing = rows(name)
    if not timing:
        return ""
    k = _tokens(timing[0]["tokens"])
    body = [[t["config"], *_speed_cells(t)] for t in timing]
    return (f"\n\nPrefill: {source(name)}\n\n{MODEL_TITLES[timing[0]['model']]}, window {timing[0]['window']}, "
            "timing part only:\n\n" + table(["configuration", f"prefill {k} s (min–max)", "vs unpatched",
                                              "warm-up s", f"KV MiB at {k}"], body))


# A study's probes part run as several commands, each on some of the rows (so each fits a session here):
# its first CSV -> the others, whose rows the table appends, each with its own provenance line.
PROBE_PARTS = {"frontier_gemma3.csv": ("frontier_gemma3_more.csv",)}


def long_range(name="long_range_study.csv", verdict=None):
    """The SWAA-style table: one row per configuration of benchmarks/long_range_study.py's probes
    part (and of its :data:`PROBE_PARTS`), its prefill columns joined by configuration from the
    timing part (``*_prefill.csv``, its own command and commit), with bootstrap intervals where the
    CSV has them, then the target's verdict: ``verdict(data, timing)``'s sentence, or
    :func:`long_range_target`'s."""
    parts = {n: part for n in (name, *PROBE_PARTS.get(name, ())) if (part := rows(n))}
    if not parts:
        return source(name) + _timing_alone(_prefill_name(name))
    data = [r for part in parts.values() for r in part]
    if any(set(r) != set(data[0]) for r in data):
        raise ValueError(f"{', '.join(parts)}: the parts of one probes table have different columns (other "
                         "probe settings); rerun them with run_all's commands")
    labels = [(r["config"], r["adapter"]) for r in data]
    if len(set(labels)) < len(labels):
        raise ValueError(f"{', '.join(parts)}: a row is in more than one part")
    timing = {r["config"]: r for r in rows(_prefill_name(name))}
    lengths = _passkey_lengths(data[0])
    k = _tokens(next(iter(timing.values()))["tokens"]) if timing else "16k"
    rulers = [c for c in data[0] if c.startswith("ruler_") and not c.endswith(("_lo", "_hi"))]
    header = (["configuration", "recall W/2", "recall 2W", "recall 8W", "reach (field)"]
              + [f"passkey {_tokens(n)}" for n in lengths]
              + [f"RULER {c[6:].rsplit('_', 1)[0]} {_tokens(c.rsplit('_', 1)[1])}" for c in rulers]
              + ["held-out ppl", f"prefill {k} s (min–max)", "vs unpatched", "warm-up s", f"KV MiB at {k}"])
    body, unpaired = [], []
    for r in data:
        label = r["config"] + (f" + LoRA ({r['adapter']})" if r["adapter"] else "")
        no_dense = r["recall_8W"] == "nan"      # the study writes nan (and a reach read off nan) without dense
        if no_dense:
            unpaired.append(label)
        keys = [_with_interval(r, f"passkey_{n}", 2) + (f" (end {_with_interval(r, f'passkey_{n}_prompt_end', 2)})"
                                                       if r.get(f"passkey_{n}_prompt_end") else "") for n in lengths]
        speed = _speed_cells(timing.get(r["config"]))
        body.append([label, *(_with_interval(r, f"recall_{d}", 2) for d in ("W/2", "2W", "8W")),
                     f"{'–' if no_dense else r['effective_reach']} ({r['receptive_field']})", *keys,
                     *(_with_interval(r, c, 2) for c in rulers), r["heldout_ppl"], *speed])
    title = MODEL_TITLES[data[0].get("model") or "smollm2-135m"]
    if verdict is not None:
        sentence = verdict(data, timing)
    else:
        met, text = long_range_target(name)
        within = ("within the unpatched model's 95 % interval" if any(c.endswith("_lo") for c in data[0])
                  else "within one hit of the unpatched model's, as this CSV has no intervals")
        sentence = (f"Target (prefill ≥ 1.5x the unpatched model, recall ≥ 0.9 at 8W, passkey at every length "
                    f"{within}): {'**met**' if met else '**not met**'}: {text}.")
    if unpaired:
        sentence = (f"Copy recall and reach of {', '.join(unpaired)}: – (recall is a ratio to dense's drop, paired "
                    "per trial, and their command ran no dense row).\n\n" + sentence)
    sources = "\n\n".join([source(name)] + [f"More rows: {source(n)}" for n in PROBE_PARTS.get(name, ())])
    return (f"{sources}\n\nPrefill: {source(_prefill_name(name))}\n\n{title}, window {data[0]['window']}:\n\n"
            + table(header, body) + "\n\n" + sentence)


ADAPTER_NAMES = {"": "before", "ce": "running-text LoRA (control)", "lr": "long-range LoRA", "distill": "distilled LoRA"}


def adaptation(name="adaptation_smollm2.csv"):
    """Issue 30's before/after table: each row's configuration untrained, after LoRA on running text
    (the control) and after LoRA on long-range tasks, at the same steps, with intervals; its KV
    joined by configuration from the timing part (``*_prefill.csv``), then the target's verdict
    (:func:`adaptation_target`)."""
    data = rows(name)
    if not data:
        return source(name)
    timing = {r["config"]: r for r in rows(_prefill_name(name))}
    lengths = _passkey_lengths(data[0])
    k = _tokens(next(iter(timing.values()))["tokens"]) if timing else "16k"
    rulers = [c for c in data[0] if c.startswith("ruler_") and not c.endswith(("_lo", "_hi"))]
    header = (["configuration", "adapter", "recall W/2", "recall 2W", "recall 8W"]
              + [f"passkey {_tokens(n)}" for n in lengths]
              + [f"RULER {c[6:].rsplit('_', 1)[0]} {_tokens(c.rsplit('_', 1)[1])}" for c in rulers]
              + ["held-out ppl", "train min"] + ([f"KV MiB at {k} (of dense)"] if timing else []))
    body = []
    for r in data:
        keys = [_with_interval(r, f"passkey_{n}", 2) + (f" (end {_with_interval(r, f'passkey_{n}_prompt_end', 2)})"
                                                       if r.get(f"passkey_{n}_prompt_end") else "") for n in lengths]
        body.append([r["config"], ADAPTER_NAMES.get(r["adapter"], r["adapter"]),
                     *(_with_interval(r, f"recall_{d}", 2) for d in ("W/2", "2W", "8W")), *keys,
                     *(_with_interval(r, c, 2) for c in rulers), r["heldout_ppl"], r["train_minutes"] or "–",
                     *([_kv_share(timing, r["config"])] if timing else [])])
    settings = json.loads(data[0]["settings"])
    kv = f"\n\nKV: {source(_prefill_name(name))}" if timing else ""
    return (f"{source(name)}{kv}\n\n{MODEL_TITLES[data[0]['model']]}, window {data[0]['window']}; LoRA "
            f"{settings['steps']} steps of {settings['seq_len']} tokens per adapter, each on its row's configuration:"
            f"\n\n" + table(header, body) + f"\n\n{adaptation_target(data, timing)}")


def _kv_fraction(timing, config):
    """KV MiB of ``config`` over dense's, from the timing part's rows; None where either is missing."""
    t, dense = timing.get(config), timing.get("dense")
    return float(t["kv_mib"]) / float(dense["kv_mib"]) if t and dense else None


def _kv_share(timing, config):
    if config not in timing:
        return "not measured"
    fraction = _kv_fraction(timing, config)
    return timing[config]["kv_mib"] + (f" ({fraction:.1%})" if fraction is not None else "")


def _hits(value):
    """A score written ``hits/n`` as a share."""
    hits, n = value.split("/")
    return int(hits) / int(n)


def adaptation_target(data, timing, share=0.25):
    """Issue 30's target as a sentence: a calibrated row adapted on long-range data (``@lr``) with
    KV at most ``share`` of dense's at the timed length; copy recall at 8W within dense's 95 %
    interval (recall is a paired ratio to dense, whose own interval is the point 1: the row's
    interval must reach 1); RULER niah_single at the longest length no lower than dense's 95 %
    interval; held-out perplexity no worse than the same configuration before adaptation."""
    dense = pick(data, row="dense")
    longest = max((c for c in data[0] if c.startswith("ruler_niah_single") and not c.endswith(("_lo", "_hi"))),
                  key=lambda c: int(c.rsplit("_", 1)[1]), default=None)
    rows_ = [r for r in data if r["adapter"] == "lr" and r.get("calibrate_minutes")]
    if not rows_ or longest is None or "dense" not in timing:
        return (f"Target (the best calibrated row at ≤ {share * 100:g} % of dense KV, adapted): "
                "**not measured** by this CSV.")
    verdicts = []
    for r in rows_:
        before = pick(data, config=r["config"], adapter="")
        kv = _kv_fraction(timing, r["config"])
        checks = [(kv is not None and kv <= share, f"KV {kv:.1%} of dense" if kv is not None else "KV not measured"),
                  (r["recall_8W_hi"] != "" and float(r["recall_8W_hi"]) >= 1.0,
                   f"recall 8W {_with_interval(r, 'recall_8W', 2)}"),
                  (_hits(r[longest]) >= float(dense[f"{longest}_lo"]),
                   f"RULER {_tokens(longest.rsplit('_', 1)[1])} {r[longest]} (dense {_with_interval(dense, longest, 2)})"),
                  (float(r["heldout_ppl"]) <= float(before["heldout_ppl"]),
                   f"held-out ppl {r['heldout_ppl']} (before {before['heldout_ppl']})")]
        missed = [text for ok, text in checks if not ok]
        verdicts.append((not missed, r["config"], "; ".join(text for _, text in checks), missed))
    met = [v for v in verdicts if v[0]]
    head = (f"Target (a calibrated row at ≤ {share * 100:g} % of dense KV, adapted on long-range data: recall at 8W "
            "within dense's interval, i.e. its paired interval reaches 1; RULER niah_single at the longest length no lower than "
            "dense's 95 % interval; held-out perplexity no worse than before adaptation): ")
    if met:
        return head + "**met** by " + "; ".join(f"{config} + long-range LoRA ({text})" for _, config, text, _ in met) + "."
    return head + "**not met**: " + "; ".join(f"{config} + long-range LoRA misses {', '.join(missed)}"
                                             for _, config, _, missed in verdicts) + "."


FRONTIER_AXES = ("prefill", "recall 8W", "RULER")


def _frontier_values(r, dense, timing):
    """{axis: (value, met, text)} of one frontier row: prefill speed-up over dense (timing part),
    copy recall at 8W, and RULER at the longest length: the least share of hits over the tasks
    where dense's 95 % interval is above 0, each judged against dense's lower bound."""
    t = timing.get(r["config"])
    speed = float(t["prefill_speedup_vs_dense"]) if t else None
    recall = float(r["recall_8W"]) if r.get("recall_8W") else None
    longest = max((int(c.rsplit("_", 1)[1]) for c in r if re.fullmatch(r"ruler_\w+_\d+", c)), default=None)
    tasks = [c for c in r if longest and re.fullmatch(rf"ruler_\w+_{longest}", c) and float(dense[f"{c}_lo"]) > 0]
    cells = [(_hits(r[c]) - float(dense[f"{c}_lo"]), f"{c[6:].rsplit('_', 1)[0]} {_tokens(longest)} {r[c]} "
              f"(dense {_with_interval(dense, c, 2)})", int(r[c].split("/")[1])) for c in tasks]
    worst = min(cells, default=None)
    return {"prefill": (speed, speed is not None and speed >= 1.5,
                        f"prefill {speed:.2f}x" if speed is not None else "prefill not measured"),
            "recall 8W": (recall, recall is not None and recall >= 0.9,
                          f"recall 8W {_with_interval(r, 'recall_8W', 2)}" if recall is not None else "recall 8W not measured"),
            "RULER": (worst[0] if worst else None, bool(worst) and all(m >= 0 and n >= 30 for m, _, n in cells),
                      f"RULER {worst[1]}" + ("" if all(n >= 30 for *_, n in cells) else " (fewer than 30 samples)")
                      if worst else "RULER not measured")}


def frontier_target(data, timing, share=0.25):
    """Issue 29's target as a sentence: a training-free row with KV at most ``share`` of dense's at
    the timed length, prefill ≥ 1.5x dense, copy recall ≥ 0.9 at 8W, and RULER at the longest
    length no lower than dense's 95 % interval on every task where dense scores above 0 (≥ 30
    samples).  Without such a row, for each axis: the best row within the KV budget, and the
    least KV of any row that meets that axis."""
    dense = pick(data, row="dense")
    if "dense" not in timing:
        return f"Target (KV ≤ {share * 100:g} % of dense): **not measured**: no timing part for dense."
    rows_ = [r for r in data if r["row"] != "dense" and not r.get("adapter")]
    kv = {r["row"]: _kv_fraction(timing, r["config"]) for r in rows_}
    values = {r["row"]: _frontier_values(r, dense, timing) for r in rows_}
    head = (f"Target (KV ≤ {share * 100:g} % of dense at {_tokens(timing['dense']['tokens'])}, prefill ≥ 1.5x dense, "
            "recall ≥ 0.9 at 8W, RULER at the longest length no lower than dense's 95 % interval, ≥ 30 samples): ")
    within = [row for row in kv if kv[row] is not None and kv[row] <= share]
    met = [row for row in within if all(ok for _, ok, _ in values[row].values())]
    if met:
        return head + "**met** by " + "; ".join(
            f"{row} (KV {kv[row]:.1%}; {', '.join(text for *_, text in values[row].values())})" for row in met) + "."
    parts = []
    for axis in FRONTIER_AXES:
        scored = [row for row in within if values[row][axis][0] is not None]
        best = max(scored, key=lambda row: values[row][axis][0], default=None)
        meeting = sorted((row for row in kv if kv[row] is not None and values[row][axis][1]), key=kv.get)
        parts.append(f"{axis}: best within the budget "
                     + (f"{best} ({values[best][axis][2]}, KV {kv[best]:.1%})" if best else "none")
                     + "; least KV meeting it " + (f"{meeting[0]} (KV {kv[meeting[0]]:.1%})" if meeting else "none"))
    return head + "**not met**: " + "; ".join(parts) + "."


def t_frontier(share=0.25):
    name = "frontier_smollm2.csv"
    text = frontier_target(rows(name), {r["config"]: r for r in rows(_prefill_name(name))}, share)
    verdict = text.split(": ", 1)[1]
    return "**met**" in text, verdict.replace("**met** by ", "").replace("**not met**: ", "")


def t_gemma3_calibrated():
    data = rows("gemma3_calibrated.csv")
    loaded = pick(data, row="as-loaded")
    best = min((r for r in data if r["row"].startswith("plan:")), key=lambda r: float(r["ppl"]))
    met = [r["row"] for r in data if r["meets_target"] == "yes"]
    return bool(met), (f"{best['row']}: ppl {best['ppl']} ({(float(best['ppl_vs_loaded']) - 1) * 100:+.1f} % over "
                       f"{loaded['ppl']} as loaded) at {best['kv_mib']} MiB ({float(best['kv_vs_loaded']):.1%} of "
                       f"{loaded['kv_mib']}); windowed everywhere: {pick(data, row='sinks')['ppl']}")


def t_adaptation():
    name = "adaptation_smollm2.csv"
    text = adaptation_target(rows(name), {r["config"]: r for r in rows(_prefill_name(name))})
    return "**met**" in text, text.split("): ", 1)[1].replace("**met** by ", "")


def long_range_target(name="long_range_study.csv"):
    """(rows meeting the issue's long-range target, a sentence): prefill ≥ 1.5x the unpatched
    model, copy recall ≥ 0.9 at 8W, and passkey at every length no lower than the unpatched
    row's 95 % interval (a CSV without intervals: within one hit of it).  Without a row that
    meets it, the sentence names the closest row and what it misses by: fewest criteria
    missed, then the smallest sum of relative shortfalls (prefill and recall as a share of
    their thresholds, passkey in accuracy)."""
    data = rows(name)
    dense = pick(data, row="dense")
    timing = {r["config"]: r for r in rows(_prefill_name(name))}
    shortfalls = {r["row"]: _long_range_shortfalls(r, dense, timing.get(r["config"]))
                  for r in data if r["row"] != "dense"}
    met = [row for row, short in shortfalls.items() if not short]
    if met:
        return met, f"met by {', '.join(met)}"
    row = min(shortfalls, key=lambda x: (len(shortfalls[x]), sum(w for _, w in shortfalls[x])))
    return met, f"closest: {row}, " + "; ".join(text for text, _ in shortfalls[row])


def _long_range_shortfalls(r, dense, timing):
    """[(what is missed, by how much as a share)] for one row of a long-range CSV and its
    configuration's row of the timing part (None: not timed, which misses the speed criterion)."""
    out = []
    speed = float(timing["prefill_speedup_vs_dense"]) if timing else 0.0
    if timing is None:
        out.append(("prefill not measured", 1.0))
    elif speed < 1.5:
        out.append((f"prefill {speed:.2f}x ({1.5 - speed:.2f}x short of 1.5x)", (1.5 - speed) / 1.5))
    recall = float(r["recall_8W"]) if r.get("recall_8W") else float("nan")
    if not recall >= 0.9:
        out.append((f"recall at 8W {r.get('recall_8W') or 'not measured'}"
                    + (f" ({0.9 - recall:.3f} short of 0.9)" if recall == recall else ""),
                    (0.9 - recall) / 0.9 if recall == recall else 1.0))
    for n in _passkey_lengths(r):
        hits, tries = map(int, r[f"passkey_{n}"].split("/"))
        d_hits, d_tries = map(int, dense[f"passkey_{n}"].split("/"))
        floor = float(dense[f"passkey_{n}_lo"]) if dense.get(f"passkey_{n}_lo") else (d_hits - 1) / d_tries
        if hits / tries < floor - 1e-9:
            bound = (f"the unpatched model's interval [{float(dense[f'passkey_{n}_lo']):.2f}, "
                     f"{float(dense[f'passkey_{n}_hi']):.2f}]" if dense.get(f"passkey_{n}_lo")
                     else f"{dense[f'passkey_{n}']} unpatched, less one hit")
            out.append((f"passkey {_tokens(n)} {hits}/{tries} below {bound} by {floor - hits / tries:.2f}",
                        floor - hits / tries))
    return out


def serving():
    from swa_patch.export import rules_table
    return rules_table()


# ---- the summary: each target beside what its CSV says ------------------------------------
def _prefill(level, mode, n, method):
    return pick(rows("prefill_scaling.csv"), level=level, mode=mode, n=n, method=method)


def _x(r, col="speedup_vs_dense", digits=1):
    return f"{float(r[col]):.{digits}f}x"


def _xr(r, digits=1):
    """A paired speed-up with its spread over rounds: ``7.7x [7.1–8.0]``."""
    return _x(r, digits=digits) + _min_max(r, "speedup_min", "speedup_max", digits)


def _ratio(r, col="speedup_vs_dense"):
    return float(r[col])


def t_attention_fwd():
    flex, band = (_prefill("attention", "fwd", 16384, m) for m in ("swa_flex", "swa_sdpa"))
    return max(_ratio(flex), _ratio(band)) >= 12, f"{_xr(flex)} (flex); {_xr(band)} (sdpa band)"


def t_attention_bwd():
    band, far = (_prefill("attention", "fwd+bwd", n, "swa_sdpa") for n in (16384, 32768))
    return _ratio(band) >= 5, f"{_xr(band)} (sdpa band; {_xr(far)} at 32k)"


def t_memory():
    def span(method):
        return [float(_prefill("attention", "fwd+bwd", n, method)["peak_mb"]) for n in (2048, 32768)]
    band, dense, hf = span("swa_sdpa"), span("dense_sdpa"), span("hf_sliding_mask")
    text = "; ".join(f"{name} {lo:.0f} → {hi:.0f} MB" for name, (lo, hi) in
                     (("sdpa band", band), ("dense SDPA", dense), ("transformers' mask-based window", hf)))
    return band[1] / band[0] <= 16, f"{text} (fwd+bwd, 2k → 32k tokens: 16x)"


def t_model_prefill():
    auto, hf = (_prefill("model", "prefill", 16384, m) for m in ("swa_auto", "hf_sliding_mask"))
    return (_ratio(auto) >= 2 and _ratio(auto) > _ratio(hf),
            f"{_xr(auto, digits=2)} (auto); transformers' mask-based window {_xr(hf, digits=2)}")


def t_short():
    short = [r for r in rows("prefill_scaling.csv")
             if r["level"] == "model" and r["n"] == "512" and r["method"].startswith("swa_")]
    # One-sided: the target is no slowdown.  At n <= W without sinks, sdpa and auto run the very
    # kernel the unpatched model runs (plain causal SDPA), so a reading above 1x is noise.
    return (min(_ratio(r) for r in short) >= 0.95,
            "; ".join(f"{r['method'].removeprefix('swa_')} {_xr(r, digits=3)}" for r in short)
            + f" (n=512, W=1024, median of {short[0]['rounds']} paired rounds; sdpa and auto run the unpatched "
            "model's kernel here)")


def t_stream():
    data = rows("stream_smollm2_40k.csv")
    sinks, window = ([r for r in data if r["mode"] == m][-1] for m in ("sinks", "window"))
    dense = pick(data, mode="dense", tokens=4096)
    tokens, gap = stream_gap()
    return None, (f"ppl {f(sinks['ppl'])} at {tokens:,} vs dense {f(dense['ppl'])} at 4k ({(gap - 1) * 100:+.1f} %); "
                  f"window-only {f(window['ppl'], 1)}; KV flat at {int(sinks['kv_bytes']) / 2**20:.1f} MiB")


def t_chunked():
    r = pick(rows("stream_chunked_vs_tbt.csv"), chunk=512)
    return (_ratio(r, "speedup_vs_token_by_token") >= 10 and float(r["ppl_rel_diff"]) < 1e-4,
            f"{_x(r, 'speedup_vs_token_by_token')}, relative ppl difference {float(r['ppl_rel_diff']):.0e}")


def t_decode_32k():
    data = rows("cache_decode.csv")
    ours = pick(data, metric="decode_ms_per_token", method="swa_cache", position=32768)
    dense = pick(data, metric="decode_ms_per_token", method="dense", position=32768)
    return _ratio(ours, "ratio_vs_2k") <= 1.1, f"{f(ours['ratio_vs_2k'])}x (dense: {f(dense['ratio_vs_2k'], 1)}x)"


def t_decode_step():
    r = pick(rows("decode_step.csv"), round="median")
    return float(r["ratio"]) <= 1.05, (f"{f(r['ratio'], 3)}x [{f(r['ratio_min'], 3)}–{f(r['ratio_max'], 3)}] over "
                                       f"{r['rounds']} paired rounds ({f(r['patched_ms'], 1)} vs "
                                       f"{f(r['unpatched_ms'], 1)} ms per step)")


def t_kv_head_decode():
    r = pick(rows("kv_head_decode.csv"), round="median")
    return float(r["ratio"]) <= 1.1, (f"{f(r['ratio'], 3)}x [{f(r['ratio_min'], 3)}–{f(r['ratio_max'], 3)}] over "
                                      f"{r['rounds']} paired rounds ({f(r['per_head_ms'], 1)} vs "
                                      f"{f(r['whole_layers_ms'], 1)} ms per step; KV {r['kv_mib_per_head']} vs "
                                      f"{r['kv_mib_whole_layers']} MiB)")


def t_rss():
    data = rows("cache_decode.csv")
    ours = pick(data, metric="resident_growth_mb", method="swa_cache")
    dense = pick(data, metric="resident_growth_mb", method="dense")
    tokens = lambda r: int(r["position"]) - int(r["from_position"])     # noqa: E731
    bound = 0.03 * float(dense["kv_growth_mb"]) * tokens(ours) / tokens(dense)
    seen = float(dense["value"]) > 0.5 * float(dense["kv_growth_mb"])     # the control shows a growing cache
    return (seen and float(ours["value"]) < bound,
            f"{f(ours['value'], 1)} MiB from 10k to 100k tokens (bound {f(bound, 1)}); dense control "
            f"{f(dense['value'], 1)} MiB for {f(dense['kv_growth_mb'], 1)} MiB of new KV (10k → 30k)")


def _spread(r, med, lo, hi, digits=2, unit="x"):
    return f"{f(r[med], digits)}{unit} ({f(r[lo], digits)}–{f(r[hi], digits)})"


def t_attention_sinks():
    """Judged on the median of the paired per-round speed-ups (a CSV written before rounds were
    paired holds a best-of-rounds figure: shown, not judged)."""
    data = rows("attention_sinks_compare.csv")
    ref, eager, comp = (pick(data, method=m) for m in ("attention_sinks", "swa_patch", "swa_patch_compiled"))
    if "speedup_min" not in comp:
        return None, (f"not judged: an older run, best of rounds per side, unpaired, warm-up excluded and not "
                      f"recorded ({_x(comp, 'speedup_vs_attention_sinks', 2)} compiled, eager "
                      f"{_x(eager, 'speedup_vs_attention_sinks', 2)}); rerun benchmarks/attention_sinks_compare.py")
    # three digits: the median can sit within rounding of the 1.5x threshold (1.498x reads 1.50x)
    speedup = lambda r: _spread(r, "speedup_vs_attention_sinks", "speedup_min", "speedup_max", 3)   # noqa: E731
    return (_ratio(comp, "speedup_vs_attention_sinks") >= 1.5,
            f"{speedup(comp)} with the static cache and a compiled step, median (min–max) of {comp['rounds']} "
            f"paired rounds ({f(comp['tokens_per_s'])} vs {f(ref['tokens_per_s'])} tokens/s); eager {speedup(eager)}; "
            f"warm-up ({comp['warmup_tokens']} tokens, median) {f(comp['warmup_s'], 1)} s compiled "
            f"({f(comp['warmup_s_first'], 1)} s with an empty compile cache), {f(eager['warmup_s'], 1)} s eager, "
            f"{f(ref['warmup_s'], 1)} s attention_sinks; ppl {f(comp['ppl'], 3)} vs {f(ref['ppl'], 3)}")


def t_dilation():
    data = rows("dilation.csv")
    heads = next(r["dilation"] for r in data if "/" in r["dilation"])
    d4 = {b: _ratio(pick(data, backend=b, dilation=4), "ratio_vs_d1") for b in ("sdpa", "flex")}
    return max(d4.values()) <= 1.5, "; ".join(
        f"{b}: d=4 {d4[b]:.2f}x, per-head {f(pick(data, backend=b, dilation=heads)['ratio_vs_d1'])}x" for b in d4)


def t_train():
    data = rows("train_step.csv")
    v = {(r["mode"], r["metric"]): float(r["value"]) for r in data if r["seq_len"] == "16384"}
    speedup = v[("dense", "step_s")] / v[("window", "step_s")]
    return speedup >= 2, (f"{speedup:.2f}x; peak memory {v[('window', 'peak_mb')]:.0f} vs dense "
                          f"{v[('dense', 'peak_mb')]:.0f} MB (logits and MLP activations dominate the step "
                          f"at this size, not attention)")


def t_finetune():
    data = rows("smollm2_window_finetune.csv")
    get = {c: float(pick(data, source="reloaded", condition=c)["heldout_perplexity"])
           for c in ("window_before", "window_after", "dense_before", "dense_after")}
    return (get["window_after"] < get["window_before"],
            f"{get['window_before']:.2f} → {get['window_after']:.2f} (dense {get['dense_before']:.2f} → "
            f"{get['dense_after']:.2f}), reloaded with `from_pretrained`")


def t_varying():
    data = rows("varying_prompts.csv")
    sdpa, auto = (sum(float(r[c]) for r in data) for c in ("sdpa_s", "auto_s"))
    flex = (f"; flex on request {sum(float(r['flex_s']) for r in data) / sdpa:.3f}x" if "flex_s" in data[0] else "")
    return auto / sdpa <= 1.1, (f"{auto / sdpa:.3f}x ({auto:.1f} vs {sdpa:.1f} s; {data[0]['layers']}-layer "
                                f"SmolLM2 shape, W={data[0]['window']}){flex}")


def t_compiled():
    data = rows("compiled_decode.csv")
    default, comp, static = (pick(data, method=m, position=1024, compiled=c) for m, c in
                             (("swa_patch_default", False), ("swa_patch", True), ("swa_patch", False)))
    far = pick(data, method="swa_patch", position=32768, compiled=True)
    return (_ratio(comp, "vs_default_eager") >= 1.3,
            f"{f(comp['vs_default_eager'])}x the default eager step at a 1k stream ({f(comp['ms_per_token'], 1)} vs "
            f"{f(default['ms_per_token'], 1)} ms), {f(far['vs_default_eager'])}x at 32k; compile + 3 warm-up steps "
            f"{f(comp['warmup_s'], 1)} s; the static cache's own eager step {f(static['ms_per_token'], 1)} ms")


def t_position():
    data = rows("compiled_decode.csv")
    far, eager = (pick(data, method="swa_patch", position=32768, compiled=c) for c in (True, False))
    floor, floor_eager = (pick(data, method="unpatched", position=1024, compiled=c) for c in (True, False))
    ratio = float(far["ms_per_token"]) / float(floor["ms_per_token"])
    return ratio <= 1.05, (f"{ratio:.2f}x compiled ({f(far['ms_per_token'], 1)} vs {f(floor['ms_per_token'], 1)} ms, "
                           f"timed in interleaved rounds); eager {f(eager['ms_per_token'], 1)} vs "
                           f"{f(floor_eager['ms_per_token'], 1)} ms")


def _study(config, adapter=""):
    return pick(rows("long_range_study.csv"), config=config, adapter=adapter)


def t_long_range():
    met, text = long_range_target("long_range_study.csv")
    if not any(c.endswith("_lo") for c in rows("long_range_study.csv")[0]):
        text += " (a CSV without intervals: passkey judged within one hit of dense)"
    return bool(met), text


def t_distill():
    ce, kd = _study("sinks", "ce"), _study("sinks", "distill")
    ce_ppl, kd_ppl = float(ce["heldout_ppl"]), float(kd["heldout_ppl"])
    return kd_ppl < ce_ppl, (f"windowed ppl {kd_ppl:.3f} (distill) vs {ce_ppl:.3f} (CE); copy recall at W/2 "
                             f"{_fixed(kd['recall_W/2'], 3)} vs {_fixed(ce['recall_W/2'], 3)}, at 2W "
                             f"{_fixed(kd['recall_2W'], 3)} vs {_fixed(ce['recall_2W'], 3)}")


# ---- Gemma-3-270M, the second real model ----------------------------------------------------
GEMMA3_STREAM, GEMMA3_PREFILL = "stream_gemma3_40k.csv", "gemma3_prefill.csv"
GEMMA3_W1020 = "stream_gemma3_16k_w1020.csv"      # the same first 16k, every layer W=1020 + 4 sinks


def segment_ppl(data, mode, start, end):
    """Perplexity of the tokens scored between two checkpoints of a stream, from its cumulative
    rows (a row at ``tokens`` averages ``min(tokens, last - 1)`` predictions)."""
    mine = [r for r in data if r["mode"] == mode]
    last = max(int(r["tokens"]) for r in mine)
    nll = {int(r["tokens"]): math.log(float(r["ppl"])) * min(int(r["tokens"]), last - 1) for r in mine}
    scored = min(end, last - 1) - min(start, last - 1)
    return math.exp((nll[end] - nll[start]) / scored)


def gemma3_stream():
    """Every layer windowed + sinks vs the model as loaded, streamed past its 32k context."""
    data, wider = rows(GEMMA3_STREAM), rows(GEMMA3_W1020)
    if not data:
        return source(GEMMA3_STREAM)
    body = []
    for mode, mine in [*((m, [r for r in data if r["mode"] == m]) for m in dict.fromkeys(r["mode"] for r in data)),
                       *((f"{m} (W=1020)", [r for r in wider if r["mode"] == m]) for m in dict.fromkeys(
                           r["mode"] for r in wider))]:
        at16 = next((r for r in mine if r["tokens"] == "16384"), None)
        end = int(mine[-1]["tokens"])
        past = f(segment_ppl(mine, mine[0]["mode"], 32768, end), 3) if end > 32768 else "–"
        body.append([mode, num(end), f(at16["ppl"], 3) if at16 else "–", f(mine[-1]["ppl"], 3), past,
                     f(int(at16["kv_bytes"]) / 2**20, 1) if at16 else "–", f(int(mine[-1]["kv_bytes"]) / 2**20, 1),
                     f(mine[-1]["tokens_per_s"], 0)])
    text = table(["mode", "tokens streamed", "ppl, first 16k", "ppl, all", "ppl past 32k", "KV MiB at 16k",
                  "KV MiB at the end", "tokens/s (chunk 512)"], body)
    wider_source = f"\n\nThe W=1020 row: {source(GEMMA3_W1020)}" if wider else ""
    return with_source(GEMMA3_STREAM, "`dense` is Gemma-3-270M as it loads (its own 512-token windows on 15 layers, "
                       "3 global layers); `window` and `sinks` window every layer (`--all-layers`), the "
                       "global ones too, with W=512 (4 sinks + 512 recent tokens; `window`: the last 516):\n\n"
                       + text + wider_source)


def gemma3():
    return "\n\n".join([gemma3_stream(), csv_table(GEMMA3_PREFILL, [
        "config", "tokens", "warmup_s", "median_s", "min_s", "max_s", "speedup_vs_unpatched", "paired_min",
        "paired_max", "kv_mib"])(), demo("streaming_demo_gemma3.csv")])


def t_gemma3_stream():
    data = rows(GEMMA3_STREAM)
    sinks, loaded = pick(data, mode="sinks", tokens=16384), pick(data, mode="dense", tokens=16384)
    streamed = [r for r in data if r["mode"] == "sinks"]
    end, gap = int(streamed[-1]["tokens"]), float(sinks["ppl"]) / float(loaded["ppl"])
    flat = len({r["kv_bytes"] for r in streamed if int(r["tokens"]) >= 2048}) == 1
    return (gap <= 1.10 and flat and end >= 40960,
            f"ppl over the first 16k {f(sinks['ppl'], 3)} vs the model as loaded {f(loaded['ppl'], 3)} "
            f"({(gap - 1) * 100:+.1f} %); streamed to {end:,}: ppl of tokens 32,768–{end:,} "
            f"{f(segment_ppl(data, 'sinks', 32768, end), 2)}, KV {'flat at ' if flat else 'NOT flat, '}"
            f"{int(streamed[-1]['kv_bytes']) / 2**20:.1f} MiB (as loaded: {int(loaded['kv_bytes']) / 2**20:.1f} MiB at 16k)"
            + _gemma3_wider(float(loaded["ppl"])))


def _gemma3_wider(loaded_ppl):
    """The same 16k with W=1020 on every layer, where that run exists."""
    wider = [r for r in rows(GEMMA3_W1020) if r["mode"] == "sinks" and r["tokens"] == "16384"]
    if not wider:
        return ""
    ppl = float(wider[0]["ppl"])
    return (f"; a wider W=1020 on every layer is worse, {ppl:.1f} ({(ppl / loaded_ppl - 1) * 100:+.0f} %, "
            f"`{GEMMA3_W1020}`): its local layers were trained to see 512 keys")


def t_gemma3_prefill():
    data = rows(GEMMA3_PREFILL)
    every, own, dec = (pick(data, config=c) for c in ("every layer + sinks", "own pattern",
                                                     "every layer + sinks + decode global"))
    return (float(every["speedup_vs_unpatched"]) >= 1.5,
            f"every layer + 4 sinks {f(every['speedup_vs_unpatched'])}x (per round {f(every['paired_min'])}–"
            f"{f(every['paired_max'])}x, median of {every['rounds']}); + decode=\"full\" on its 3 global layers "
            f"{f(dec['speedup_vs_unpatched'])}x; its own pattern {f(own['speedup_vs_unpatched'])}x")


LONG_RANGE_TARGET = ("long range (SmolLM2, W=256): prefill ≥ 1.5x dense at 16k, copy recall ≥ 0.9 at 8W, passkey "
                     "within dense's 95 % interval")
TARGETS = [   # (the target as the issues state it, its check and figures, the CSV they come from)
    ("attention forward, n=16k, W=512: ≥ 12x dense causal SDPA", t_attention_fwd, "prefill_scaling.csv"),
    ("attention forward+backward, n=16k: ≥ 5x", t_attention_bwd, "prefill_scaling.csv"),
    ("peak memory linear in n", t_memory, "prefill_scaling.csv"),
    ("model prefill 16k, W=1024: ≥ 2x unpatched, faster than transformers' window", t_model_prefill,
     "prefill_scaling.csv"),
    ("short inputs (n ≤ W) within 5 % of unpatched", t_short, "prefill_scaling.csv"),
    ("SmolLM2 streamed to 40,960 tokens (5x its 8k context), 4 + 1020 cache (no threshold)", t_stream,
     "stream_smollm2_40k.csv"),
    ("chunked streaming evaluation ≥ 10x token-by-token, same ppl", t_chunked, "stream_chunked_vs_tbt.csv"),
    ("decode time at 32k within 1.1x of 2k", t_decode_32k, "cache_decode.csv"),
    ("decode step ≤ 1.05x the unpatched model's own step (SmolLM2-135M, 4 + 1020 rolling cache, shift, 1 thread, "
     "≥ 10 paired rounds)", t_decode_step, "decode_step.csv"),
    ("decode step with full single KV heads within 1.1x of as many full heads as whole layers (SmolLM2-135M, W=256 "
     "+ 4 sinks, 9 of 90 KV heads full, 1 thread, paired rounds)", t_kv_head_decode, "kv_head_decode.csv"),
    ("resident memory flat streaming 10k → 100k tokens (growth < 3 % of what a dense cache adds)", t_rss,
     "cache_decode.csv"),
    ("≥ 1.5x tokens/s of attention_sinks 0.4 (token by token, SmolLM2-135M, 1 thread)", t_attention_sinks,
     "attention_sinks_compare.csv"),
    ("dilated prefill d=4 within 1.5x of d=1 (n=16k, W=512)", t_dilation, "dilation.csv"),
    ("LoRA step at 16k, W=1024: ≥ 2x dense", t_train, "train_step.csv"),
    ("windowed SmolLM2 perplexity lower after fine-tuning", t_finetune, "smollm2_window_finetune.csv"),
    ("12 prompts of 12 lengths (2k–16k) through `auto`: total ≤ 1.1x the sdpa band, compiles included", t_varying,
     "varying_prompts.csv"),
    ("compiled decode step ≥ 1.3x the default eager step (SmolLM2-135M, 1 thread, 4 + 1020 cache)", t_compiled,
     "compiled_decode.csv"),
    ("decode step at stream position 32k ≤ 1.05x the unpatched model's at a 1k cache", t_position,
     "compiled_decode.csv"),
    (LONG_RANGE_TARGET, t_long_range, "long_range_study.csv"),
    ("self-distillation beats CE fine-tuning (same steps and data)", t_distill, "long_range_study.csv"),
    ("Gemma-3-270M, every layer W=512 + 4 sinks: ppl over 16k within 10 % of the model as loaded, streamed "
     "to 40,960 tokens (1.25x its 32k context) with a flat KV cache", t_gemma3_stream, "stream_gemma3_40k.csv"),
    ("Gemma-3-270M prefill 16k ≥ 1.5x the model as loaded", t_gemma3_prefill, "gemma3_prefill.csv"),
    ("calibrated KV heads, training-free (SmolLM2, W=256): KV ≤ 25 % of dense at 16k, prefill ≥ 1.5x dense, copy "
     "recall ≥ 0.9 at 8W, RULER 4k within dense's 95 % interval (≥ 30 samples)", t_frontier, "frontier_smollm2.csv"),
    ("Gemma-3-270M, every layer W=512 + calibrated full heads: ppl over 16k within 10 % of the model as loaded at "
     "≤ 50 % of its KV", t_gemma3_calibrated, "gemma3_calibrated.csv"),
    ("a calibrated row at ≤ 25 % of dense KV after long-range LoRA (SmolLM2, W=256): recall 8W within dense's "
     "interval, RULER 4k within dense's, ppl no worse than before", t_adaptation, "adaptation_smollm2.csv"),
]
HEADLINE = [   # the README's five rows
    "model prefill 16k, W=1024: ≥ 2x unpatched, faster than transformers' window",
    "attention forward+backward, n=16k: ≥ 5x",
    "SmolLM2 streamed to 40,960 tokens (5x its 8k context), 4 + 1020 cache (no threshold)",
    "decode time at 32k within 1.1x of 2k",
    LONG_RANGE_TARGET,
]


GEMMA3_HEADLINE = [t[0] for t in TARGETS if t[0].startswith("Gemma-3")]


def measured_at(name):
    """``name @commit``, and **stale** when the code it measures changed since (**unverified**: ``+dirty``)."""
    data = rows(name)
    if not data or not data[0].get("commit"):
        return f"`{name}`"
    commit = data[0]["commit"]
    if dirty(commit):
        return f"`{name}` @{commit}, **unverified**"
    return f"`{name}` @{commit}" + ("" if changed_since(name, commit) == [] else ", **stale**")


def targets(names=None):
    """One row per target (``names``: these only, in this order): met (from the target's
    threshold), the figures behind it, and the CSV they come from."""
    chosen = TARGETS if names is None else [next(t for t in TARGETS if t[0] == name) for name in names]
    body = []
    for target, measured, name in chosen:
        try:
            met, text = measured()
        except (LookupError, StopIteration, IndexError, KeyError) as e:
            met, text = None, f"not measured ({type(e).__name__}: {e})"
        body.append([target, {True: "yes", False: "**no**", None: "–"}[met], text, measured_at(name)])
    return table(["target", "met", "measured", "from"], body)


def attention_sinks():
    """Medians of paired rounds with their spread, warm-up seconds beside them."""
    name = "attention_sinks_compare.csv"
    data = rows(name)
    if not data:
        return source(name)
    if "speedup_min" not in data[0]:     # written before rounds were paired
        return with_source(name, "*An older run: best of rounds per side, unpaired; warm-up excluded and not "
                           "recorded. Rerun `benchmarks/attention_sinks_compare.py` for medians of paired rounds.*"
                           "\n\n" + simple(name, ["method", "tokens", "ppl", "tokens_per_s",
                                                   "speedup_vs_attention_sinks"]))
    body = [[r["method"], r["tokens"], f(r["ppl"], 4),
             _spread(r, "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", unit=""),
             _spread(r, "speedup_vs_attention_sinks", "speedup_min", "speedup_max", 3),
             _spread(r, "warmup_s", "warmup_s_min", "warmup_s_max", 1, unit=""), f(r["warmup_s_first"], 1),
             f(r["load_s"], 1)] for r in data]
    r = data[0]
    return with_source(name, f"Median (min–max) of {r['rounds']} paired rounds: in each round every side runs "
                       f"once, in a fresh process, in an order rotated each round; speed-up is each round's tokens/s "
                       f"over that round's attention_sinks. Every side first streams its first {r['warmup_tokens']} "
                       f"tokens through a cache of its own, untimed (warm-up, the compile included; \"first\": "
                       f"the first round's, with an empty compile cache); the timed stream then starts from a fresh "
                       f"cache. Model load is neither.\n\n"
                       + table(["method", "tokens", "ppl", "tokens/s", "paired speed-up", "warm-up s",
                                "first warm-up s", "load s"], body))


def vllm_roundtrip():
    """Each export served by vLLM itself: max |Δ log p| of its prompt tokens against the patched
    model, and against the same model with W-1, W+1 and no window (a tolerance must reject those)."""
    name = "vllm_roundtrip.csv"
    value = lambda x: num(x) if x else "–"                                   # noqa: E731
    body = [[r["kind"], r["family"], r["window"], r["export"], r["tokens"], value(r["vs patched"]),
             " / ".join(value(r[c]) for c in ("vs W-1", "vs W+1", "vs dense")),
             value(r["vs W, no sinks"] or r["vs W, no dilation"]) ] for r in rows(name)]
    return with_source(name, table(["kind", "model", "window", "export", "tokens", "vs patched",
                                    "vs W−1 / W+1 / dense", "vs the window without sinks / dilation"], body))


def demo(name="streaming_demo.csv"):
    """The quick start's last checkpoint, from the demo run recorded with ``--csv``."""
    data = rows(name)
    if not data:
        return source(name)
    last = max(int(r["tokens"]) for r in data)
    body = [[r["mode"], num(r["tokens"]), f(r["ppl"], 3), f(int(r["kv_bytes"]) / 2**20, 1)]
            for r in data if int(r["tokens"]) == last]
    return with_source(name, table(["method", "tokens", "ppl", "KV MiB"], body))


SECTIONS = {
    "headline": lambda: targets(HEADLINE), "demo": demo, "vllm_roundtrip": vllm_roundtrip,
    "targets": targets, "prefill": prefill, "decode": decode, "varying_prompts": varying_prompts,
    "compiled_decode": compiled_decode, "stream": stream,
    "attention_sinks": attention_sinks,
    "speculative": csv_table("speculative.csv", ["method", "drafted_per_step", "prompt_tokens", "new_tokens",
                                                 "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "vs_greedy",
                                                 "same_tokens"]),
    "stream_chunked": csv_table("stream_chunked_vs_tbt.csv", ["chunk", "tokens", "ppl", "seconds", "tokens_per_s",
                                                               "speedup_vs_token_by_token", "ppl_rel_diff"]),
    "dilation": csv_table("dilation.csv", ["backend", "dilation", "n", "window", "median_s", "ratio_vs_d1",
                                           "flex_blocks"]),
    "receptive": csv_table("receptive.csv", ["check", "layers", "window", "schedule", "reach", "gradient_reach",
                                             "reachable", "gradient_matches_set"]),
    "gpu": gpu, "train": train,
    "finetune": csv_table("smollm2_window_finetune.csv", ["source", "condition", "heldout_perplexity", "window",
                                                          "sinks", "seq_len", "steps"]),
    "decode_step": csv_table("decode_step.csv", ["round", "first", "stream_from", "patched_ms", "unpatched_ms",
                                                  "ratio", "ratio_min", "ratio_max"]),
    "kv_head_decode": csv_table("kv_head_decode.csv", ["round", "first", "stream_from", "per_head_ms",
                                                       "whole_layers_ms", "ratio", "ratio_min", "ratio_max"]),
    "packed_documents": csv_table("packed_documents.csv", ["method", "docs", "tokens", "min_len", "max_len", "seconds",
                                                           "min_s", "max_s", "vs_unpatched", "vs_unpatched_min",
                                                           "vs_unpatched_max", "warmup_s", "max_abs_logit_diff"]),
    "long_range": long_range, "long_range_gemma3": lambda: long_range("long_range_study_gemma3.csv"),
    "frontier_smollm2": lambda: long_range("frontier_smollm2.csv", lambda d, t: "\n\n".join(
        frontier_target(d, t, share) for share in (0.25, 0.10))), "adaptation": adaptation,
    "frontier_gemma3": lambda: long_range("frontier_gemma3.csv", lambda d, t: (
        "Gemma's target (perplexity over 16k within 10 % of the model as loaded at ≤ 50 % of its KV) is judged by "
        "`gemma3_calibrated.csv` above; this table's perplexity is over 1k blocks.")),
    "gemma3_calibrated": csv_table("gemma3_calibrated.csv", ["row", "full_layers", "wide", "ppl", "ppl_vs_loaded",
                                                             "kv_mib", "kv_vs_loaded", "meets_target", "calibrate_s",
                                                             "stream_s"]),
    "serving": serving, "gemma3": gemma3, "gemma3_headline": lambda: targets(GEMMA3_HEADLINE),
}
BLOCK = re.compile(r"(<!-- report:(\w+) -->\n)(.*?)(<!-- /report:\2 -->)", re.S)


def render(readme: str) -> str:
    """``readme`` with every report block's body regenerated."""
    def fill(m):
        if m.group(2) not in SECTIONS:
            raise KeyError(f"README block report:{m.group(2)} names no section (known: {', '.join(SECTIONS)})")
        return f"{m.group(1)}{SECTIONS[m.group(2)]()}\n{m.group(4)}"
    return BLOCK.sub(fill, readme)


def stale(readme: str) -> list[str]:
    """Names of the README blocks whose text differs from what the CSVs give now."""
    fresh = {m.group(2): m.group(3) for m in BLOCK.finditer(render(readme))}
    return [m.group(2) for m in BLOCK.finditer(readme) if m.group(3) != fresh[m.group(2)]]


PAGES = ("README.md", "docs/results.md", "docs/serving.md", "docs/long-range.md", "docs/how-it-works.md")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", nargs="*", metavar="PAGE", help="rewrite the report blocks of these pages (default: all)")
    g.add_argument("--check", nargs="*", metavar="PAGE", help="exit 1 if a report block differs from the CSVs")
    args = p.parse_args()
    pages = [os.path.join(ROOT, page) for page in (args.write or args.check or PAGES)]
    if args.write is not None:
        for page in pages:
            with open(page) as fh:
                text = fh.read()
            fresh = render(text)                 # before opening for writing: a failure leaves the page
            with open(page, "w") as fh:
                fh.write(fresh)
            print(f"rewrote {len(BLOCK.findall(text))} blocks of {os.path.relpath(page, ROOT)}")
    elif args.check is not None:
        bad = {}
        for page in pages:
            with open(page) as fh:
                bad.update({f"{os.path.relpath(page, ROOT)}:{name}": True for name in stale(fh.read())})
        if bad:
            sys.exit(f"blocks differ from benchmarks/results: {', '.join(bad)} (python benchmarks/report.py --write)")
        print(f"{len(pages)} pages: every report block matches its CSVs")
    else:
        for name, fn in SECTIONS.items():
            print(f"### {name}\n\n{fn()}\n")


if __name__ == "__main__":
    main()
