"""Decode speed of SmolLM2-135M with the rolling cache: eager vs torch.compile(fullgraph=True) over
the static-shape cache, and at 32k tokens vs the unpatched model's own step at a 1k cache.

    PYTHONPATH=. python benchmarks/compiled_decode.py [--threads 1] [--steps 64] [--far 32768]

One process, one thread by default; every figure is a median over ``--steps`` decode steps after
warm-up steps (compiles excluded: the compiled step is traced once, before the timed region).
Rows: patched (4 sinks + 1020 window, positions "shift", ``make_cache(static=True)``) after a
1k prompt, eager and compiled; the same at stream position ``--far``; the unpatched model
(DynamicCache, and transformers' StaticCache compiled) after a 1k prompt.
Writes benchmarks/results/compiled_decode.csv.
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


def ms_per_step(step, tok, steps: int, warmup: int = 3) -> float:
    times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            start = time.perf_counter()
            logits = step(tok)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
            tok = logits[:, -1:].argmax(-1)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--far", type=int, default=32768)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import DynamicCache, StaticCache

    from swa_patch import make_cache, patch_model, unpatch_model
    from swa_patch.models import load_model, load_text

    model, tok = load_model()
    ids = tok(load_text(), return_tensors="pt").input_ids[:, :args.far]
    rows = []

    def record(method, position, compiled, ms):
        rows.append({"method": method, "position": position, "compiled": compiled, "ms_per_token": round(ms, 3)})
        print(f"{method:10s} position {position:6d} {'compiled' if compiled else 'eager':8s} {ms:8.2f} ms/token",
              flush=True)

    with torch.no_grad():
        # the unpatched model's own floor: a 1k cache, eager and (StaticCache) compiled
        cache = DynamicCache(config=model.config)
        model(ids[:, :args.prompt], cache=cache)
        record("unpatched", args.prompt, False, ms_per_step(lambda t: model(t, cache=cache).logits,
                                                            ids[:, args.prompt:args.prompt + 1], args.steps))
        static = StaticCache(config=model.config, max_cache_len=args.prompt + args.steps + 8)
        model(ids[:, :args.prompt], cache=static)
        compiled = torch.compile(lambda t: model(t, cache=static).logits, fullgraph=True)
        record("unpatched", args.prompt, True, ms_per_step(compiled, ids[:, args.prompt:args.prompt + 1], args.steps))

        patch_model(model, window=1020, sinks=4, backend="sdpa")          # positions: shift (the default)
        for position in (args.prompt, args.far):
            cache = make_cache(model, static=True)
            for start in range(0, position, 2048):                # the prompt, eagerly, in chunks
                model(ids[:, start:min(position, start + 2048)], cache=cache)
            eager = ms_per_step(lambda t: model(t, cache=cache).logits, ids[:, -1:], args.steps)
            record("swa_patch", position, False, eager)
            step = torch.compile(lambda t, c=cache: model(t, cache=c).logits, fullgraph=True)
            record("swa_patch", position, True, ms_per_step(step, ids[:, -1:], args.steps))
        unpatch_model(model)
    base = {(r["method"], r["position"], r["compiled"]): r["ms_per_token"] for r in rows}
    for r in rows:
        r["vs_eager_same_position"] = round(base[(r["method"], r["position"], False)] / r["ms_per_token"], 3)
        r["vs_unpatched_1k_same_mode"] = round(base[("unpatched", args.prompt, r["compiled"])] / r["ms_per_token"], 3)
    write_csv(os.path.join(RESULTS, "compiled_decode.csv"), rows)
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
