"""Token-by-token streaming, swa_patch vs the attention_sinks 0.4 package, side by side.

Same model (SmolLM2-135M, exported as a plain checkpoint), same token ids, same cache
(4 sinks + 1020 recent, shift positions), same threads; the sides (attention_sinks, swa_patch
eager, swa_patch with the static cache and a compiled decode step, compiled before the timed
loop) alternate ``--rounds`` times and the best tokens/s of each is kept.  attention_sinks pins transformers 4.34, so it runs from its own
virtualenv (see TRAPS.md):

    python -m venv /tmp/asvenv --system-site-packages
    /tmp/asvenv/bin/pip install attention-sinks==0.4.0 transformers==4.34.0 tokenizers==0.14.1 einops
    python benchmarks/attention_sinks_compare.py --venv /tmp/asvenv --tokens 512

Writes results/attention_sinks_compare.csv and .png.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, print_table, write_csv  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def ours(export: str, tokens: int, sinks: int, window: int, threads: int, compiled: bool = False) -> dict:
    """Token by token through make_cache(model); ``compiled``: the static cache and one
    torch.compile(fullgraph=True) decode step, compiled before the timed loop (on another cache)."""
    from transformers import AutoModelForCausalLM
    from swa_patch import make_cache, patch_model
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(f"{export}/model", dtype=torch.float32).eval()
    patch_model(model, window=window, sinks=sinks)
    ids = torch.load(f"{export}/ids.pt")[:tokens]
    step = lambda t, c: model(t, cache=c).logits
    if compiled:
        step = torch.compile(step, fullgraph=True)
        warm = make_cache(model, static=True)
        with torch.no_grad():
            for t in range(8):
                step(ids[None, t:t + 1], warm)
    cache, nll, seconds = make_cache(model, static=compiled), 0.0, 0.0
    with torch.no_grad():
        for t in range(ids.numel() - 1):
            t0 = time.perf_counter()
            logits = step(ids[None, t:t + 1], cache)
            seconds += time.perf_counter() - t0
            nll += torch.nn.functional.cross_entropy(logits[0, -1:].float(), ids[t + 1:t + 2]).item()
    n = ids.numel() - 1
    return {"ppl": math.exp(nll / n), "tokens_per_s": n / seconds}


def theirs(venv: str, export: str, tokens: int, sinks: int, window: int, threads: int) -> dict:
    out = subprocess.run([f"{venv}/bin/python", f"{HERE}/attention_sinks_side.py", export, "--sinks", str(sinks),
                          "--window", str(window), "--tokens", str(tokens), "--threads", str(threads)],
                         capture_output=True, text=True, check=True).stdout
    ppl, tps = re.search(r"ppl=([\d.]+) .*tokens_per_s=([\d.]+)", out).groups()
    return {"ppl": float(ppl), "tokens_per_s": float(tps)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", required=True, help="virtualenv with attention-sinks 0.4.0")
    p.add_argument("--export", default="/tmp/attention_sinks_export")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if not os.path.exists(f"{args.export}/ids.pt"):
        subprocess.run([sys.executable, f"{HERE}/attention_sinks_export.py", args.export,
                        "--tokens", str(max(args.tokens, 2048))], check=True)
    best = {}
    for _ in range(args.rounds):
        for name, fn in (("attention_sinks", lambda: theirs(args.venv, args.export, args.tokens, args.sinks,
                                                              args.window, args.threads)),
                         ("swa_patch", lambda: ours(args.export, args.tokens, args.sinks, args.window, args.threads)),
                         ("swa_patch_compiled", lambda: ours(args.export, args.tokens, args.sinks, args.window,
                                                             args.threads, compiled=True))):
            r = fn()
            print(name, r, flush=True)
            if name not in best or r["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = r
    rows = [{"method": m, "tokens": args.tokens, "sinks": args.sinks, "window": args.window, **r,
             "speedup_vs_attention_sinks": r["tokens_per_s"] / best["attention_sinks"]["tokens_per_s"]}
            for m, r in best.items()]
    write_csv(os.path.join(RESULTS, "attention_sinks_compare.csv"), rows)
    print_table(rows, list(rows[0]))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([r["method"] for r in rows], [r["tokens_per_s"] for r in rows], color=["gray", "tab:blue", "tab:green"])
    ax.set(ylabel="tokens / s (token by token)", title=f"SmolLM2-135M, cache {args.sinks}+{args.window}")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "attention_sinks_compare.png"), dpi=110)


if __name__ == "__main__":
    main()
