"""Prompts of many lengths through backend='auto', the sdpa band and flex: does compiling cost a
user with varying prompts more than it saves?

    PYTHONPATH=. python benchmarks/varying_prompts.py [--layers 4] [--prompts 12]

A SmolLM2-135M-shaped random Llama (``--layers`` layers), W=1024, prefills of ``--prompts``
distinct lengths between 2k and 16k tokens (seeded), each backend in a fresh process (its own
compile cache, as a new service would start), total wall time *including* every compile.  On CPU
``auto`` runs the sdpa band for these prefills; the flex column is why.
Writes benchmarks/results/varying_prompts.csv (per prompt, per backend, with provenance).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from common import RESULTS, provenance  # noqa: E402


def child(args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from swa_patch import patch_model
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=32768,
                         tie_word_embeddings=True)
    model = patch_model(LlamaForCausalLM(config).eval(), window=args.window, backend=args.backend)
    times = []
    with torch.no_grad():
        for n in args.lengths:
            ids = torch.randint(0, 49152, (1, n))
            start = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    print(json.dumps(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.backend:
        return child(args)
    lengths = random.Random(0).sample(range(2048, 16385), args.prompts)
    results = {}
    for backend in ("sdpa", "auto", "flex"):
        cmd = [sys.executable, __file__, "--backend", backend, "--layers", str(args.layers), "--window",
               str(args.window), "--threads", str(args.threads), "--lengths", ",".join(map(str, lengths))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{backend}: {sum(results[backend]):.1f} s for {len(lengths)} prompts", flush=True)
    ratio = sum(results["auto"]) / sum(results["sdpa"])
    print(f"auto / sdpa total time, compiles included: {ratio:.3f}; flex / sdpa: "
          f"{sum(results['flex']) / sum(results['sdpa']):.3f}")
    meta = provenance()
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "varying_prompts.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "tokens", "sdpa_s", "auto_s", "flex_s", "layers", "window",
                                          "auto_over_sdpa_total", *meta])
        w.writeheader()
        for i, n in enumerate(lengths):
            w.writerow({"prompt": i, "tokens": n, "sdpa_s": f"{results['sdpa'][i]:.3f}",
                        "auto_s": f"{results['auto'][i]:.3f}", "flex_s": f"{results['flex'][i]:.3f}",
                        "layers": args.layers, "window": args.window,
                        "auto_over_sdpa_total": f"{ratio:.3f}", **meta})


if __name__ == "__main__":
    main()
