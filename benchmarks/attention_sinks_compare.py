"""Token-by-token streaming, swa_patch vs the attention_sinks 0.4 package, side by side.

Same model (SmolLM2-135M, exported as a plain checkpoint), same token ids, same cache (4 sinks +
1020 recent, shift positions), same threads.  Three sides: ``attention_sinks`` (what a user would
otherwise run: the package with transformers 4.34, eager); ``swa_patch`` (eager, the default
dynamic rolling cache of ``make_cache(model)``); ``swa_patch_compiled`` (``make_cache(model,
static=True)`` and one ``torch.compile(fullgraph=True)`` decode step).  attention_sinks pins
transformers 4.34, so it runs from its own virtualenv (see TRAPS.md):

    python -m venv /tmp/asvenv --system-site-packages
    /tmp/asvenv/bin/pip install attention-sinks==0.4.0 transformers==4.34.0 tokenizers==0.14.1 einops
    python benchmarks/attention_sinks_compare.py --venv /tmp/asvenv --tokens 1280

Each run of a side is a fresh process (the attention_sinks side through the venv's python and
benchmarks/attention_sinks_side.py, ours through this script's ``--side``), and every side does
the same three things:

* load the model (``load_s``; recorded, neither warm-up nor timed);
* warm up: the first ``--warmup`` ids token by token through a cache of its own kind, then
  dropped (``warmup_s``; for the compiled side this includes the compile, a cost a user pays once
  per process); untimed in tokens/s;
* timed: all ``--tokens`` ids from the first, token by token through a fresh cache; only the
  model call is timed (the loss is computed outside the timer); tokens/s = (tokens - 1) / time.

Rounds are paired: in each of ``--rounds`` rounds the three sides run one after another, in an
order rotated by one each round (so each side runs first, second and third in turn), and each
round gives each side's speed-up over the attention_sinks run of *that* round.  Reported per
side: the median tokens/s over rounds with min and max, the median, min and max of the paired
speed-ups, the median (min, max) warm-up seconds, the median load seconds, and the perplexity.
torch.compile keeps compiled code in an on-disk cache that later processes reuse (here a compile
took minutes with it empty and ~30 s with it full), so each invocation gets a fresh, empty one of
its own (``TORCHINDUCTOR_CACHE_DIR``, removed at the end; ``--compile-cache`` to keep one):
``warmup_s_first`` is the first round's warm-up, i.e. the compiled side's compile from scratch,
and the other rounds show the warm-up of a process that finds the cache filled.
The same tokens through the same cache must give the same perplexity: every run's ppl is checked
against the attention_sinks one (``--ppl-rtol``, relative) and the script exits non-zero, writing
no CSV, when one differs by more.  The compiled side also records how many graphs dynamo compiled
during the timed loops (``timed_recompiles``; 0 when the warm-up covered every compile).

All sides get the same ``--threads`` (and OMP/MKL_NUM_THREADS).  The defaults with ``--tokens
1280`` (run_all's) take ~40 min on 2 cores: ~0.3 s per token for the three sides together, 5
rounds, plus one compile from scratch (~6 min on this loaded machine) and ~30 s per later one.

Writes ``--out`` (default benchmarks/results/attention_sinks_compare.csv; one row per side) and
the plot beside it (.png: median tokens/s, bars for min-max).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import RESULTS, print_table, write_csv  # noqa: E402

SIDES = ("attention_sinks", "swa_patch", "swa_patch_compiled")


def ours(export: str, tokens: int, sinks: int, window: int, threads: int, warmup: int,
         compiled: bool = False) -> dict:
    """One run of a swa_patch side (see the module docstring): load, warm up, timed stream."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from swa_patch import make_cache, patch_model
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(f"{export}/model", dtype=torch.float32).eval()
    patch_model(model, window=window, sinks=sinks)
    load_s = time.perf_counter() - start
    ids = torch.load(f"{export}/ids.pt")[:tokens]
    step = lambda t, c: model(t, cache=c).logits      # noqa: E731
    if compiled:
        step = torch.compile(step, fullgraph=True)
    graphs = lambda: counters["stats"]["unique_graphs"]   # noqa: E731
    with torch.no_grad():
        start, cache, before = time.perf_counter(), make_cache(model, static=compiled), graphs()
        for t in range(min(warmup, ids.numel())):
            step(ids[None, t:t + 1], cache)
        warmup_s, warmup_graphs = time.perf_counter() - start, graphs() - before
        before = graphs()
        cache, nll, seconds = make_cache(model, static=compiled), 0.0, 0.0
        for t in range(ids.numel() - 1):
            t0 = time.perf_counter()
            logits = step(ids[None, t:t + 1], cache)
            seconds += time.perf_counter() - t0
            nll += torch.nn.functional.cross_entropy(logits[0, -1:].float(), ids[t + 1:t + 2]).item()
    n = ids.numel() - 1
    return {"ppl": math.exp(nll / n), "tokens_per_s": n / seconds, "seconds": seconds, "warmup_s": warmup_s,
            "load_s": load_s, "warmup_graphs": warmup_graphs, "timed_recompiles": graphs() - before}


