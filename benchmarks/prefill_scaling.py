"""Prefill scaling: block-sparse band attention vs dense causal SDPA vs transformers' own
mask-based sliding window, measured side by side in one run.

Attention level: n in {2k..32k}, W=512, 8 heads, head dim 64, fp32, batch 1; forward and
forward+backward seconds, and peak process memory (each case's memory in a fresh process).
Model level: prefill of a SmolLM2-135M-shaped random Llama (30 layers) at 16k tokens with
W=1024 (and at 512 tokens, n <= W) against the unpatched model and a Mistral of the same
shape with ``sliding_window=1024`` (transformers' mask-based window).

Timing: every method of one comparison (one n, one mode) runs in one process, warmed up alike
(one call each, reported as ``warmup_s``: it holds flex's compile), then in paired rounds
(``common.paired_rounds``): ``seconds`` is the median over rounds with ``min_s``/``max_s``, and
``speedup_vs_dense`` the median of the per-round ratios dense / method, with its min and max.

    python benchmarks/prefill_scaling.py [--quick]      # -> results/prefill_scaling.csv, .png
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, paired_rounds, peak_rss_mb, print_table, run_isolated, write_csv  # noqa: E402

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


def attention_step(method: str, n: int, mode: str):
    """One call of ``method`` on fixed random q, k, v of length ``n`` (with backward for fwd+bwd)."""
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
    return step


def attention_methods(n: int, mode: str) -> list[str]:
    """The methods compared at ``n``: eager materialises n^2 scores; flex has no CPU backward."""
    return [m for m in METHODS if not (m == "swa_eager" and n > 4096 or m == "swa_flex" and mode == "fwd+bwd")]


def attention_timing(n: int, mode: str, rounds: int) -> dict:
    """Every method at ``n`` in this one process, paired rounds against dense causal SDPA."""
    steps = {m: attention_step(m, n, mode) for m in attention_methods(n, mode)}
    return paired_rounds(steps, rounds, baseline="dense_sdpa")


def attention_memory(method: str, n: int, mode: str) -> dict:
    """Peak resident growth of one call, in a fresh process so the peak is this method's own."""
    step = attention_step(method, n, mode)
    base = peak_rss_mb()
    step()
    return {"peak_mb": peak_rss_mb() - base}


# ---- one model-level case ----------------------------------------------------------------
def smollm2_shape(model_type: str, **extra):
    from transformers import AutoConfig
    return AutoConfig.for_model(model_type, vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                max_position_embeddings=32768, tie_word_embeddings=True, **extra)


MODEL_METHODS = ["dense_sdpa", "hf_sliding_mask", "swa_auto", "swa_sdpa", "swa_flex"]
# Paired rounds of the model prefill: a 512-token prefill takes ~0.5 s on noise of ~10 % per call,
# so the short case (the "no slowdown" target) gets many; a 16k round takes ~4 minutes.
MODEL_ROUNDS = {512: 15, 4096: 7, 16384: 5}


def model_timing(n: int, rounds: int) -> dict:
    """One prefill of ``n`` tokens per method: one Llama, patched per method and unpatched for
    dense (patching is outside the timed call), and a Mistral twin with the same weights for
    transformers' own window; every method warmed up, then paired rounds against the unpatched
    model.  Alternating the order matters: with a fixed one, ``auto`` (always right after
    transformers' window, which frees ~5 GB) once came out 14 % slower than the very same kernel
    under the name ``sdpa``."""
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

    def prepare(method):
        unpatch_model(llama)          # a no-op on the unpatched model
        if method.startswith("swa_"):
            patch_model(llama, window=1024, backend=method.removeprefix("swa_"))

    fns = {m: (lambda: prefill(mistral)) if m == "hf_sliding_mask" else (lambda: prefill(llama))
           for m in MODEL_METHODS}
    return paired_rounds(fns, rounds, baseline="dense_sdpa", prepare=prepare)


