"""Decode cost and memory of the rolling cache vs the unpatched model, side by side in one run.

- time per decode token at stream position 2k vs 32k (patched: rolling cache 4 + 1020;
  unpatched: transformers' DynamicCache), 7 rounds interleaved so all see the same load; the
  median step with the spread (min, max) of the rounds;
- KV-cache bytes at both positions;
- resident memory (RSS after ``malloc_trim``, asked of the OS) gained from 10k to 100k tokens of
  streaming through the rolling cache, beside a dense control (the unpatched model's DynamicCache,
  10k to 30k tokens) that shows the measurement sees a growing cache; each in a fresh process.

Model: random Llama (hidden 256, 4 layers, 8 heads), CPU, 1 thread.

    python benchmarks/cache_decode.py          # -> results/cache_decode.csv, cache_decode.png
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, print_table, run_isolated, write_csv  # noqa: E402

from swa_patch import make_cache, patch_model  # noqa: E402

torch.set_num_threads(1)
POSITIONS = (2048, 32768)


def model(patched=True):
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config).eval()
    return patch_model(plain, window=1020, sinks=4) if patched else plain


@torch.no_grad()
def stream(m, cache, n, chunk=1024):
    ids = torch.randint(0, 1000, (1, chunk))
    done, logits = 0, None
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


def cache_bytes(cache) -> int:
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def latency_rows(rounds=7, steps=40):
    rows = []
    models = {"swa_cache": model(True), "dense": model(False)}
    caches = {}
    for name, m in models.items():
        for pos in POSITIONS:
            caches[name, pos] = make_cache(m) if name == "swa_cache" else DynamicCache(config=m.config)
            stream(m, caches[name, pos], pos)
    times = {key: [] for key in caches}
    for _ in range(rounds):
        for (name, pos), cache in caches.items():
            times[name, pos].append(decode_seconds(models[name], cache, steps))
    for name in models:
        first = statistics.median(times[name, POSITIONS[0]])
        for pos in POSITIONS:
            mid = statistics.median(times[name, pos])
            rows.append({"metric": "decode_ms_per_token", "method": name, "position": pos,
                         "value": mid * 1e3, "min": min(times[name, pos]) * 1e3, "max": max(times[name, pos]) * 1e3,
                         "ratio_vs_2k": mid / first, "kv_cache_mb": cache_bytes(caches[name, pos]) / 2**20,
                         "rounds": rounds})
    return rows


def rss_child(mode: str, total: int) -> dict:
    """Stream ``total`` tokens (1k chunks); resident MiB and cache MiB at 10k and at ``total``."""
    import ctypes
    import gc
    m = model(mode == "swa_cache")
    cache = make_cache(m) if mode == "swa_cache" else DynamicCache(config=m.config)
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim     # RSS then counts live memory, not free lists
    except (OSError, AttributeError):
        trim = lambda pad: 0                            # noqa: E731

    def resident():
        gc.collect()
        trim(0)
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
    marks = {}
    for done in range(10_000, total + 1, 10_000):
        stream(m, cache, 10_000, chunk=1000)
        if done in (10_000, total):
            marks[done] = (resident(), cache_bytes(cache) / 2**20)
    return {"tokens": cache.get_seq_length(), "marks": marks}


def rss_rows() -> list[dict]:
    rows = []
    env = {"MALLOC_MMAP_THRESHOLD_": "131072"}     # glibc: a freed tensor is unmapped at once
    for mode, total in (("dense", 30_000), ("swa_cache", 100_000)):
        r = run_isolated(__file__, ["--rss", mode, str(total)], env)
        (rss_10k, kv_10k), (rss_end, kv_end) = r["marks"]["10000"], r["marks"][str(total)]
        rows.append({"metric": "resident_growth_mb", "method": mode, "position": total,
                     "value": rss_end - rss_10k, "kv_cache_mb": kv_end, "kv_growth_mb": kv_end - kv_10k,
                     "from_position": 10_000})
    return rows


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--rss":
        print(json.dumps(rss_child(sys.argv[2], int(sys.argv[3]))))
        return
    rows = latency_rows() + rss_rows()
    path = os.path.join(RESULTS, "cache_decode.csv")
    write_csv(path, rows)
    print_table(rows, ["metric", "method", "position", "value", "min", "max", "ratio_vs_2k", "kv_cache_mb",
                       "kv_growth_mb"])
    plot(rows, os.path.join(RESULTS, "cache_decode.png"))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("swa_cache", "dense"):
        pts = [(r["position"], r["value"]) for r in rows if r["metric"] == "decode_ms_per_token" and r["method"] == name]
        a.plot(*zip(*pts), marker="o", label=name)
        pts = [(r["position"], r["kv_cache_mb"]) for r in rows if r["metric"] == "decode_ms_per_token" and r["method"] == name]
        b.plot(*zip(*pts), marker="o", label=name)
    a.set(xscale="log", xlabel="stream position", ylabel="ms per decode token", title="decode latency")
    b.set(xscale="log", yscale="log", xlabel="stream position", ylabel="KV cache MB", title="KV cache size")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
