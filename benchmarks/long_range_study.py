"""The SWAA study (arXiv 2512.10411) reproduced on SmolLM2-135M-Instruct, in one run.

    PYTHONPATH=. python benchmarks/long_range_study.py            # ~2-3 h on 2 CPU cores
    PYTHONPATH=. python benchmarks/long_range_study.py --quick    # a minutes-long dry run

1. Splits ``pydoc_data.topics`` by topic into training text and held-out text.
2. Trains two LoRA adapters on the windowed model (``--train-config``) with
   ``recipes/finetune_lora.py`` through ``accelerate launch``, on the same steps, data and seed:
   plain cross-entropy, and self-distillation (``--distill``: teacher = the same weights,
   adapter off, window off).
3. For every row (``--rows``: a configuration of ``swa_patch.retrieval``, ``@ce`` or
   ``@distill`` for the adapter merged in), on the held-out text: copy-probe recall at
   D = W/2 ... (effective reach beside the receptive field), passkey accuracy per haystack
   length (decode="full" rows: boundary at the question, and again at the prompt end),
   windowed held-out perplexity; and, once per attention configuration, the model
   prefill time of a 16k-token prompt through the default generate() cache (relative to the
   unpatched model) and the KV-cache bytes it leaves.

Writes ``benchmarks/results/long_range_study.csv`` (one row per configuration, with the
command, commit, machine and versions), ``long_range_study_probes.csv`` (every copy distance
and passkey trial) and ``long_range_study.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402

from common import RESULTS, provenance  # noqa: E402

PROMPT_END = " [prompt end]"      # passkey of decode-full rows with the boundary at the prompt end
DEFAULT_ROWS = ("dense,window,sinks,sinks+full-layers:4,sinks+decode-full,sinks@ce,sinks@distill,"
                "sinks+decode-full+full-layers:4,sinks+decode-full+full-layers:4@distill")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated CONFIG[@ce|@distill]")
    p.add_argument("--distances", default=None, help="copy distances (default W/2, W, 2W, 4W, 8W, 16W, 24W)")
    p.add_argument("--span", type=int, default=64)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--passkey-lengths", default="1024,2048,4096")
    p.add_argument("--prefill-tokens", type=int, default=16384)
    p.add_argument("--ppl-blocks", type=int, default=8, help="held-out blocks of --seq-len for perplexity")
    p.add_argument("--steps", type=int, default=60, help="LoRA optimizer steps (both runs)")
    p.add_argument("--seq-len", type=int, default=1024, help="LoRA training sequence length")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--distill-alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--train-config", default="sinks", help="the configuration LoRA trains on")
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--reuse-adapters", action="store_true",
                   help="use the adapters an earlier run left in --work (same settings) instead of training anew; "
                        "their training minutes are read from the recipe's metrics log")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/swa_long_range_study")
    p.add_argument("--out", default=os.path.join(RESULTS, "long_range_study"), help="path stem of the outputs")
    p.add_argument("--probe-backend", default="sdpa",
                   help="backend of the probes (results are backend-independent; sdpa compiles nothing)")
    p.add_argument("--time-config", default=None, help=argparse.SUPPRESS)   # child: time one configuration
    p.add_argument("--quick", action="store_true", help="a dry run: tiny grid, 2 steps, short prefill")
    args = p.parse_args()
    if args.quick:
        args.distances = args.distances or "128,512"
        args.trials, args.steps, args.seq_len, args.ppl_blocks = 1, 2, 256, 2
        args.passkey_lengths, args.prefill_tokens = "512", 2048
        args.out = os.path.join(args.work, "long_range_study_quick")
    return args


def split_text(work: str, heldout_fraction: float) -> tuple[str, str]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    cut = int(len(keys) * (1 - heldout_fraction))
    os.makedirs(work, exist_ok=True)
    paths = os.path.join(work, "train.txt"), os.path.join(work, "heldout.txt")
    for path, part in zip(paths, (keys[:cut], keys[cut:])):
        with open(path, "w") as f:
            f.write("\n\n".join(topics[k] for k in part))
    return paths


def train_adapter(args, kind: str, train: str, held: str) -> tuple[str, float]:
    """One LoRA run of the recipe; both runs share everything but ``--distill``."""
    from swa_patch.models import smollm2_files
    from swa_patch.retrieval import config_options

    folder, gguf = smollm2_files()
    options = config_options(args.train_config, args.window, args.sinks, 30)
    out = os.path.join(args.work, f"lora_{kind}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "recipes", "accelerate", "cpu_1proc.yaml"), os.path.join(ROOT, "recipes", "finetune_lora.py"),
           "--model", str(folder), "--gguf-file", gguf, "--dataset", train, "--eval-dataset", held,
           "--window", str(options["window"]), "--sinks", str(options["sinks"]), "--seq-len", str(args.seq_len),
           "--max-steps", str(args.steps), "--lr", str(args.lr), "--warmup-steps", str(max(1, args.steps // 10)),
           "--eval-batches", str(args.ppl_blocks), "--eval-every", "0", "--save-every", "0",
           "--train-embeddings-norms", "--no-gradient-checkpointing", "--seed", "0", "--output", out]
    if kind == "distill":
        cmd += ["--distill", "--distill-alpha", str(args.distill_alpha), "--temperature", str(args.temperature)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    print(f"training LoRA ({kind}): {args.steps} steps of {args.seq_len} tokens", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return out, (time.perf_counter() - start) / 60


def logged_minutes(adapter_dir: str) -> float:
    """Minutes between the first and last record of the recipe's metrics log."""
    with open(os.path.join(adapter_dir, "logs", "metrics.jsonl")) as f:
        times = [json.loads(line)["time"] for line in f if '"time"' in line]
    return (max(times) - min(times)) / 60


