"""Prefill of Gemma-3-270M (real weights) on 16k tokens of real text: the unpatched model vs patched.

    PYTHONPATH=. python benchmarks/gemma3_prefill.py [--tokens 16384] [--rounds 5] [--threads 2]

Gemma 3 is hybrid already: 15 of its 18 layers have a 512-token window, 3 are global.  A user's
alternative is the model as it loads (transformers' SDPA with its sliding mask, i.e. dense work
masked, and the DynamicCache ``generate()`` builds); against it, with the cache
``make_cache(model)`` gives the patched model:

* ``own pattern``          ``patch_model(model, window=512)``: its windows on swa_patch kernels,
                           its 3 global layers still dense;
* ``every layer + sinks``  ``window=[512] * 18, sinks=4``: the global layers windowed too;
* ``... + decode global``  the same with ``decode=[5, 11, 17]``: its global layers attend fully
                           from the prompt's end on (their caches keep every key).

One process, one model, patched and unpatched in turn.  Round 0 warms every configuration up
(``warmup_s``, compiles included); then ``--rounds`` timed rounds, the configurations taking
turns in an order rotated each round.  ``median_s`` / ``min_s`` / ``max_s`` are over the timed
rounds; ``speedup_vs_unpatched`` divides the unpatched median by the configuration's, and
``paired_min`` / ``paired_max`` are the smallest and largest per-round ratios (same round, same
machine state).  ``kv_mib`` is the cache each leaves.  Writes
``benchmarks/results/gemma3_prefill.csv``.  ~25 min on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from common import RESULTS, print_table, write_csv  # noqa: E402

UNPATCHED = "unpatched"


def configurations(n_layers: int, global_layers: list[int]) -> dict:
    """name -> patch_model options (None: the model as loaded)."""
    every = {"window": [512] * n_layers, "sinks": 4}
    return {UNPATCHED: None, "own pattern": {"window": 512}, "every layer + sinks": every,
            "every layer + sinks + decode global": {**every, "decode": global_layers}}


def prefill_once(model, ids, options) -> tuple[float, int]:
    """Seconds of one prefill through the cache a user gets, and the bytes that cache holds."""
    from transformers import DynamicCache

    from swa_patch import make_cache, patch_model, unpatch_model
    from swa_patch.streaming import cache_bytes

    if options is not None:
        patch_model(model, **options)
    try:
        cache = DynamicCache(config=model.config) if options is None else make_cache(model)
        with torch.no_grad():
            start = time.perf_counter()
            model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            seconds = time.perf_counter() - start
        return seconds, cache_bytes(cache)
    finally:
        unpatch_model(model)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up round (>= 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(RESULTS, "gemma3_prefill.csv"))
    args = p.parse_args()
    if args.rounds < 1 or args.tokens < 2:
        raise SystemExit(f"--rounds must be >= 1 and --tokens >= 2, got {args.rounds}, {args.tokens}")
    torch.set_num_threads(args.threads)
    from swa_patch.families import native_full_layers
    from swa_patch.models import load_model, load_text

    model, tokenizer = load_model("gemma3-270m")
    ids = tokenizer(load_text(), return_tensors="pt").input_ids[:, :args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"the default text holds {ids.shape[1]} tokens, fewer than --tokens {args.tokens}")
    configs = configurations(model.config.num_hidden_layers, sorted(native_full_layers(model.config)))
    names = list(configs)
    warmup, times, kv = {}, {n: [] for n in names}, {}
    for rnd in range(args.rounds + 1):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            seconds, kv[name] = prefill_once(model, ids, configs[name])
            if rnd == 0:
                warmup[name] = seconds
            else:
                times[name].append(seconds)
            print(f"round {rnd}{' (warm-up)' if rnd == 0 else ''} {name}: {seconds:.2f} s", flush=True)
    base = statistics.median(times[UNPATCHED])
    rows = []
    for name in names:
        paired = [u / t for u, t in zip(times[UNPATCHED], times[name])]
        rows.append({"config": name, "tokens": args.tokens, "rounds": args.rounds, "warmup_s": round(warmup[name], 2),
                     "median_s": round(statistics.median(times[name]), 2), "min_s": round(min(times[name]), 2),
                     "max_s": round(max(times[name]), 2),
                     "speedup_vs_unpatched": round(base / statistics.median(times[name]), 2),
                     "paired_min": round(min(paired), 2), "paired_max": round(max(paired), 2),
                     "kv_mib": round(kv[name] / 2**20, 1)})
    print_table(rows, list(rows[0]))
    write_csv(args.out, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
