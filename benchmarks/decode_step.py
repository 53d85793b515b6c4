"""One token-by-token decode step of SmolLM2-135M with the rolling cache (4 sinks + 1020 slots,
positions "shift", backend "auto": what ``patch_model(model, window=1020, sinks=4)`` gives) against
the unpatched model's own step over its DynamicCache, in paired rounds.  Target: median ratio
patched / unpatched <= 1.05.

    PYTHONPATH=. python benchmarks/decode_step.py [--start 1024] [--rounds 12] [--steps 32] [--threads 1]

Both models (two copies of the weights, one patched) read the same text (``load_text``) up to
``--start`` tokens, in chunks of 512, so the rolling buffer is full and evicting from the first
timed step on.  Then each call of :func:`common.paired_rounds` feeds ``--steps`` more tokens of
that text one at a time (teacher forcing: both models see the same tokens, whatever they would
have predicted), with a 2-D all-ones ``attention_mask`` that grows by one per step as
``generate()`` passes it (``--no-attention-mask`` leaves it out).  One warm-up call per model, then
``--rounds`` rounds, the order alternating per round; ``gc.collect()`` runs before each call,
outside the timed region.  The caches are never reset: both streams grow by the same tokens, so in
each round both models are at the same stream length (round r starts at ``--start + steps * r``,
the warm-up being round 0); the patched
step's cost is flat, the unpatched one grows slowly with its cache, so a later round is a little
kinder to the patched model (the ``stream_from`` column says where each round stood).

Writes benchmarks/results/decode_step.csv (one row per round, then the median row) and
decode_step.png (per-round ratios, the 1.05 line).  2 min 10 s on 2 cores at the defaults (two
model loads and the prefills ~40 s, 13 x 32 steps of each model ~85 s); the first run also
downloads the model (~93 MB).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from common import RESULTS, paired_rounds, print_table, write_csv  # noqa: E402

TARGET = 1.05
WINDOW, SINKS = 1020, 4


class Stream:
    """One model decoding the shared token stream: each call feeds the next ``steps`` tokens one
    at a time and records the seconds of that call (so paired_rounds' rounds can be read back)."""

    def __init__(self, model, cache, ids, position: int, steps: int, mask: bool):
        self.model, self.cache, self.ids, self.position = model, cache, ids, position
        self.steps, self.mask, self.seconds, self.starts = steps, mask, [], []

    @torch.no_grad()
    def __call__(self):
        self.starts.append(self.position)
        start = time.perf_counter()
        for _ in range(self.steps):
            tok = self.ids[:, self.position:self.position + 1]
            kwargs = {"attention_mask": torch.ones(1, self.position + 1, dtype=torch.long)} if self.mask else {}
            self.model(tok, cache=self.cache, **kwargs)
            self.position += 1
        self.seconds.append(time.perf_counter() - start)


@torch.no_grad()
def prefill(model, cache, ids, n: int, chunk: int = 512) -> None:
    for start in range(0, n, chunk):
        model(ids[:, start:min(n, start + chunk)], cache=cache,
              attention_mask=torch.ones(1, min(n, start + chunk), dtype=torch.long))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start", type=int, default=1024, help="tokens in both caches before the first step")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=32, help="decode steps per model per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-attention-mask", action="store_true", help="call the model without attention_mask")
    p.add_argument("--csv", default=os.path.join(RESULTS, "decode_step.csv"))
    p.add_argument("--plot", default=os.path.join(RESULTS, "decode_step.png"), help="'' for none")
    args = p.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.threads < 1:
        p.error("--rounds, --steps and --threads must be >= 1")
    if args.start < WINDOW + SINKS:
        p.error(f"--start must be >= {WINDOW + SINKS} so that the rolling buffer is full")
    torch.set_num_threads(args.threads)
    from transformers import DynamicCache

    from swa_patch import make_cache, patch_model
    from swa_patch.models import load_model, load_text

    plain, tok = load_model()
    patched, _ = load_model()
    patch_model(patched, window=WINDOW, sinks=SINKS)          # positions "shift", backend "auto": the defaults
    need = args.start + args.steps * (args.rounds + 1)
    ids = tok(load_text(), return_tensors="pt").input_ids[:, :need]
    if ids.shape[1] < need:
        raise SystemExit(f"the text has {ids.shape[1]} tokens, fewer than the {need} needed")
    caches = {"unpatched": DynamicCache(config=plain.config), "patched": make_cache(patched)}
    models = {"unpatched": plain, "patched": patched}
    streams = {}
    for name, model in models.items():
        prefill(model, caches[name], ids, args.start)
        streams[name] = Stream(model, caches[name], ids, args.start, args.steps, not args.no_attention_mask)
    start = time.perf_counter()
    paired_rounds(streams, args.rounds, baseline="unpatched", prepare=lambda name: gc.collect())
    timed_s = time.perf_counter() - start
    assert streams["patched"].starts == streams["unpatched"].starts, "the two streams drifted apart"

    per_step = {name: [s / args.steps * 1e3 for s in st.seconds[1:]] for name, st in streams.items()}  # no warm-up
    ratios = [p_ / u for p_, u in zip(per_step["patched"], per_step["unpatched"])]
    settings = {"window": WINDOW, "sinks": SINKS, "positions": "shift", "backend": "auto", "start": args.start,
                "steps": args.steps, "attention_mask": not args.no_attention_mask}   # threads: in the provenance
    rows = [{"round": r + 1, "first": "unpatched" if r % 2 == 0 else "patched",
             "stream_from": streams["patched"].starts[r + 1],
             "patched_ms": round(per_step["patched"][r], 3), "unpatched_ms": round(per_step["unpatched"][r], 3),
             "ratio": round(ratios[r], 4), **settings} for r in range(args.rounds)]
    median = statistics.median(ratios)
    rows.append({"round": "median", "patched_ms": round(statistics.median(per_step["patched"]), 3),
                 "unpatched_ms": round(statistics.median(per_step["unpatched"]), 3), "ratio": round(median, 4),
                 "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4), "target": TARGET,
                 "met": median <= TARGET, "rounds": args.rounds,
                 "warmup_patched_ms": round(streams["patched"].seconds[0] / args.steps * 1e3, 3),
                 "warmup_unpatched_ms": round(streams["unpatched"].seconds[0] / args.steps * 1e3, 3),
                 "timed_s": round(timed_s, 1), **settings})
    write_csv(args.csv, rows)
    print_table(rows, ["round", "first", "stream_from", "patched_ms", "unpatched_ms", "ratio"])
    print(f"patched / unpatched per decode step: median {median:.3f}x over {args.rounds} paired rounds "
          f"[{min(ratios):.3f}-{max(ratios):.3f}]; {rows[-1]['patched_ms']:.1f} vs {rows[-1]['unpatched_ms']:.1f} "
          f"ms/step; target <= {TARGET}x: {'met' if median <= TARGET else 'NOT met'}")
    if args.plot:
        plot(rows[:-1], median, args.plot)


def plot(rows, median, path, target=TARGET, label="patched / unpatched",
         title=f"SmolLM2-135M decode step, W={WINDOW} + {SINKS} sinks vs unpatched"):
    """Per-round ratios (``rows[i]["ratio"]``), the target and the median; kv_head_decode.py uses it too."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot([r["round"] for r in rows], [r["ratio"] for r in rows], marker="o", label=label)
    ax.axhline(target, color="red", linestyle="--", label=f"target {target}x")
    ax.axhline(median, color="gray", linestyle=":", label=f"median {median:.3f}x")
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set(xlabel="paired round", ylabel="decode step time ratio", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
