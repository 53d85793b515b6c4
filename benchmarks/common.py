"""Shared benchmark plumbing: paired timing rounds, peak memory in a fresh process, CSV and tables."""
from __future__ import annotations

import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def paired_rounds(fns: dict, rounds: int, baseline: str, prepare=None) -> dict:
    """Time each callable of ``fns`` (name: no-argument callable) against ``fns[baseline]`` in
    ``rounds`` paired rounds, every one warmed up alike first.

    Each callable first runs once as a warm-up (its seconds are returned as ``warmup_s``, not
    counted in the median: they include any compile), then once per round; every other round runs in
    reverse order so that no callable always follows the same one.  ``prepare(name)``, when given,
    runs before each call, outside the timed region (e.g. patching the model for that method).
    Returns per name: ``seconds`` (median over rounds), ``min_s``, ``max_s``, ``warmup_s``,
    ``rounds`` and the paired speed-up: the median, min and max over rounds of
    baseline seconds / this callable's seconds in the same round (drift between rounds cancels).
    """
    names = list(fns)
    if baseline not in fns or rounds < 1:
        raise ValueError(f"baseline must be one of {names} and rounds >= 1, got {baseline!r}, {rounds}")

    def once(name):
        if prepare:
            prepare(name)
        start = time.perf_counter()
        fns[name]()
        return time.perf_counter() - start

    warmup = {name: once(name) for name in names}
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(once(name))
    out = {}
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(times[baseline], ts)]
        out[name] = {"seconds": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                     "warmup_s": warmup[name], "rounds": rounds, "speedup": statistics.median(ratios),
                     "speedup_min": min(ratios), "speedup_max": max(ratios)}
    return out


def run_isolated(script: str, args: list[str], env: dict | None = None) -> dict:
    """Run one measurement in a fresh interpreter so its memory is its own (``env``: variables to
    add); returns the JSON the child prints on its last line."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def provenance() -> dict:
    """What produced a figure: the command line (relative to the checkout), the git commit
    (``+dirty`` with uncommitted changes), the date, the machine and the library versions."""
    from swa_patch.provenance import run_info
    return run_info()


def write_csv(path: str, rows: list[dict]) -> None:
    """``rows`` plus, in every row, what produced them (:func:`provenance`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    env = provenance()
    with open(path, "w", newline="") as f:
        columns = list(dict.fromkeys(key for row in rows for key in row))   # every row's, in order
        writer = csv.DictWriter(f, fieldnames=columns + list(env))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **env})


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3f}" if x < 100 else f"{x:.0f}"
    return "" if x is None else str(x)
