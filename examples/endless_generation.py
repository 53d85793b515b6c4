"""Generate text forever with constant memory: a manual decode loop over a bounded cache.

    python examples/endless_generation.py --prompt "Once upon a time" --tokens 20000

The model is patched with a sliding window and attention sinks, and ``make_cache(model)``
holds at most ``sinks + window`` keys per layer, so the KV memory printed every
``--report`` tokens stops growing once the window is full.  ``--tokens 0`` runs until Ctrl-C.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from swa_patch import make_cache, patch_model
from swa_patch.models import load_model
from swa_patch.streaming import cache_bytes


def endless(model, tokenizer, prompt: str, tokens: int, window: int = 1020, sinks: int = 4,
            temperature: float = 0.8, top_p: float = 0.95, report: int = 500, seed: int = 0,
            positions=None, out=sys.stdout):
    """Sample ``tokens`` tokens (0 = forever) after ``prompt``; yields (tokens so far, KV bytes)
    every ``report`` tokens."""
    if tokens < 0 or report < 1 or not 0 < top_p <= 1 or temperature <= 0:
        raise ValueError("tokens must be >= 0, report >= 1, 0 < top_p <= 1 and temperature > 0")
    patch_model(model, window=window, sinks=sinks, positions=positions)
    cache = make_cache(model)
    generator = torch.Generator().manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    made = 0
    with torch.no_grad():
        while tokens == 0 or made < tokens:
            logits = model(ids, cache=cache, use_cache=True).logits[0, -1].float() / temperature
            probs = torch.softmax(logits, -1)
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < top_p          # nucleus
            choice = torch.multinomial(sorted_p * keep, 1, generator=generator)
            ids = order[choice].view(1, 1)
            made += 1
            if out is not None:
                out.write(tokenizer.decode(ids[0]))
                out.flush()
            if made % report == 0:
                yield made, cache_bytes(cache)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", default="Here is a long story about a lighthouse keeper.\n\n")
    p.add_argument("--tokens", type=int, default=5000, help="0 = until Ctrl-C")
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--report", type=int, default=500)
    args = p.parse_args(argv)
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    try:
        for made, kv in endless(model, tokenizer, args.prompt, args.tokens, args.window, args.sinks,
                                args.temperature, args.top_p, args.report):
            print(f"\n[{made} tokens, KV cache {kv / 2**20:.1f} MiB, "
                  f"{made / (time.perf_counter() - start):.1f} tokens/s]", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
