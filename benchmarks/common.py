"""Shared benchmark plumbing: timing, peak memory in a fresh process, CSV and plots."""
from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Best of ``reps`` wall-clock seconds after ``warmup`` calls (shared machines are noisy)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


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