def load_variant(adapter_dir: str | None):
    """SmolLM2 as loaded, or with a LoRA adapter merged in; unpatched either way."""
    import swa_patch
    from swa_patch.models import load_model

    model, tokenizer = load_model()
    if adapter_dir is None:
        return model, tokenizer
    merged = swa_patch.from_pretrained(adapter_dir).merge_and_unload().eval()
    return swa_patch.unpatch_model(merged), tokenizer


def heldout_ppl(model, blocks: torch.Tensor) -> float:
    import torch.nn.functional as F
    with torch.no_grad():
        losses = [F.cross_entropy(model(row[None], use_cache=False).logits[0, :-1].float(), row[1:]) for row in blocks]
    return math.exp(torch.stack(losses).mean().item())


def time_prefill(args) -> None:
    """Child process: one ``--prefill-tokens`` prefill of ``--time-config`` (backend 'auto', as
    users run it) through the cache generate() would use, after a warm-up call of the same
    shape for patched models (it may compile flex kernels: compile time is excluded); prints
    ``{"seconds", "kv_bytes"}``.  A fresh process per configuration: its own compile budget."""
    from transformers import DynamicCache

    from swa_patch import make_cache, patch_model
    from swa_patch.models import load_model
    from swa_patch.retrieval import config_options
    from swa_patch.streaming import cache_bytes

    model, _ = load_model()
    options = config_options(args.time_config, args.window, args.sinks, model.config.num_hidden_layers)
    if options is not None:
        patch_model(model, **options)
    ids = torch.randint(3, 40_000, (1, args.prefill_tokens), generator=torch.Generator().manual_seed(0))
    fresh = lambda: make_cache(model) if options is not None else DynamicCache(config=model.config)
    with torch.no_grad():
        if options is not None:
            model(ids, cache=fresh(), logits_to_keep=1)
        cache = fresh()
        start = time.perf_counter()
        model(ids, cache=cache, logits_to_keep=1)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "kv_bytes": cache_bytes(cache)}))


