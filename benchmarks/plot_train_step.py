"""Draw benchmarks/results/train_step.csv (written by train_step.py) as a PNG beside it."""
from __future__ import annotations

import csv
import sys


def plot(csv_path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    meta = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "step_s", "training step (s)"), (axes[1], "peak_mb", "peak memory (MB)")):
        for mode in ("dense", "window"):
            pts = sorted((int(r["seq_len"]), float(r["value"])) for r in rows
                         if r["mode"] == mode and r["metric"] == metric)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                    label="dense (causal SDPA)" if mode == "dense" else f"window W={meta['window']}")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"LoRA training step, SmolLM2-135M shape ({meta['layers']} layers, vocab {meta['vocab']}), "
                 f"CPU {meta['threads']} threads")
    fig.tight_layout()
    out = csv_path.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(plot(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/train_step.csv"))
