"""Dilated vs undilated sliding-window prefill, side by side in one run; and the reach it buys.

1. Forward time of one attention call at n=16k, W=512, d=1 vs d=4, for the sdpa (chunked
   band) and flex (block mask) backends: 8 heads, head dim 64, fp32, CPU.  Runs are
   interleaved (d=1, d=4, d=1, ...) so machine noise hits both; the ratio d=4 / d=1 of the
   medians is the figure (target: <= 1.5).  Also the number of blocks each flex block mask
   touches (the residue permutation keeps a dilated band as sparse as an undilated one).
   A per-head layer (default: 8 heads at d = 1/1/2/2/4/4/8/8) is timed the same way.
2. The receptive field of 24 layers of W=512 with dilation 1/2/4/8 by quarter vs undilated,
   and with every layer's heads dilated 1/1/2/2/4/4/8/8, from swa_patch.receptive_field,
   confirmed by the gradient check on a tiny model with the same shape of schedule (24
   layers, W=4): the last position's output has a non-zero gradient with respect to exactly
   the input embeddings inside the computed field.

    PYTHONPATH=. python benchmarks/dilation.py [--n 16384] [--repeats 5] [--out benchmarks/results]

Writes dilation.csv, dilation.png, receptive.csv, reach.png under --out.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from swa_patch import patch_model, receptive_field, unpatch_model
from swa_patch.attention import LayerPlan, MaskInfo, run_plan
from swa_patch.masks import LayerSpec
from swa_patch.receptive import layer_reach, plot_reach, reachable_positions

BACKENDS = ("sdpa", "flex")


def _label(dilation) -> str:
    return str(dilation) if isinstance(dilation, int) else "/".join(map(str, dilation))


def time_attention(args):
    """Each setting through the registered attention function (so per-head dilation pays its
    head grouping), runs interleaved; the ratio is to the first setting (d=1)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.n, args.head_dim) for _ in range(3))
    scale = args.head_dim ** -0.5
    settings = list(args.dilations) + ([tuple(args.head_dilations)] if args.head_dilations else [])
    rows = []
    for name in BACKENDS:
        calls, blocks = {}, {}
        for d in settings:
            spec = LayerSpec(args.window, d, 0)
            info = MaskInfo(0, None)
            calls[d] = (lambda plan=LayerPlan(spec, name), i=info: run_plan(plan, q, k, v, i, scaling=scale))
            with torch.no_grad():
                calls[d]()                                    # warm-up: compile, block masks
            blocks_of = {}   # per layer spec, summed over the fixed-shape chunks of an undilated window
            for key, bm in info.memo.items():
                if key[0] in ("flex", "flex-chunk"):
                    blocks_of[key[1]] = blocks_of.get(key[1], 0) + int(bm.kv_num_blocks.sum()
                                                                      + bm.full_kv_num_blocks.sum())
            if blocks_of:   # per head (a mask serves every head of its group): comparable across rows
                groups = spec.head_groups(args.heads)
                blocks[d] = round(sum(blocks_of[g] * len(h) for g, h in groups) / args.heads)
        times = {d: [] for d in settings}
        with torch.no_grad():
            for _ in range(args.repeats):
                for d in settings:
                    start = time.perf_counter()
                    calls[d]()
                    times[d].append(time.perf_counter() - start)
        base = statistics.median(times[settings[0]])
        for d in settings:
            med = statistics.median(times[d])
            rows.append(dict(backend=name, dilation=_label(d), n=args.n, window=args.window, heads=args.heads,
                             head_dim=args.head_dim, dtype="float32", threads=torch.get_num_threads(),
                             repeats=args.repeats, median_s=round(med, 4), min_s=round(min(times[d]), 4),
                             ratio_vs_d1=round(med / base, 3), flex_blocks=blocks.get(d, "")))
            print(f"{name:5s} d={_label(d)}: median {med:.3f} s  min {min(times[d]):.3f} s  "
                  f"ratio vs d={_label(settings[0])} {med / base:.2f}x"
                  + (f"  blocks {blocks[d]}" if d in blocks else ""))
    return rows


