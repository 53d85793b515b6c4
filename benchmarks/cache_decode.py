"""Decode cost and memory of the rolling cache vs the unpatched model, side by side in one run.

- time per decode token at stream position 2k vs 32k (patched: rolling cache 4 + 1020;
  unpatched: transformers' DynamicCache), rounds interleaved so both see the same load;
- KV-cache bytes at both positions;
- peak process RSS after streaming 10k vs 100k tokens (each in a fresh process).

Model: random Llama (hidden 256, 4 layers, 8 heads), CPU, 1 thread.

    python benchmarks/cache_decode.py          # -> results/cache_decode.csv, cache_decode.png
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, peak_rss_mb, print_table, run_isolated, write_csv  # noqa: E402

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


def latency_rows(rounds=5, steps=40):
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
        first = min(times[name, POSITIONS[0]])
        for pos in POSITIONS:
            best = min(times[name, pos])
            rows.append({"metric": "decode_ms_per_token", "method": name, "position": pos,
                         "value": best * 1e3, "ratio_vs_2k": best / first,
                         "kv_cache_mb": cache_bytes(caches[name, pos]) / 2**20})
    return rows


def rss_child(n: int) -> dict:
    m = model()
    cache = make_cache(m)
    logits = stream(m, cache, n, chunk=512)
    assert torch.isfinite(logits).all()
    return {"peak_mb": peak_rss_mb(), "kv_cache_mb": cache.nbytes() / 2**20}


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--rss":
        print(json.dumps(rss_child(int(sys.argv[2]))))
        return
    rows = latency_rows()
    first = None
    for n in (10_000, 100_000):
        r = run_isolated(__file__, ["--rss", str(n)])
        first = first or r["peak_mb"]
        rows.append({"metric": "peak_rss_mb", "method": "swa_cache", "position": n, "value": r["peak_mb"],
                     "ratio_vs_2k": None, "kv_cache_mb": r["kv_cache_mb"], "ratio_vs_10k": r["peak_mb"] / first})
    for r in rows:
        r.setdefault("ratio_vs_10k", None)
    path = os.path.join(RESULTS, "cache_decode.csv")
    write_csv(path, rows)
    print_table(rows, ["metric", "method", "position", "value", "ratio_vs_2k", "ratio_vs_10k", "kv_cache_mb"])
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