# ---- driver --------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n up to 8k, model level at 4k, 3 rounds (a dry run)")
    parser.add_argument("--csv", default=os.path.join(RESULTS, "prefill_scaling.csv"),
                        help="where to write the CSV (the PNG goes beside it)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the CSV")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    png = os.path.splitext(args.csv)[0] + ".png"
    if args.plot_only:
        return plot(_read_rows(args.csv), png)
    if args.child:
        kind, *rest = args.child
        child = {"attn-time": lambda n, mode, rounds: attention_timing(int(n), mode, int(rounds)),
                 "attn-mem": lambda method, n, mode: attention_memory(method, int(n), mode),
                 "model": lambda n, rounds: model_timing(int(n), int(rounds))}[kind]
        print(json.dumps(child(*rest)))
        return
    sizes = [2048, 4096, 8192] if args.quick else [2048, 4096, 8192, 16384, 32768]
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        for n in sizes:
            rounds = 3 if args.quick else 7 if n <= 16384 else 5
            timing = run_isolated(__file__, ["--child", "attn-time", str(n), mode, str(rounds)])
            for method, t in timing.items():
                memory = run_isolated(__file__, ["--child", "attn-mem", method, str(n), mode])
                rows.append(row("attention", mode, n, WINDOW, method, t, memory["peak_mb"]))
                print_table(rows[-1:], list(rows[-1]))
    for n in [512, 4096] if args.quick else [512, 16384]:
        timing = run_isolated(__file__, ["--child", "model", str(n), str(3 if args.quick else MODEL_ROUNDS[n])])
        for method, t in timing.items():
            rows.append(row("model", "prefill", n, 1024, method, t, None))
            print_table(rows[-1:], list(rows[-1]))
    order = METHODS + MODEL_METHODS
    rows.sort(key=lambda r: (r["level"] == "model", r["mode"] != "fwd", r["n"], order.index(r["method"])))
    write_csv(args.csv, rows)
    print()
    print_table(rows, ["level", "mode", "n", "method", "seconds", "min_s", "max_s", "warmup_s", "peak_mb",
                       "speedup_vs_dense", "speedup_min", "speedup_max"])
    plot(rows, png)
    print(f"wrote {args.csv} and {png}")


def row(level, mode, n, window, method, t: dict, peak_mb) -> dict:
    """One CSV row from :func:`common.paired_rounds`' result ``t`` for ``method``."""
    return {"level": level, "mode": mode, "n": n, "window": window, "method": method,
            "seconds": t["seconds"], "min_s": t["min_s"], "max_s": t["max_s"], "warmup_s": t["warmup_s"],
            "rounds": t["rounds"], "peak_mb": peak_mb, "speedup_vs_dense": t["speedup"],
            "speedup_min": t["speedup_min"], "speedup_max": t["speedup_max"]}


def _read_rows(path) -> list[dict]:
    import csv
    with open(path) as f:
        rows = list(csv.DictReader(f))
    numbers = ("seconds", "min_s", "max_s", "peak_mb", "speedup_vs_dense")
    rows = [{k: r[k] for k in ("level", "mode", "n", "window", "method", *numbers)} for r in rows]
    for r in rows:
        r["n"], r["window"] = int(r["n"]), int(r["window"])
        for k in numbers:
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
            if pts and metric == "seconds":     # the spread over paired rounds
                spread = [(r["n"], r["min_s"], r["max_s"]) for r in rows if r["level"] == "attention"
                          and r["mode"] == mode and r["method"] == method]
                ax.fill_between(*zip(*spread), color=f"C{color}", alpha=0.25)
        ax.legend(fontsize=8)
        ax.set(xscale="log", yscale="log", xlabel="sequence length n",
               ylabel=metric, title=f"attention {mode}: {metric} (W={WINDOW}, 8 heads, d=64)"
               + ("\nmedian of paired rounds, band min–max" if metric == "seconds" else ""))
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
