"""Speculative decoding through the rolling cache: SmolLM2-135M patched (4 sinks + 252 window)
generating greedily on its own, with a draft (the same weights patched with a 4 + 60 window,
``num_assistant_tokens`` drafted per step), and with prompt lookup.

    PYTHONPATH=. python benchmarks/speculative.py [--threads 1] [--rounds 5] [--prompt 512] [--new 128]

One process.  Every configuration runs once untimed (warm-up), then ``--rounds`` paired rounds in
which the configurations take turns (the order rotates each round), so drift in a shared machine
hits them alike.  Each timing is a whole ``generate()`` call, prompt included, as a user waits for
it; tokens/s = new tokens / seconds, median over rounds, with min and max.  ``same_tokens`` says
whether the configuration's output equals plain greedy decoding of the patched model (it must).
Writes benchmarks/results/speculative.csv.
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
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--lookup-tokens", type=int, default=4)
    args = p.parse_args()
    for name in ("threads", "rounds", "prompt", "new", "draft_tokens", "lookup_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    from swa_patch import patch_model
    from swa_patch.models import load_model, load_text

    target, tok = load_model()
    draft, _ = load_model()
    patch_model(target, window=252, sinks=4, backend="sdpa")
    patch_model(draft, window=60, sinks=4, backend="sdpa")
    draft.generation_config.num_assistant_tokens = args.draft_tokens
    ids = tok(load_text(), return_tensors="pt").input_ids[:, 4096:4096 + args.prompt]
    configs = {"greedy": {}, "draft": dict(assistant_model=draft),
               "prompt_lookup": dict(prompt_lookup_num_tokens=args.lookup_tokens)}

    def run(name):
        start = time.perf_counter()
        with torch.no_grad():
            out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                  min_new_tokens=args.new, do_sample=False, pad_token_id=tok.eos_token_id,
                                  **configs[name])
        return time.perf_counter() - start, out

    outputs = {name: run(name)[1] for name in configs}          # warm-up, and the tokens to compare
    times = {name: [] for name in configs}
    names = list(configs)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            seconds, out = run(name)
            times[name].append(seconds)
            if not torch.equal(out, outputs["greedy"]):
                outputs[name] = out
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    base = statistics.median(times["greedy"])
    rows = [{"method": name, "new_tokens": args.new, "prompt_tokens": args.prompt,
             "tokens_per_s": round(args.new / statistics.median(t), 3),
             "tokens_per_s_min": round(args.new / max(t), 3), "tokens_per_s_max": round(args.new / min(t), 3),
             "vs_greedy": round(base / statistics.median(t), 3),
             "same_tokens": bool(torch.equal(outputs[name], outputs["greedy"])), "rounds": args.rounds,
             "drafted_per_step": {"greedy": 0, "draft": args.draft_tokens, "prompt_lookup": args.lookup_tokens}[name]}
            for name, t in times.items()]
    write_csv(os.path.join(RESULTS, "speculative.csv"), rows)
    print_table(rows, list(rows[0]))
    if not all(r["same_tokens"] for r in rows):
        raise SystemExit("a speculative configuration gave other tokens than plain greedy decoding")


if __name__ == "__main__":
    main()
