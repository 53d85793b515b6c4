"""Training-step time and peak memory: sliding window (swa_patch) vs the dense model, on CPU.

    PYTHONPATH=. python benchmarks/train_step.py [--lengths 4096 8192 16384] [--window 1024]
        [--layers 2] [--vocab 8192] [--warmup 1] [--repeats 5] [--threads 2]

A SmolLM2-135M-shaped random Llama (hidden 576, 9 heads, 3 KV heads, intermediate 1536;
``--layers`` of its 30, ``--vocab`` of its 49152 to bound the logits' memory), trained the
way ``recipes/finetune_lora.py`` trains: LoRA r=16 on attention + MLP projections, gradient
checkpointing, AdamW, batch 1.  Dense = transformers' own causal SDPA; window = the same
model patched with ``patch_model(window=W)`` (the block-sparse sdpa band backend).

Each (mode, length) runs in a fresh child process (so peak RSS is its own); dense and window
alternate per length, so their ratio is measured side by side; the CSV has each one's median
step and its min and max over ``--repeats`` timed steps (after ``--warmup`` untimed ones).  Writes a long-format CSV
(benchmarks/results/train_step.csv) and draws the PNG with plot_train_step.py.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
             max_position_embeddings=32768, rope_theta=100000.0, tie_word_embeddings=True)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(mode: str, n: int, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import swa_patch
    from swa_patch.compat import enable_activation_checkpointing

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=args.layers, vocab_size=args.vocab, **SHAPE)
    model = LlamaForCausalLM(config)
    if mode == "window":
        swa_patch.patch_model(model, window=args.window, backend="sdpa")
    model.config.use_cache = False
    enable_activation_checkpointing(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, args.vocab, (1, n))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    base = rss_mb()
    for _ in range(args.warmup):             # allocator, optimizer state
        step()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "seq_len": n, "step_s": statistics.median(times), "step_s_min": min(times),
            "step_s_max": max(times), "peak_mb": peak - base, "base_mb": base}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2, help="of SmolLM2-135M's 30 (CPU time)")
    p.add_argument("--vocab", type=int, default=8192, help="of SmolLM2's 49152 (logits' memory)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (0: time the first step)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps (median, min and max reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "train_step.csv"))
    p.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args)))
        return
    for name in ("window", "layers", "vocab", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    import swa_patch

    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    common = [f"--{k}={getattr(args, k)}" for k in ("window", "layers", "vocab", "warmup", "repeats", "threads")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    rows = []
    for n in args.lengths:
        for mode in ("dense", "window"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(n), *common],
                                 capture_output=True, text=True, env=env)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not lines:
                raise SystemExit(f"{mode} n={n} failed:\n{out.stderr[-3000:]}")
            r = json.loads(lines[-1][len("RESULT "):])
            print(f"n={n:6d} {mode:6s} step {r['step_s']:8.2f} s  peak +{r['peak_mb']:8.0f} MB", flush=True)
            rows.append(r)
    from common import provenance
    meta = dict(window=args.window, layers=args.layers, vocab=args.vocab, warmup=args.warmup, repeats=args.repeats,
                device="cpu", swa_patch=swa_patch.__version__, **provenance())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "metric", "seq_len", "value", *meta])
        for r in rows:
            for metric in ("step_s", "step_s_min", "step_s_max", "peak_mb"):
                w.writerow([r["mode"], metric, r["seq_len"], round(r[metric], 4), *meta.values()])
    print(f"\nratios dense / window (W={args.window}, {args.layers} layers):")
    by = {(r["mode"], r["seq_len"]): r for r in rows}
    for n in args.lengths:
        d, s = by["dense", n], by["window", n]
        print(f"  n={n:6d}  time x{d['step_s'] / s['step_s']:.2f}   peak memory x{d['peak_mb'] / s['peak_mb']:.2f}")
    print(f"wrote {args.out}")
    from plot_train_step import plot
    print(f"wrote {plot(args.out)}")


if __name__ == "__main__":
    main()
