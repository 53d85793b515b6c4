"""Gemma-3-270M with every layer windowed and a calibrated plan in place of its 3 global layers.

    python benchmarks/gemma3_calibrated.py [--tokens 16384] [--kv-share 0.48] [--methods ...]

Issue 29's Gemma target: perplexity over the first ``--tokens`` of the embedded text within 10 % of
the model as loaded (its 3 global layers full, 15 local layers at their trained 512) at <= 50 % of
its KV memory at that length.  Rows, each streamed through the rolling cache in chunks of 512:

* ``as-loaded`` — the unpatched model (transformers' own hybrid cache);
* ``sinks``     — every layer at 512 + 4 sinks (constant memory);
* ``plan:M``    — a plan from :func:`swa_patch.calibrate` by method ``M`` with ``length=--tokens`` and
  a budget of ``--kv-share`` of the as-loaded KV tokens: full heads while they fit, the rest widens
  the next head's window (local layers are never opened: they were trained with their window);
* ``full:M:K``  — the K best heads of method ``M`` full, nothing widened (for the curve).

Calibration reads the text from token ``--calib-from`` on, never the evaluated tokens; its seconds
are in ``calibrate_s``.  The plan counts K/V tokens only; ``kv_bytes`` is the cache's measured size
(its masks and positions add ~0.5 %), which is why the default budget is 0.48, not 0.5.
Writes one CSV (and a PNG of perplexity against KV memory) with the command, commit and machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS, print_table, write_csv  # noqa: E402

METHODS = {"nll-text": dict(method="nll", target="text"), "nll-copy": dict(method="nll"),
           "retrieval": dict(method="retrieval")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="evaluated tokens (the text's first)")
    p.add_argument("--calib-from", type=int, default=20480, help="calibration reads the text from this token on")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--kv-share", type=float, default=0.48, help="plan budget: share of the as-loaded KV tokens")
    p.add_argument("--methods", default="nll-text,nll-copy,retrieval", help=f"from {','.join(METHODS)}")
    p.add_argument("--full-counts", default="1,2", help="rows full:nll-text:K (K heads full, nothing widened)")
    p.add_argument("--span", type=int, default=1536, help="calibration segment = window + span")
    p.add_argument("--trials", type=int, default=2, help="calibration segments")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(RESULTS, "gemma3_calibrated.csv"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in methods) or not 0 < args.kv_share <= 1:
        p.error(f"--methods must be from {sorted(METHODS)}; --kv-share in (0, 1]")
    counts = [int(k) for k in args.full_counts.split(",") if k]

    import torch

    from swa_patch import Plan, calibrate
    from swa_patch.models import load_model, load_text
    from swa_patch.streaming import stream_perplexity
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("gemma3-270m")
    ids = tokenizer(load_text(None), return_tensors="pt").input_ids[0]
    if ids.numel() < args.calib_from + 2 * (args.window + args.span) or args.calib_from < args.tokens:
        p.error(f"need --calib-from >= --tokens and text past it ({ids.numel()} tokens)")
    evaluated, calibration = ids[:args.tokens], ids[args.calib_from:]
    text = model.config.get_text_config()
    loaded_tokens = sum(args.tokens if kind == "full_attention" else min(args.tokens, text.sliding_window)
                        for kind in text.layer_types)
    share = args.kv_share * loaded_tokens / (args.tokens * text.num_hidden_layers)   # of full attention

    def stream(mode, **kw):
        rows = stream_perplexity(model, evaluated, mode, args.window, args.sinks, chunk=args.chunk,
                                 every=args.tokens, progress=not args.no_progress, all_layers=True, **kw)
        return rows[-1]

    out, plans, seconds = [], {}, {}
    for name in [*methods, *(["nll-text"] if counts and "nll-text" not in methods else [])]:
        start = time.perf_counter()
        plans[f"plan:{name}"] = calibrate(model, calibration, args.window, args.sinks, share, span=args.span,
                                          trials=args.trials, length=args.tokens, **METHODS[name],
                                          source=f"embedded text, tokens {args.calib_from}..")
        seconds[f"plan:{name}"] = time.perf_counter() - start
        print(f"calibrated {name} in {seconds[f'plan:{name}']:.0f} s: {plans[f'plan:{name}']}", flush=True)
    ranked = plans["plan:nll-text"] if counts else None
    for k in counts:        # the same scores, the k best heads full and nothing widened
        order = sorted(((row[0], layer) for layer, row in enumerate(ranked.scores) if row[0] is not None), reverse=True)
        plans[f"full:nll-text:{k}"] = Plan(args.window, args.sinks, sorted((layer, 0) for _, layer in order[:k]),
                                           ranked.scores, k, method=ranked.method, calibration=ranked.calibration)
        seconds[f"full:nll-text:{k}"] = seconds["plan:nll-text"]
    if "nll-text" not in methods:
        del plans["plan:nll-text"]

    rows = [("as-loaded", "dense", None), ("sinks", "sinks", None), *((n, "plan", plan) for n, plan in plans.items())]
    loaded = None
    for name, mode, plan in rows:
        last = stream(mode, **({"plan": plan} if plan is not None else {}))
        loaded = loaded or last
        out.append({"row": name, "full_layers": " ".join(str(layer) for layer, _ in plan.full_heads) if plan else "",
                    "wide": " ".join(f"{layer}@{w}" for layer, _, w in plan.wide_heads) if plan else "",
                    "plan_kv_share": f"{plan.kv_share(args.tokens):.4f}" if plan else "",
                    "tokens": last.tokens, "ppl": f"{last.ppl:.3f}", "ppl_vs_loaded": f"{last.ppl / loaded.ppl:.4f}",
                    "kv_mib": f"{last.kv_bytes / 2**20:.2f}", "kv_vs_loaded": f"{last.kv_bytes / loaded.kv_bytes:.4f}",
                    "meets_target": "yes" if last.ppl <= 1.1 * loaded.ppl and last.kv_bytes <= 0.5 * loaded.kv_bytes
                    else "no", "calibrate_s": f"{seconds[name]:.0f}" if plan else "",
                    "stream_s": f"{last.seconds:.1f}", "window": args.window, "sinks": args.sinks,
                    "calib_from": args.calib_from, "span": args.span, "trials": args.trials})
        print(f"{name}: ppl {last.ppl:.3f} ({last.ppl / loaded.ppl:.3f}x), KV {last.kv_bytes / 2**20:.1f} MiB "
              f"({last.kv_bytes / loaded.kv_bytes:.3f}x)", flush=True)
    write_csv(args.out, out)
    print_table(out, ["row", "full_layers", "wide", "ppl", "ppl_vs_loaded", "kv_mib", "kv_vs_loaded", "meets_target",
                      "calibrate_s"])
    plot(out, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}")
    return 0


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in rows:
        x, y = float(row["kv_vs_loaded"]), float(row["ppl_vs_loaded"])
        ax.scatter(x, y, color="tab:green" if row["meets_target"] == "yes" else "tab:gray")
        ax.annotate(row["row"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(0.5, ls=":", color="k")
    ax.axhline(1.1, ls=":", color="k")
    ax.set_xlabel("KV memory at the last token / model as loaded")
    ax.set_ylabel("perplexity / model as loaded")
    ax.set_title(f"Gemma-3-270M, every layer windowed + calibrated plan ({rows[0]['tokens']} tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
