"""Markdown results tables for the README, read from benchmarks/results/*.csv.

    python benchmarks/report.py > /tmp/results.md
"""
from __future__ import annotations

import csv
import os

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def rows(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def f(x, digits=2):
    return f"{float(x):.{digits}f}"


def table(header, body):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def prefill():
    data = rows("prefill_scaling.csv")
    out = []
    for mode in ("fwd", "fwd+bwd"):
        sizes = sorted({int(r["n"]) for r in data if r["level"] == "attention" and r["mode"] == mode})
        methods = [m for m in ("dense_sdpa", "hf_sliding_mask", "swa_sdpa", "swa_flex", "swa_eager")
                   if any(r["method"] == m and r["mode"] == mode for r in data)]
        body = []
        for n in sizes:
            cell = {r["method"]: r for r in data if r["level"] == "attention" and r["mode"] == mode and int(r["n"]) == n}
            body.append([n] + [f"{f(cell[m]['seconds'], 3)} s ({f(cell[m]['speedup_vs_dense'], 1)}x, "
                               f"{f(cell[m]['peak_mb'], 0)} MB)" if m in cell else "–" for m in methods])
        out.append(f"Attention {mode}, W=512, 8 heads, head dim 64, fp32 (seconds, speed-up vs dense causal "
                   f"SDPA, peak MB above baseline):\n\n" + table(["n"] + methods, body))
    model = [r for r in data if r["level"] == "model"]
    if model:
        body = [[r["n"], r["method"], f(r["seconds"], 2), f(r["speedup_vs_dense"], 2)] for r in model]
        out.append("Model-level prefill, SmolLM2-135M-shaped random Llama (30 layers), W=1024 "
                   "(`hf_sliding_mask`: a Mistral of the same shape with `sliding_window=1024`):\n\n"
                   + table(["tokens", "method", "seconds", "speed-up vs unpatched"], body))
    return "\n\n".join(out)


def decode():
    data = rows("cache_decode.csv")
    body = [[r["metric"], r["method"], r["position"], f(r["value"], 2),
             f(r["ratio_vs_2k"], 2) if r["ratio_vs_2k"] else (f(r["ratio_vs_10k"], 3) if r["ratio_vs_10k"] else ""),
             f(r["kv_cache_mb"], 1)] for r in data]
    return table(["metric", "method", "tokens", "value", "ratio to first", "KV MiB"], body)


def stream():
    data = rows("stream_smollm2_40k.csv")
    if not data:
        return ""
    by = {}
    for r in data:
        by.setdefault(r["mode"], []).append(r)
    dense_4k = [r for r in by.get("dense", []) if r["tokens"] == "4096"]
    body = []
    for mode, rs in by.items():
        last = rs[-1]
        body.append([mode, last["tokens"], f(last["ppl"], 3), f(int(last["kv_bytes"]) / 2**20, 1), f(last["tokens_per_s"], 0)])
    text = table(["mode", "tokens streamed", "cumulative ppl", "KV MiB", "tokens/s (chunk 512)"], body)
    if dense_4k and "sinks" in by:
        ratio = float(by["sinks"][-1]["ppl"]) / float(dense_4k[0]["ppl"])
        text += f"\n\nsinks at {by['sinks'][-1]['tokens']} tokens / dense at 4,096 tokens: {ratio:.3f}"
    return text


def num(x):
    """Integers as they are, other numbers with 3 significant decimals."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return x
    if v.is_integer() and "." not in str(x):
        return str(int(v))
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.3f}"


def simple(name, columns):
    data = rows(name)
    return table(columns, [[num(r[c]) for c in columns] for r in data]) if data else ""


def train():
    data = rows("train_step.csv")
    cell = {(r["mode"], r["metric"], r["seq_len"]): float(r["value"]) for r in data}
    body = []
    for n in sorted({r["seq_len"] for r in data}, key=int):
        d, w = cell[("dense", "step_s", n)], cell[("window", "step_s", n)]
        body.append([n, f(d, 1), f(w, 1), f(d / w, 2), f(cell[("dense", "peak_mb", n)], 0),
                     f(cell[("window", "peak_mb", n)], 0)])
    return table(["tokens", "dense step s", "window step s", "speed-up", "dense peak MB", "window peak MB"], body)


def varying_prompts():
    """Total wall time of prompts of many lengths, compiles included, auto vs the sdpa band."""
    data = rows("varying_prompts.csv")
    if not data:
        return ""
    sdpa, auto = (sum(float(r[c]) for r in data) for c in ("sdpa_s", "auto_s"))
    first = data[0]
    body = [[len(data), f"{min(int(r['tokens']) for r in data)}–{max(int(r['tokens']) for r in data)}",
             f(sdpa, 1), f(auto, 1), f(auto / sdpa, 3), f(max(float(r["auto_s"]) for r in data), 1)]]
    return (f"{first['layers']} layers, W={first['window']}, `{first['command']}` at {first['commit']}:\n\n"
            + table(["prompts", "tokens", "sdpa band total s", "auto total s", "auto / sdpa", "slowest auto prompt s"],
                    body))


def long_range():
    """The SWAA-style table: one row per configuration of benchmarks/long_range_study.py."""
    data = rows("long_range_study.csv")
    if not data:
        return ""
    lengths = [c.split("_")[1] for c in data[0] if c.startswith("passkey_") and not c.endswith("prompt_end")]
    prefill = next(c for c in data[0] if c.startswith("prefill_s_"))
    kv = next(c for c in data[0] if c.startswith("kv_mib_"))
    tokens = prefill.rsplit("_", 1)[1]
    header = (["configuration", "recall W/2", "recall 2W", "recall 8W", "reach (field)"]
              + [f"passkey {int(n) // 1024}k" for n in lengths]
              + ["held-out ppl", f"prefill {int(tokens) // 1024}k vs dense", f"KV MiB at {int(tokens) // 1024}k"])
    body = []
    for r in data:
        label = r["config"] + (f" + LoRA ({r['adapter']})" if r["adapter"] else "")
        keys = [r[f"passkey_{n}"] + (f" ({r[f'passkey_{n}_prompt_end']})" if r.get(f"passkey_{n}_prompt_end") else "")
                for n in lengths]
        body.append([label, r["recall_W/2"], r["recall_2W"], r["recall_8W"],
                     f"{r['effective_reach']} ({r['receptive_field']})", *keys, r["heldout_ppl"],
                     f"{float(r['prefill_speedup_vs_dense']):.2f}x", r[kv]])
    meta = data[0]
    return (f"SmolLM2-135M-Instruct, window {meta['window']}, `{meta['command']}` at {meta['commit']} "
            f"({meta['date']}, {meta['machine']}, torch {meta['torch']}, transformers {meta['transformers']}):\n\n"
            + table(header, body))


if __name__ == "__main__":
    print("### Prefill scaling\n\n" + prefill())
    print("\n### Decode with the rolling cache\n\n" + decode())
    print("\n### Streaming SmolLM2-135M\n\n" + stream())
    print("\n### Token by token vs attention_sinks 0.4\n\n" + simple(
        "attention_sinks_compare.csv", ["method", "tokens", "ppl", "tokens_per_s", "speedup_vs_attention_sinks"]))
    print("\n### Prompts of varying length through auto (compiles included)\n\n" + varying_prompts())
    print("\n### Compiled decode (static cache)\n\n" + simple(
        "compiled_decode.csv", ["method", "position", "compiled", "ms_per_token", "vs_eager_same_position",
                                "vs_unpatched_1k_same_mode"]))
    print("\n### Chunked vs token-by-token streaming evaluation\n\n" + simple(
        "stream_chunked_vs_tbt.csv", ["chunk", "tokens", "ppl", "seconds", "tokens_per_s", "speedup_vs_token_by_token"]))
    print("\n### Dilation\n\n" + simple("dilation.csv", ["backend", "dilation", "n", "window", "median_s", "ratio_vs_d1"]))
    print("\n### LoRA training step (SmolLM2 shape, 2 layers, vocab 8192, W=1024)\n\n" + train())
    print("\n### Long-range quality (SWAA reproduced)\n\n" + long_range())
    from swa_patch.export import rules_table
    print("\n### Serving: what each engine keeps\n\n" + rules_table())
    print("\n### SmolLM2-135M window fine-tune (held-out perplexity)\n\n" + simple(
        "smollm2_window_finetune.csv", ["source", "condition", "heldout_perplexity", "window", "sinks", "seq_len", "steps"]))
