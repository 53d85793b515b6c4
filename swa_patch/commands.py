"""``swa-patch generate`` (text from a patched model, constant-memory cache) and
``swa-patch bench`` (the benchmark scripts of a source checkout)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = {"prefill": "prefill_scaling.py", "decode": "cache_decode.py", "dilation": "dilation.py",
              "train": "train_step.py", "long-range": "long_range_study.py", "prompts": "varying_prompts.py",
              "all": "run_all.py"}


def add_cli(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate text from a patched model",
                              description="Patch a model with a window (and sinks) and generate; the "
                              "KV cache stays constant however many tokens are generated.")
    g.add_argument("prompt", help="prompt text")
    g.add_argument("--model", default="smollm2-135m", help="alias 'smollm2-135m', a Hub id or a local folder")
    g.add_argument("--window", type=int, default=1020)
    g.add_argument("--sinks", type=int, default=4)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top-p 0.95) instead of greedy")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.set_defaults(func=_generate)
    b = subparsers.add_parser("bench", help="run a benchmark of a source checkout",
                              description="Runs benchmarks/<script> of the source checkout; extra "
                              "arguments go to the script. Results land in benchmarks/results/.")
    b.add_argument("name", choices=sorted(BENCHMARKS))
    b.add_argument("args", nargs="*", help="arguments for the script (after --)")
    b.set_defaults(func=_bench)


def _generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from . import make_cache, patch_model
    from .models import load_model
    model, tokenizer = load_model(args.model)
    patch_model(model, window=args.window, sinks=args.sinks)
    text = (tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                          add_generation_prompt=True) if args.chat else args.prompt)
    ids = tokenizer(text, return_tensors="pt").input_ids
    cache = make_cache(model)
    sampling = dict(do_sample=True, temperature=0.8, top_p=0.95) if args.sample else dict(do_sample=False)
    with torch.no_grad():
        model.generate(ids, cache=cache, max_new_tokens=args.max_new_tokens,
                       streamer=TextStreamer(tokenizer, skip_prompt=False), **sampling)
    print(f"\n[KV cache: {cache.nbytes()} bytes after {cache.get_seq_length()} tokens]", file=sys.stderr)
    return 0


def _bench(args) -> int:
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    script = folder / BENCHMARKS[args.name]
    if not script.is_file():
        raise SystemExit(f"swa-patch bench needs a source checkout (no {script}); "
                         "clone the repository and install it with pip install -e .")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.call([sys.executable, str(script), *args.args], env=env)
