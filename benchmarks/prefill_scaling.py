"""Prefill scaling: block-sparse band attention vs dense causal SDPA vs transformers' own
mask-based sliding window, measured side by side in one run.

Attention level: n in {2k..32k}, W=512, 8 heads, head dim 64, fp32, batch 1; forward and
forward+backward seconds and peak process memory (each case in a fresh process).
Model level: prefill of a SmolLM2-135M-shaped random Llama (30 layers) at 16k tokens with
W=1024 (and at 512 tokens, n <= W) against the unpatched model and a Mistral of the same
shape with ``sliding_window=1024`` (transformers' mask-based window).

    python benchmarks/prefill_scaling.py [--quick]      # -> results/prefill_*.csv, *.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, peak_rss_mb, print_table, run_isolated, timed, write_csv  # noqa: E402

HEADS, HEAD_DIM, WINDOW = 8, 64, 512
METHODS = ["dense_sdpa", "hf_sliding_mask", "swa_sdpa", "swa_flex", "swa_eager"]


# ---- one attention-level case, run in a child process ----------------------------------
def attention_fn(method: str, n: int):
    from swa_patch.attention import MaskInfo, contiguous_layout
    from swa_patch.backends import BACKEND_MODULES
    from swa_patch.masks import LayerSpec
    spec, scale = LayerSpec(WINDOW), HEAD_DIM ** -0.5
    if method == "dense_sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if method == "hf_sliding_mask":
        from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function
        def hf(q, k, v):   # what transformers' sdpa path does for Mistral(sliding_window=W)
            mask = sdpa_mask(batch_size=1, q_length=n, kv_length=n, allow_is_causal_skip=False,
                             mask_function=sliding_window_causal_mask_function(WINDOW), device=q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return hf
    backend = BACKEND_MODULES[method.removeprefix("swa_")]
    def ours(q, k, v):   # a new MaskInfo per call: the block mask is built inside the timed region,
        info = MaskInfo(0, None)      # as the hf mask above is (a model builds each once per forward)
        return backend.attend(q, k, v, contiguous_layout(info, q, k, v, spec), spec, scale)
    return ours


def one_attention_case(method: str, n: int, mode: str) -> dict:
    torch.manual_seed(0)
    grad = mode == "fwd+bwd"
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, requires_grad=grad) for _ in range(3))
    fn = attention_fn(method, n)
    def step():
        if grad:
            fn(q, k, v).sum().backward()
        else:
            with torch.no_grad():
                fn(q, k, v)
    base = peak_rss_mb()
    seconds = timed(step, reps=3 if n <= 16384 else 1)
    return {"seconds": seconds, "peak_mb": peak_rss_mb() - base}


# ---- one model-level case ----------------------------------------------------------------
def smollm2_shape(model_type: str, **extra):
    from transformers import AutoConfig
    return AutoConfig.for_model(model_type, vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                max_position_embeddings=32768, tie_word_embeddings=True, **extra)


MODEL_METHODS = ["dense_sdpa", "hf_sliding_mask", "swa_auto", "swa_sdpa", "swa_flex"]
# Rounds of the short (n <= 4096) model prefill, best kept: a 512-token prefill takes ~1 s and
# this machine's noise is ~10 % per call; with 5 rounds the same kernel once measured 0.93x
# and, in 12 rounds of an ad-hoc run, 0.985x.
MODEL_ROUNDS = 15


def model_cases(n: int, rounds: int) -> dict:
    """Seconds per method for one prefill of ``n`` tokens: one Llama that is patched and unpatched
    in turn (and a Mistral twin for transformers' own window), rounds interleaved, best kept.
    Every other round runs in reverse order, so no method always follows the same one: with a
    fixed order, ``auto`` (always right after transformers' window, which frees ~5 GB) once came
    out 14 % slower than the very same kernel under the name ``sdpa``."""
    from transformers import AutoModelForCausalLM
    from swa_patch import patch_model, unpatch_model
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(smollm2_shape("llama"), attn_implementation="sdpa").eval()
    mistral = AutoModelForCausalLM.from_config(smollm2_shape("mistral", sliding_window=1024),
                                               attn_implementation="sdpa").eval()
    mistral.load_state_dict(llama.state_dict())
    ids = torch.randint(0, 49152, (1, n))

    def prefill(model):
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)

    best = {m: float("inf") for m in MODEL_METHODS}
    for method in MODEL_METHODS[2:]:                  # warm-up: flex compiles once per shape
        patch_model(llama, window=1024, backend=method.removeprefix("swa_"))
        prefill(llama)
        unpatch_model(llama)
    for r in range(rounds):
        for method in MODEL_METHODS if r % 2 == 0 else MODEL_METHODS[::-1]:
            model = mistral if method == "hf_sliding_mask" else llama
            if method.startswith("swa_"):
                patch_model(llama, window=1024, backend=method.removeprefix("swa_"))
            best[method] = min(best[method], timed(lambda: prefill(model), reps=1, warmup=0))
            unpatch_model(llama)
    return {"seconds": best, "peak_mb": peak_rss_mb()}


# ---- driver --------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n up to 8k, model level at 4k")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the CSV")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plot_only:
        return plot(_read_rows(), os.path.join(RESULTS, "prefill_scaling.png"))
    if args.child:
        kind, method, n, *mode = args.child
        result = (one_attention_case(method, int(n), mode[0]) if kind == "attn"
                  else model_cases(int(n), int(method)))
        print(json.dumps(result))
        return
    sizes = [2048, 4096, 8192] if args.quick else [2048, 4096, 8192, 16384, 32768]
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        for n in sizes:
            dense = None
            for method in METHODS:
                if method == "swa_eager" and n > 4096 or method == "swa_flex" and mode == "fwd+bwd":
                    continue     # eager materialises n^2 scores; flex has no CPU backward
                r = run_isolated(__file__, ["--child", "attn", method, str(n), mode])
                if dense is None and method != "dense_sdpa":
                    raise RuntimeError("dense_sdpa must run first")
                dense = dense or r["seconds"]
                rows.append({"level": "attention", "mode": mode, "n": n, "window": WINDOW, "method": method,
                             **r, "speedup_vs_dense": dense / r["seconds"]})
                print_table(rows[-1:], list(rows[-1]))
    model_n = [512, 4096] if args.quick else [512, 16384]
    for n in model_n:
        r = run_isolated(__file__, ["--child", "model", str(MODEL_ROUNDS if n <= 4096 else 2), str(n)])
        dense = r["seconds"]["dense_sdpa"]
        for method, seconds in r["seconds"].items():
            rows.append({"level": "model", "mode": "prefill", "n": n, "window": 1024, "method": method,
                         "seconds": seconds, "peak_mb": None, "speedup_vs_dense": dense / seconds})
            print_table(rows[-1:], list(rows[-1]))
    order = METHODS + MODEL_METHODS
    rows.sort(key=lambda r: (r["level"] == "model", r["mode"] != "fwd", r["n"], order.index(r["method"])))
    path = os.path.join(RESULTS, "prefill_scaling.csv")
    write_csv(path, rows)
    print()
    print_table(rows, ["level", "mode", "n", "method", "seconds", "peak_mb", "speedup_vs_dense"])
    plot(rows, os.path.join(RESULTS, "prefill_scaling.png"))
    print(f"wrote {path} and prefill_scaling.png")


def _read_rows() -> list[dict]:
    import csv
    with open(os.path.join(RESULTS, "prefill_scaling.csv")) as f:
        rows = list(csv.DictReader(f))
    keep = ("level", "mode", "n", "window", "method", "seconds", "peak_mb", "speedup_vs_dense")
    rows = [{k: r[k] for k in keep} for r in rows]
    for r in rows:
        r["n"], r["window"] = int(r["n"]), int(r["window"])
        for k in ("seconds", "peak_mb", "speedup_vs_dense"):
            r[k] = float(r[k]) if r[k] not in ("", "None") else None
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (mode, metric) in zip(axes, [("fwd", "seconds"), ("fwd+bwd", "seconds"), ("fwd+bwd", "peak_mb")]):
        for color, method in enumerate(METHODS):
            pts = [(r["n"], r[metric]) for r in rows if r["level"] == "attention" and r["mode"] == mode
                   and r["method"] == method]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method, color=f"C{color}")
        ax.legend(fontsize=8)
        ax.set(xscale="log", yscale="log", xlabel="sequence length n",
               ylabel=metric, title=f"attention {mode}: {metric} (W={WINDOW}, 8 heads, d=64)")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
