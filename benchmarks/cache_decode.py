"""Decode cost and memory of the rolling cache, measured side by side in one run.

    python benchmarks/cache_decode.py latency   # time per decode token at stream position 2k vs 32k
    python benchmarks/cache_decode.py dense     # the same for the unpatched model (DynamicCache)
    python benchmarks/cache_decode.py rss N     # peak RSS after streaming N tokens (run once per N)

Model: tiny random Llama (hidden 256, 4 layers), window 1020, sinks 4, CPU, 1 thread.
Prints one line per measurement and appends it to cache_decode.csv.
"""
from __future__ import annotations

import csv
import resource
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from swa_patch import make_cache, patch_model

torch.set_num_threads(1)


def model(patched=True):
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config).eval()
    return patch_model(plain, window=1020, sinks=4) if patched else plain


@torch.no_grad()
def stream(m, cache, n, chunk=1024):
    ids = torch.randint(0, 1000, (1, chunk))
    done = 0
    while done < n:
        q = min(chunk, n - done)
        logits = m(ids[:, :q], cache=cache).logits
        done += q
    return logits


@torch.no_grad()
def decode_seconds(m, cache, steps):
    tok = torch.tensor([[5]])
    start = time.perf_counter()
    for _ in range(steps):
        m(tok, cache=cache)
    return (time.perf_counter() - start) / steps


def latency(rounds=5, steps=40, patched=True):
    m = model(patched)
    caches = {}
    for pos in (2048, 32768):
        caches[pos] = make_cache(m) if patched else DynamicCache(config=m.config)
        stream(m, caches[pos], pos)
    times = {pos: [] for pos in caches}
    for _ in range(rounds):                       # interleaved: both see the same machine load
        for pos, cache in caches.items():
            times[pos].append(decode_seconds(m, cache, steps))
    best = {pos: min(t) for pos, t in times.items()}
    ratio = best[32768] / best[2048]
    nbytes = {p: sum(t.nbytes for layer in c.layers for t in (layer.keys, layer.values)) for p, c in caches.items()}
    row = ["latency" if patched else "dense", f"{best[2048] * 1e3:.3f} ms", f"{best[32768] * 1e3:.3f} ms", f"{ratio:.3f}",
           f"kv bytes {nbytes[2048]} vs {nbytes[32768]}"]
    print(row[0], "decode ms/token @2k, @32k, ratio:", *row[1:])
    return row


def rss(n):
    m = model()
    cache = make_cache(m)
    logits = stream(m, cache, n, chunk=512)
    assert torch.isfinite(logits).all()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = ["rss", str(n), f"{peak_mb:.1f} MB", f"cache {cache.nbytes()} bytes"]
    print("peak RSS after", *row[1:])
    return row


if __name__ == "__main__":
    mode = sys.argv[1]
    result = rss(int(sys.argv[2])) if mode == "rss" else latency(patched=mode == "latency")
    with open("cache_decode.csv", "a", newline="") as f:
        csv.writer(f).writerow(result)
