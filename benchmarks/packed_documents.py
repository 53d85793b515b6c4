"""A padding-free row of many documents: what the patched model's per-document attention costs against
the unpatched model, which keeps the same documents apart with its own packed-sequence mask.

    PYTHONPATH=. python benchmarks/packed_documents.py [--docs 64] [--tokens 4096] [--rounds 10]

SmolLM2-135M twice (one copy patched ``window=1020, sinks=4``: every document here is shorter than
the window, so both models must give the same logits, which is checked and printed), one row of
``--tokens`` tokens of the embedded text cut into ``--docs`` documents of seeded random lengths,
``position_ids`` that restart at each document (what TRL's padding-free collator passes).  Each
forward runs without a cache and without gradients (``use_cache=False``); one warm-up each, then
``--rounds`` paired rounds (:func:`common.paired_rounds`, order alternating).  ``--equal`` cuts
documents of one length instead.  Writes benchmarks/results/packed_documents.csv and .png.
~3 min on 2 cores at the defaults.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from common import RESULTS, paired_rounds, print_table, write_csv  # noqa: E402

WINDOW, SINKS = 1020, 4


def document_lengths(tokens: int, docs: int, equal: bool, seed: int = 0) -> list[int]:
    """``docs`` lengths summing to ``tokens``: all equal, or cut at seeded random points."""
    if equal:
        return [tokens // docs + (k < tokens % docs) for k in range(docs)]
    cuts = sorted(random.Random(seed).sample(range(1, tokens), docs - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, tokens])]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--equal", action="store_true", help="documents of one length instead of random lengths")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args()
    if not 1 <= args.docs <= args.tokens or args.rounds < 1:
        p.error("need 1 <= --docs <= --tokens and --rounds >= 1")
    torch.set_num_threads(args.threads)
    from swa_patch import patch_model
    from swa_patch.models import load_model, load_text

    plain, tokenizer = load_model()
    patched, _ = load_model()
    patch_model(patched, window=WINDOW, sinks=SINKS)
    ids = tokenizer(load_text(), return_tensors="pt").input_ids[:, :args.tokens]
    lengths = document_lengths(args.tokens, args.docs, args.equal)
    if max(lengths) > WINDOW:
        p.error(f"a document of {max(lengths)} tokens exceeds the window ({WINDOW}): both models would differ")
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    run = {"unpatched": lambda: plain(ids, position_ids=positions, use_cache=False).logits,
           "swa_patch": lambda: patched(ids, position_ids=positions, use_cache=False).logits}
    with torch.no_grad():
        worst = float((run["swa_patch"]() - run["unpatched"]()).abs().max())
        whole = float((patched(ids, use_cache=False).logits - run["unpatched"]()).abs().max())
        timed = paired_rounds(run, args.rounds, baseline="unpatched")
    print(f"{args.docs} documents ({min(lengths)}-{max(lengths)} tokens) in one row of {args.tokens}: "
          f"max |logits - unpatched| {worst:.2e} (one stream, documents mixed: {whole:.2f})")
    rows = [{"method": name, "docs": args.docs, "tokens": args.tokens, "lengths": "equal" if args.equal else "random",
             "min_len": min(lengths), "max_len": max(lengths), "seconds": round(t["seconds"], 4),
             "min_s": round(t["min_s"], 4), "max_s": round(t["max_s"], 4), "warmup_s": round(t["warmup_s"], 3),
             "vs_unpatched": round(1 / t["speedup"], 3), "vs_unpatched_min": round(1 / t["speedup_max"], 3),
             "vs_unpatched_max": round(1 / t["speedup_min"], 3), "rounds": t["rounds"],
             "max_abs_logit_diff": f"{worst:.2e}"} for name, t in timed.items()]   # threads: in the provenance
    print_table(rows, ["method", "seconds", "min_s", "max_s", "vs_unpatched", "vs_unpatched_min", "vs_unpatched_max",
                       "warmup_s"])
    name = "packed_documents" + ("_equal" if args.equal else "")
    write_csv(os.path.join(RESULTS, f"{name}.csv"), rows)
    if not args.no_plot:
        plot(rows, os.path.join(RESULTS, f"{name}.png"))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3))
    names = [r["method"] for r in rows]
    ax.bar(names, [r["seconds"] for r in rows], yerr=[[r["seconds"] - r["min_s"] for r in rows],
                                                       [r["max_s"] - r["seconds"] for r in rows]], capsize=4)
    ax.set_ylabel("seconds per forward (median, min-max)")
    ax.set_title(f"{rows[0]['docs']} documents in a {rows[0]['tokens']}-token row")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