def run_side(name: str, args, compile_cache: str) -> dict:
    """One run of side ``name`` in a fresh process; its result (the child's last line, JSON)."""
    common = [args.export, "--sinks", str(args.sinks), "--window", str(args.window), "--tokens", str(args.tokens),
              "--threads", str(args.threads), "--warmup", str(args.warmup)]
    if name == "attention_sinks":
        cmd = [f"{args.venv}/bin/python", os.path.join(HERE, "attention_sinks_side.py"), *common]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--side", name, "--export", *common]
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "TORCHINDUCTOR_CACHE_DIR": compile_cache}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", help="virtualenv with attention-sinks 0.4.0 (required unless --side)")
    p.add_argument("--export", default="/tmp/attention_sinks_export")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=8, help="untimed first tokens each side streams before its "
                                                         "timed run (the compile happens here)")
    p.add_argument("--ppl-rtol", type=float, default=1e-4, help="largest relative ppl difference accepted "
                                                                "between any run and attention_sinks")
    p.add_argument("--out", default=os.path.join(RESULTS, "attention_sinks_compare.csv"),
                   help="the CSV (the plot goes beside it, .png)")
    p.add_argument("--compile-cache", help="torch.compile's on-disk cache for the sides (default: a fresh "
                                           "temporary one, removed at the end)")
    p.add_argument("--side", choices=SIDES[1:], help=argparse.SUPPRESS)    # internal: one run of our side
    args = p.parse_args()
    if args.side:
        print(json.dumps(ours(args.export, args.tokens, args.sinks, args.window, args.threads, args.warmup,
                              compiled=args.side == "swa_patch_compiled")))
        return
    if not args.venv:
        p.error("--venv is required (a virtualenv with attention-sinks 0.4.0)")
    for name in ("tokens", "rounds", "threads"):
        if getattr(args, name) < (2 if name == "tokens" else 1):
            p.error(f"--{name} is too small")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    import torch
    torch.set_num_threads(args.threads)           # what the provenance columns record
    if not os.path.exists(f"{args.export}/ids.pt"):
        subprocess.run([sys.executable, f"{HERE}/attention_sinks_export.py", args.export,
                        "--tokens", str(max(args.tokens, 2048))], check=True)
    if torch.load(f"{args.export}/ids.pt").numel() < args.tokens:
        sys.exit(f"{args.export}/ids.pt holds fewer than --tokens {args.tokens} ids: export again")
    runs = {name: [] for name in SIDES}
    compile_cache = args.compile_cache or tempfile.mkdtemp(prefix="as_inductor_")
    try:
        for r in range(args.rounds):
            paired_round(r, args, runs, compile_cache)
    finally:
        if not args.compile_cache:
            shutil.rmtree(compile_cache, ignore_errors=True)
    report(args, runs)