def prefill(args, config: str) -> tuple[float, int]:
    cmd = [sys.executable, os.path.abspath(__file__), "--time-config", config, "--window", str(args.window),
           "--sinks", str(args.sinks), "--prefill-tokens", str(args.prefill_tokens), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"timing {config} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"prefill {args.prefill_tokens} tokens, {config}: {result['seconds']:.2f} s", flush=True)
    return result["seconds"], result["kv_bytes"]


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.time_config:
        return time_prefill(args)
    from swa_patch import patch_model, unpatch_model
    from swa_patch.retrieval import (config_options, copy_probe, effective_reach, passkey, plot, recall_table,
                                     theoretical_reach, write_csv)

    rows = [r.strip() for r in args.rows.split(",")]
    parsed = [(r, *r.partition("@")[::2]) for r in rows]
    for _, config, adapter in parsed:
        config_options(config, args.window, args.sinks, 30)
        if adapter not in ("", "ce", "distill"):
            raise SystemExit(f"--rows: adapter must be @ce or @distill, got @{adapter}")
    distances = ([int(x) for x in args.distances.split(",")] if args.distances else
                 [args.window // 2, args.window, 2 * args.window, 4 * args.window, 8 * args.window,
                  16 * args.window, 24 * args.window])
    lengths = [int(x) for x in args.passkey_lengths.split(",") if x]
    timing = {config: prefill(args, config)         # first, while nothing else runs
              for config in dict.fromkeys(["dense", *(c for _, c, _ in parsed)])}
    train, held = split_text(args.work, args.heldout_fraction)
    adapters, minutes = {}, {}
    for kind in sorted({a for _, _, a in parsed if a}):
        earlier = os.path.join(args.work, f"lora_{kind}")
        if args.reuse_adapters and os.path.exists(os.path.join(earlier, "adapter_config.json")):
            adapters[kind], minutes[kind] = earlier, logged_minutes(earlier)
            print(f"reusing the LoRA adapter in {earlier} (trained in {minutes[kind]:.1f} min)", flush=True)
        else:
            adapters[kind], minutes[kind] = train_adapter(args, kind, train, held)

    copies, keys, results = [], [], []
    for adapter in dict.fromkeys(a for _, _, a in parsed):
        model, tokenizer = load_variant(adapters.get(adapter))
        ids = tokenizer(open(held).read(), return_tensors="pt").input_ids[0]
        n_blocks = ids.numel() // args.seq_len
        blocks = ids[: n_blocks * args.seq_len].view(n_blocks, args.seq_len)[: args.ppl_blocks]
        for label, config, a in parsed:
            if a != adapter:
                continue
            print(f"== {label}", flush=True)
            options = config_options(config, args.window, args.sinks, model.config.num_hidden_layers)
            if options is not None:
                patch_model(model, backend=args.probe_backend, **options)
            try:
                start = time.perf_counter()
                copies += copy_probe(model, ids, distances, args.span, 32, args.trials, 0, label)
                if lengths:
                    keys += passkey(model, tokenizer, ids, lengths, config=label)
                    if options and options.get("decode") == "full":        # only the answer attends fully
                        keys += passkey(model, tokenizer, ids, lengths, config=label + PROMPT_END, boundary="prompt-end")
                ppl = heldout_ppl(model, blocks)
                results.append({"row": label, "config": config, "adapter": adapter or "", "ppl": ppl,
                                "reach_theory": theoretical_reach(model), "probe_minutes": (time.perf_counter() - start) / 60})
            finally:
                unpatch_model(model)
        del model

    recalls = recall_table(copies)
    by = {(r.config, r.distance): r for r in recalls}
    dense_prefill = timing.get("dense", (float("nan"), 0))[0]
    w = args.window
    summary = []
    for res in results:
        label = res["row"]
        row = {"row": label, "config": res["config"], "adapter": res["adapter"], "window": w}
        for name, d in (("W/2", w // 2), ("2W", 2 * w), ("8W", 8 * w)):
            row[f"recall_{name}"] = f"{by[(label, d)].recall:.3f}" if (label, d) in by else ""
        row["effective_reach"] = effective_reach(recalls, label) or 0
        row["receptive_field"] = res["reach_theory"] or "all"
        for n in lengths:
            for suffix, name in (("", label), ("_prompt_end", label + PROMPT_END)):
                hits = [k.correct for k in keys if k.config == name and k.length == n]
                row[f"passkey_{n}{suffix}"] = f"{sum(hits)}/{len(hits)}" if hits else ""
        row["heldout_ppl"] = f"{res['ppl']:.3f}"
        seconds, kv = timing.get(res["config"], (float("nan"), 0))
        row[f"prefill_s_{args.prefill_tokens}"] = f"{seconds:.2f}"
        row["prefill_speedup_vs_dense"] = f"{dense_prefill / seconds:.2f}"
        row[f"kv_mib_{args.prefill_tokens}"] = f"{kv / 2**20:.1f}"
        row["train_minutes"] = f"{minutes[res['adapter']]:.1f}" if res["adapter"] else ""
        summary.append(row)
    meta = provenance()
    meta["settings"] = json.dumps({k: getattr(args, k) for k in ("window", "sinks", "trials", "span", "steps",
                                                                  "seq_len", "lr", "distill_alpha", "temperature",
                                                                  "train_config", "ppl_blocks", "reuse_adapters")})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*summary[0], *meta])
        writer.writeheader()
        for row in summary:
            writer.writerow({**row, **meta})
    write_csv(args.out + "_probes.csv", recalls, keys, {r["row"]: r["reach_theory"] for r in results})
    plot(recalls, keys, args.out + ".png", w, f"SmolLM2-135M, window {w}: copy recall and passkey per configuration")
    for row in summary:
        print(", ".join(f"{k}={v}" for k, v in row.items()))
    print(f"wrote {args.out}.csv, {args.out}_probes.csv, {args.out}.png")


if __name__ == "__main__":
    main()
