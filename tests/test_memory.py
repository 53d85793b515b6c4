"""Constant memory, asked of the operating system: a fresh process streams 100k tokens through the
rolling cache and its resident memory (and peak) does not grow after the first 10k; the same
process with a dense cache shows that the measurement sees a growing cache.

The control compares *resident* growth with the bytes the dense cache added.  Peak RSS is no
control: it may have been set before the 10k mark (imports, the first chunks), so a dense run's
peak can grow by less than its cache (it did on CI: 56.5 MiB against 78 MiB of new KV)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

STREAM = r"""
import ctypes, gc, json, resource, sys
import torch
from transformers import DynamicCache
sys.path.insert(0, sys.argv[1])
from models import tiny_model
from swa_patch import make_cache, patch_model

torch.set_num_threads(1)
mode, total = sys.argv[2], int(sys.argv[3])
model = tiny_model("llama", num_key_value_heads=4, head_dim=64)        # 4 KiB of KV per token per layer
if mode == "window":
    patch_model(model, window=64, sinks=4, backend="sdpa")
cache = make_cache(model) if mode == "window" else DynamicCache(config=model.config)
ids = torch.randint(3, 97, (1, 1000), generator=torch.Generator().manual_seed(0))
try:                                         # glibc: hand freed heap pages back before reading RSS,
    trim = ctypes.CDLL("libc.so.6").malloc_trim    # so RSS counts live memory, not the allocator's
except (OSError, AttributeError):                  # free lists (which wander by ~10 MiB run to run)
    trim = lambda pad: 0
def rss():                                   # MiB resident now, and the peak so far (Linux)
    gc.collect()
    trim(0)
    with open("/proc/self/status") as f:
        now = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return now / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
marks, kv_mib = {}, {}
with torch.no_grad():
    for step in range(total // 1000):
        model(ids.roll(step, 1), cache=cache)
        if (step + 1) * 1000 in (10_000, total):
            marks[(step + 1) * 1000] = rss()
            kv_mib[(step + 1) * 1000] = sum(t.nbytes for layer in cache.layers
                                            for t in (layer.keys, layer.values)) / 2**20
print(json.dumps({"tokens": cache.get_seq_length(), "rss_mib": marks, "kv_mib": kv_mib}))
"""


def _stream(mode: str, total: int) -> dict:
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "131072"}   # glibc: a fixed threshold, so a freed tensor is unmapped
                                                # at once (the default threshold adapts as tensors are freed)
    out = subprocess.run([sys.executable, "-c", STREAM, str(tests), mode, str(total)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _growth(run: dict) -> tuple[float, float]:
    """(resident, peak) MiB gained from 10k to 100k tokens."""
    (now_10k, peak_10k), (now_100k, peak_100k) = run["rss_mib"]["10000"], run["rss_mib"]["100000"]
    return now_100k - now_10k, peak_100k - peak_10k


def test_streaming_100k_tokens_keeps_resident_memory_flat():
    dense = _stream("dense", 30_000)                      # the control: 20k more tokens, ~78 MiB of KV
    dense_kv = dense["kv_mib"]["30000"] - dense["kv_mib"]["10000"]
    dense_now = dense["rss_mib"]["30000"][0] - dense["rss_mib"]["10000"][0]
    assert dense_now > 0.5 * dense_kv, (f"the measurement cannot see a growing cache: resident memory "
                                        f"grew {dense_now:.1f} MiB while the dense cache grew {dense_kv:.1f} MiB")
    # A cache that kept even 3 % of the 90k tokens would hold 3 % of what a dense cache adds over them.
    bound = 0.03 * dense_kv * 90_000 / 20_000
    runs = [_stream("window", 100_000)]
    assert runs[0]["tokens"] == 100_000
    if max(_growth(runs[0])) >= bound:     # RSS also moves with the allocator (once in ~5 full-suite runs
        runs.append(_stream("window", 100_000))   # here); a cache that keeps tokens grows in every run
    now, peak = (min(g[i] for g in map(_growth, runs)) for i in (0, 1))
    seen = f"(window {[r['rss_mib'] for r in runs]}, dense {dense['rss_mib']}, bound {bound:.1f} MiB)"
    assert now < bound, f"resident memory grew {now:.1f} MiB from 10k to 100k tokens {seen}"
    assert peak < bound, f"peak RSS grew {peak:.1f} MiB from 10k to 100k tokens {seen}"
