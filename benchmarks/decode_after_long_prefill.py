"""Is a decode step at stream position 32k slower because of the position, or because of what a
32k prefill leaves behind in the process?  (compiled_decode.py found 1.30x the 1k step.)

    PYTHONPATH=. python benchmarks/decode_after_long_prefill.py [--steps 24]

SmolLM2-135M patched with 4 sinks + 1020 window (shift positions, sdpa), ``make_cache(static=True)``,
eager decode steps on one thread (the prompt is prefilled on two, in 2k chunks, not timed): a fresh
cache at 1k, a fresh cache at 32k, then a fresh cache at 1k again in the same process.  Median ms
per greedy step.  Writes benchmarks/results/decode_after_long_prefill.csv.
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=24)
    args = p.parse_args()
    from swa_patch import make_cache, patch_model
    from swa_patch.models import load_model, load_text

    model, tok = load_model()
    ids = tok(load_text(), return_tensors="pt").input_ids[:, :32768]
    patch_model(model, window=1020, sinks=4, backend="sdpa")

    def filled(n):
        torch.set_num_threads(2)
        cache = make_cache(model, static=True)
        with torch.no_grad():
            for start in range(0, n, 2048):
                model(ids[:, start:min(n, start + 2048)], cache=cache)
        torch.set_num_threads(1)
        return cache

    def ms_per_step(cache):
        token, times = ids[:, -1:], []
        with torch.no_grad():
            for i in range(args.steps + 3):
                start = time.perf_counter()
                logits = model(token, cache=cache).logits
                if i >= 3:
                    times.append((time.perf_counter() - start) * 1e3)
                token = logits[:, -1:].argmax(-1)
        return statistics.median(times)

    rows = []
    for order, position in enumerate((1024, 32768, 1024)):
        ms = ms_per_step(filled(position))
        rows.append({"order": order, "position": position, "after_32k_prefill": order == 2, "ms_per_token": round(ms, 2)})
        print(rows[-1], flush=True)
    for row in rows:
        row["vs_first_1k"] = round(row["ms_per_token"] / rows[0]["ms_per_token"], 3)
    write_csv(os.path.join(RESULTS, "decode_after_long_prefill.csv"), rows)
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