def paired_round(r: int, args, runs: dict, compile_cache: str) -> None:
    """Round ``r``: each side once, in the order rotated by ``r``."""
    order = SIDES[r % len(SIDES):] + SIDES[:r % len(SIDES)]
    for name in order:
        runs[name].append(run_side(name, args, compile_cache))
        x = runs[name][-1]
        print(f"round {r + 1}/{args.rounds} {name}: {x['tokens_per_s']:.2f} tokens/s, ppl {x['ppl']:.6f}, "
              f"warm-up {x['warmup_s']:.2f} s, load {x['load_s']:.2f} s", flush=True)
    print(f"round {r + 1}/{args.rounds} paired speed-up vs attention_sinks: " + ", ".join(
        f"{m} {runs[m][-1]['tokens_per_s'] / runs['attention_sinks'][-1]['tokens_per_s']:.3f}x"
        for m in SIDES[1:]), flush=True)


def report(args, runs: dict) -> None:
    """The rows (one per side), the ppl check, the CSV and the plot."""
    ref = runs["attention_sinks"][0]["ppl"]
    rows = []
    for name in SIDES:
        tps = spread([x["tokens_per_s"] for x in runs[name]])
        paired = spread([x["tokens_per_s"] / a["tokens_per_s"] for x, a in zip(runs[name], runs["attention_sinks"])])
        warm = spread([x["warmup_s"] for x in runs[name]])
        rows.append({"method": name, "tokens": args.tokens, "sinks": args.sinks, "window": args.window,
                     "rounds": args.rounds, "warmup_tokens": min(args.warmup, args.tokens),
                     "tokens_per_s": round(tps[0], 3), "tokens_per_s_min": round(tps[1], 3),
                     "tokens_per_s_max": round(tps[2], 3),
                     "speedup_vs_attention_sinks": round(paired[0], 4), "speedup_min": round(paired[1], 4),
                     "speedup_max": round(paired[2], 4),
                     "warmup_s": round(warm[0], 2), "warmup_s_min": round(warm[1], 2),
                     "warmup_s_max": round(warm[2], 2),
                     "warmup_s_first": round(runs[name][0]["warmup_s"], 2),
                     "load_s": round(statistics.median(x["load_s"] for x in runs[name]), 2),
                     "ppl": runs[name][0]["ppl"],
                     "ppl_rel_diff_vs_attention_sinks": max(abs(x["ppl"] - ref) / ref for x in runs[name]),
                     "warmup_graphs": runs[name][0].get("warmup_graphs", ""),
                     "timed_recompiles": sum(x.get("timed_recompiles", 0) for x in runs[name]),
                     "side_versions": runs[name][0].get("versions", "")})
    print_table(rows, [c for c in rows[0] if c not in ("sinks", "window", "side_versions")])
    worst = max(rows, key=lambda r: r["ppl_rel_diff_vs_attention_sinks"])
    if worst["ppl_rel_diff_vs_attention_sinks"] > args.ppl_rtol:
        sys.exit(f"FAILED: {worst['method']}'s perplexity differs from attention_sinks' by "
                 f"{worst['ppl_rel_diff_vs_attention_sinks']:.2e} (relative) > --ppl-rtol {args.ppl_rtol:g}: the "
                 f"sides did not stream the same tokens through the same cache; no CSV written")
    if any(r["timed_recompiles"] for r in rows):
        print("warning: dynamo compiled graphs inside a timed loop (timed_recompiles > 0): raise --warmup",
              flush=True)
    write_csv(args.out, rows)
    print(f"wrote {args.out}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    med = [r["tokens_per_s"] for r in rows]
    err = [[m - r["tokens_per_s_min"] for m, r in zip(med, rows)],
           [r["tokens_per_s_max"] - m for m, r in zip(med, rows)]]
    bars = ax.bar([r["method"] for r in rows], med, yerr=err, capsize=6, color=["gray", "tab:blue", "tab:green"])
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['speedup_vs_attention_sinks']:.2f}x\n({r['speedup_min']:.2f}–{r['speedup_max']:.2f})",
                    (bar.get_x() + bar.get_width() / 2, r["tokens_per_s_max"]), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_ylim(0, max(r["tokens_per_s_max"] for r in rows) * 1.25)
    ax.set(ylabel="tokens / s (token by token)",
           title=f"SmolLM2-135M, cache {args.sinks}+{args.window}, {args.tokens} tokens\n"
                 f"median of {args.rounds} paired rounds, bars min–max; label: paired speed-up")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=110)


if __name__ == "__main__":
    main()
