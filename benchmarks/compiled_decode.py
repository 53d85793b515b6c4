"""Decode speed of SmolLM2-135M with the rolling cache: eager vs torch.compile(fullgraph=True) over
the static-shape cache, and at 32k tokens vs the unpatched model's own step at a 1k cache.

    PYTHONPATH=. python benchmarks/compiled_decode.py [--threads 1] [--steps 16] [--rounds 5] [--far 32768]

One process, one thread by default.  Every configuration is set up first (prompt read, step
compiled and warmed up: compiles are outside the timed region), then timed in ``--rounds``
rounds of ``--steps`` greedy decode steps, the configurations taking turns within each round, so
that drift in the machine or the process hits them alike; each figure is the median over all its
timed steps.  Configurations: the unpatched model (a second copy of the weights) after a 1k
prompt, with a DynamicCache eager and transformers' StaticCache compiled; the patched model (4
sinks + 1020 window, positions "shift") with the default dynamic rolling cache, eager (what a user
runs without asking for more), and with ``make_cache(static=True)`` eager and compiled, after a 1k
prompt and at stream position ``--far``.  ``vs_default_eager`` divides the default eager step by
each; ``warmup_s`` is the untimed warm-up of 3 steps, the compile included; ``ms_min``/``ms_max``
the spread of the timed steps.  Writes benchmarks/results/compiled_decode.csv.
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


class Decoder:
    """One configuration: a step function over its own cache, and the times of its steps."""

    def __init__(self, step, tok, warmup: int = 3):
        self.step, self.tok, self.times = step, tok, []
        start = time.perf_counter()
        self.run(warmup, timed=False)         # compiles (if any) happen here
        self.warmup_s = time.perf_counter() - start

    def run(self, steps: int, timed: bool = True):
        with torch.no_grad():
            for _ in range(steps):
                start = time.perf_counter()
                logits = self.step(self.tok)
                if timed:
                    self.times.append((time.perf_counter() - start) * 1e3)
                self.tok = logits[:, -1:].argmax(-1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=16, help="timed steps per configuration per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--far", type=int, default=32768)
    args = p.parse_args()
    for name in ("threads", "steps", "rounds", "prompt"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.far <= args.prompt:
        p.error(f"--far must exceed --prompt ({args.prompt})")
    torch.set_num_threads(args.threads)
    from transformers import DynamicCache, StaticCache

    from swa_patch import make_cache, patch_model
    from swa_patch.models import load_model, load_text

    plain, tok = load_model()
    patched, _ = load_model()
    patch_model(patched, window=1020, sinks=4, backend="sdpa")          # positions: shift (the default)
    ids = tok(load_text(), return_tensors="pt").input_ids[:, :args.far]
    if ids.shape[1] < args.far:
        raise SystemExit(f"the embedded text has {ids.shape[1]} tokens, fewer than --far {args.far}")
    first = ids[:, args.prompt:args.prompt + 1]
    decoders = {}
    with torch.no_grad():
        cache = DynamicCache(config=plain.config)
        plain(ids[:, :args.prompt], cache=cache)
        decoders[("unpatched", args.prompt, False)] = Decoder(lambda t, c=cache: plain(t, cache=c).logits, first)
        total = 3 + args.steps * args.rounds + 8
        static = StaticCache(config=plain.config, max_cache_len=args.prompt + total)
        plain(ids[:, :args.prompt], cache=static)
        step = torch.compile(lambda t, c=static: plain(t, cache=c).logits, fullgraph=True)
        decoders[("unpatched", args.prompt, True)] = Decoder(step, first)
        for position in (args.prompt, args.far):     # the default: eager over the dynamic rolling cache
            cache = make_cache(patched)
            for start in range(0, position, 2048):
                patched(ids[:, start:min(position, start + 2048)], cache=cache)
            decoders[("swa_patch_default", position, False)] = Decoder(
                lambda t, c=cache: patched(t, cache=c).logits, ids[:, position - 1:position])
        for position in (args.prompt, args.far):     # eager and compiled steps take turns on one cache
            cache = make_cache(patched, static=True)
            for start in range(0, position, 2048):    # the prompt, eagerly, in chunks
                patched(ids[:, start:min(position, start + 2048)], cache=cache)
            step = lambda t, c=cache: patched(t, cache=c).logits   # noqa: E731
            for compiled in (False, True):
                fn = torch.compile(step, fullgraph=True) if compiled else step
                decoders[("swa_patch", position, compiled)] = Decoder(fn, ids[:, position - 1:position])
            print(f"ready: swa_patch at {position}", flush=True)
    for r in range(args.rounds):
        for decoder in decoders.values():
            decoder.run(args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{m} {pos} {'c' if c else 'e'} {statistics.median(d.times[-args.steps:]):.1f}"
            for (m, pos, c), d in decoders.items()), flush=True)
    ms = {key: statistics.median(d.times) for key, d in decoders.items()}
    spread = {key: (min(d.times), max(d.times)) for key, d in decoders.items()}
    default = lambda pos: ms[("swa_patch_default", pos, False)] if ("swa_patch_default", pos, False) in ms else None  # noqa: E731
    rows = [{"method": m, "position": pos, "compiled": c, "ms_per_token": round(v, 3),
             "ms_min": round(spread[(m, pos, c)][0], 3), "ms_max": round(spread[(m, pos, c)][1], 3),
             "vs_eager_same_position": round(ms[(m, pos, False)] / v, 3),
             "vs_default_eager": round(default(pos) / v, 3) if default(pos) else None,
             "vs_unpatched_1k_same_mode": round(ms[("unpatched", args.prompt, c)] / v, 3),
             "warmup_s": round(decoders[(m, pos, c)].warmup_s, 2),
             "timed_steps": args.steps * args.rounds} for (m, pos, c), v in ms.items()]
    write_csv(os.path.join(RESULTS, "compiled_decode.csv"), rows)
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
