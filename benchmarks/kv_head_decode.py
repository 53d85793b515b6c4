"""What a decode step costs when single KV heads keep full attention, against the same number of
full KV heads as whole layers (issue 29's cost target: median ratio <= 1.1).

    PYTHONPATH=. python benchmarks/kv_head_decode.py [--start 2048] [--rounds 10] [--steps 32] [--full 9]

SmolLM2-135M (30 layers x 3 KV heads = 90), W=256 + 4 sinks, positions "original", backend "auto".
Two copies of the weights, patched two ways with ``--full`` full KV heads each:

- ``whole layers``: ``--full / 3`` whole layers full (every 10th layer from layer 5, e.g. 5, 15, 25),
  every other layer W=256;
- ``per head``: one full KV head in each of ``--full`` layers spread over the stack (KV head
  ``layer mod 3``), the other two KV heads of those layers and every other layer W=256: the
  calibrated plans of ``swa_patch.calibrate`` have this shape.

Both read the same text to ``--start`` tokens in chunks of 512, then, in paired rounds
(``common.paired_rounds``, order alternating), each feeds ``--steps`` more tokens one at a time
(teacher forcing, the same tokens for both), so both caches hold the same stream at every round.
The KV bytes of both caches at the end are recorded (they must be equal: the same number of
full heads).  Writes benchmarks/results/kv_head_decode.csv (one row per round, then the median
row) and kv_head_decode.png.
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
from decode_step import Stream, plot, prefill  # noqa: E402

TARGET = 1.1
WINDOW, SINKS = 256, 4


def plans(n_layers: int, n_kv: int, full: int) -> dict[str, list]:
    """The two window lists with ``full`` full KV heads each (see the module docstring)."""
    if full % n_kv or not 0 < full <= n_layers:
        raise SystemExit(f"--full must be a multiple of {n_kv} (whole layers) between {n_kv} and {n_layers}")
    whole = {5 + i * n_layers // (full // n_kv) for i in range(full // n_kv)}
    spread = {round(i * n_layers / full) for i in range(full)}
    per_head = []
    for layer in range(n_layers):
        heads = [WINDOW] * n_kv
        if layer in spread:
            heads[layer % n_kv] = None
        per_head.append(heads)
    return {"whole layers": [None if layer in whole else WINDOW for layer in range(n_layers)],
            "per head": per_head}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start", type=int, default=2048, help="tokens in both caches before the first step")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=32, help="decode steps per model per round")
    p.add_argument("--full", type=int, default=9, help="full KV heads in both configurations")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--csv", default=os.path.join(RESULTS, "kv_head_decode.csv"))
    p.add_argument("--plot", default=os.path.join(RESULTS, "kv_head_decode.png"), help="'' for none")
    args = p.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.threads < 1:
        p.error("--rounds, --steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    from swa_patch import make_cache, patch_model
    from swa_patch.models import load_model, load_text

    models, tok = {}, None
    for name in ("whole layers", "per head"):
        models[name], tok = load_model()
    config = models["per head"].config
    windows = plans(config.num_hidden_layers, config.num_key_value_heads, args.full)
    for name, model in models.items():
        patch_model(model, window=windows[name], sinks=SINKS, positions="original")
    need = args.start + args.steps * (args.rounds + 1)
    ids = tok(load_text(), return_tensors="pt").input_ids[:, :need]
    if ids.shape[1] < need:
        raise SystemExit(f"the text has {ids.shape[1]} tokens, fewer than the {need} needed")
    caches = {name: make_cache(model) for name, model in models.items()}
    streams = {}
    for name, model in models.items():
        prefill(model, caches[name], ids, args.start)
        streams[name] = Stream(model, caches[name], ids, args.start, args.steps, True)
    start = time.perf_counter()
    paired_rounds(streams, args.rounds, baseline="whole layers", prepare=lambda name: gc.collect())
    timed_s = time.perf_counter() - start
    kv_mib = {name: round(cache.nbytes() / 2**20, 2) for name, cache in caches.items()}

    per_step = {name: [s / args.steps * 1e3 for s in st.seconds[1:]] for name, st in streams.items()}
    ratios = [h / w for h, w in zip(per_step["per head"], per_step["whole layers"])]
    settings = {"window": WINDOW, "sinks": SINKS, "full_kv_heads": args.full, "positions": "original",
                "backend": "auto", "start": args.start, "steps": args.steps}
    rows = [{"round": r + 1, "first": "whole layers" if r % 2 == 0 else "per head",
             "stream_from": streams["per head"].starts[r + 1], "per_head_ms": round(per_step["per head"][r], 3),
             "whole_layers_ms": round(per_step["whole layers"][r], 3), "ratio": round(ratios[r], 4), **settings}
            for r in range(args.rounds)]
    median = statistics.median(ratios)
    rows.append({"round": "median", "per_head_ms": round(statistics.median(per_step["per head"]), 3),
                 "whole_layers_ms": round(statistics.median(per_step["whole layers"]), 3),
                 "ratio": round(median, 4), "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4),
                 "target": TARGET, "met": median <= TARGET, "rounds": args.rounds,
                 "kv_mib_per_head": kv_mib["per head"], "kv_mib_whole_layers": kv_mib["whole layers"],
                 "warmup_per_head_ms": round(streams["per head"].seconds[0] / args.steps * 1e3, 3),
                 "warmup_whole_layers_ms": round(streams["whole layers"].seconds[0] / args.steps * 1e3, 3),
                 "timed_s": round(timed_s, 1), **settings})
    write_csv(args.csv, rows)
    print_table(rows, ["round", "first", "stream_from", "per_head_ms", "whole_layers_ms", "ratio"])
    print(f"per-head / whole-layer full heads ({args.full} of each) per decode step: median {median:.3f}x over "
          f"{args.rounds} paired rounds [{min(ratios):.3f}-{max(ratios):.3f}]; KV {kv_mib['per head']} vs "
          f"{kv_mib['whole layers']} MiB at {streams['per head'].position} tokens; target <= {TARGET}x: "
          f"{'met' if median <= TARGET else 'NOT met'}")
    if args.plot:
        plot(rows[:-1], median, args.plot, TARGET, "per head / whole layers",
             f"SmolLM2-135M decode step, {args.full} full KV heads: single heads vs whole layers")


if __name__ == "__main__":
    main()