def reach_rows(args):
    """Receptive fields of the 24-layer schedules, and the gradient check scaled down."""
    from tests.models import tiny_model   # tiny random models of the test suite

    config = tiny_model("llama", num_hidden_layers=2).config
    config.num_hidden_layers = 24
    rows = []
    dilated = receptive_field(config, window=args.window, schedule="local-to-dilated")
    plain = receptive_field(config, window=args.window)
    print(f"24 layers, W={args.window}: dilation 1/2/4/8 by quarter reaches {dilated} tokens, "
          f"undilated {plain} ({dilated / plain:.2f}x); formula 6*(W-1)*15+1 = {6 * (args.window - 1) * 15 + 1}")
    rows += [dict(check="formula", layers=24, window=args.window, schedule="local-to-dilated", reach=dilated),
             dict(check="formula", layers=24, window=args.window, schedule="uniform", reach=plain)]
    plot_reach(layer_reach(config, window=args.window, schedule="local-to-dilated"), str(args.out / "reach.png"),
               f"24 layers, W={args.window}: dilation 1/2/4/8 by quarter",
               baseline=layer_reach(config, window=args.window))

    heads = list(args.head_dilations or [1, 1, 2, 2, 4, 4, 8, 8])
    config.num_attention_heads, config.num_key_value_heads = len(heads), 2
    per_head = layer_reach(config, window=args.window, dilation=[heads] * 24)[-1]
    print(f"24 layers, W={args.window}, every layer's heads at d={_label(tuple(heads))}: reaches "
          f"{per_head.reach} tokens ({per_head.reachable} reachable, {per_head.holes} holes near the far edge)")
    rows.append(dict(check="formula", layers=24, window=args.window, schedule=f"per-head {_label(tuple(heads))}",
                     reach=per_head.reach, reachable=per_head.reachable))

    small_w = 4
    shape = dict(num_hidden_layers=24, dtype=torch.float64, initializer_range=0.2, hidden_size=16,
                 intermediate_size=16)
    checks = [("local-to-dilated", 300, dict(num_attention_heads=2, num_key_value_heads=1),
               dict(schedule="local-to-dilated")),
              ("uniform", 300, dict(num_attention_heads=2, num_key_value_heads=1), {}),
              (f"per-head {_label(tuple(heads))}", 620,
               dict(num_attention_heads=len(heads), num_key_value_heads=2, head_dim=4), dict(dilation=[heads] * 24))]
    for schedule, n, heads_shape, options in checks:
        model = tiny_model("llama", **shape, **heads_shape)
        computed = receptive_field(model, window=small_w, **options)
        patch_model(model, window=small_w, backend="sdpa", **options)
        try:
            torch.manual_seed(0)
            embeds = torch.randn(1, n, 16, dtype=torch.float64, requires_grad=True)
            hidden = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
            (grad,) = torch.autograd.grad(hidden[0, -1] @ torch.randn(16, dtype=torch.float64), embeds)
            support = (grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
            exact = support == reachable_positions(model, n)
        finally:
            unpatch_model(model)
        measured = n - support[0]
        print(f"gradient check, 24 layers W={small_w} {schedule}: computed {computed}, gradient non-zero "
              f"over the last {measured} of {n} positions ({len(support)} positions; "
              f"{'exactly' if exact else 'NOT'} the computed set)")
        rows.append(dict(check="gradient", layers=24, window=small_w, schedule=schedule, reach=computed,
                         reachable=len(support), gradient_reach=measured, gradient_matches_set=exact))
    return rows


def write_csv(path, rows):
    from swa_patch.provenance import run_info
    rows = [{**row, **run_info()} for row in rows]
    fields = sorted({key for row in rows for key in row}, key=lambda k: list(rows[0]).index(k)
                    if k in rows[0] else 99)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot_times(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    per_head = ["/" in r["dilation"] for r in rows]
    labels = [f"{r['backend']}\n{'per head' if ph else 'd='}{r['dilation'] if not ph else ''}"
              for r, ph in zip(rows, per_head)]
    bars = ax.bar(labels, [r["median_s"] for r in rows],
                  color=["tab:green" if ph else "tab:blue" if r["dilation"] == "1" else "tab:orange"
                         for r, ph in zip(rows, per_head)])
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['ratio_vs_d1']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom")
    r0 = rows[0]
    heads = next((r["dilation"] for r, ph in zip(rows, per_head) if ph), None)
    ax.set_ylabel("forward time, median (s)")
    ax.set_title(f"n={r0['n']}, W={r0['window']}, {r0['heads']} heads x {r0['head_dim']}, fp32, CPU "
                 f"({r0['threads']} threads)" + (f"; per head: d={heads}" if heads else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dilations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--head-dilations", type=int, nargs="*", default=[1, 1, 2, 2, 4, 4, 8, 8],
                        help="one dilation per head, timed as a per-head layer (empty: skip)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_timing:
        rows = time_attention(args)
        write_csv(args.out / "dilation.csv", rows)
        plot_times(rows, args.out / "dilation.png")
    write_csv(args.out / "receptive.csv", reach_rows(args))
    print(f"wrote {args.out}/dilation.csv, dilation.png, receptive.csv, reach.png")


if __name__ == "__main__":
    main()
