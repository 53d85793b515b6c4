"""Step 2 of 2 (see attention_sinks_export.py), run in the venv with attention-sinks 0.4.0
and transformers 4.34 (benchmarks/attention_sinks_compare.py runs it once per round):

    python benchmarks/attention_sinks_side.py OUT_DIR --sinks 4 --window 1020 --tokens 512 --warmup 8

token-by-token streaming perplexity and tokens/s of the attention_sinks package on the
exported ids.  Model load (``load_s``) is untimed.  Warm-up (``warmup_s``, untimed in tokens/s):
the first ``--warmup`` ids token by token through a cache of its own, then dropped.  Timed:
every id from the first, token by token through a fresh cache, the model call only (the loss
is computed outside the timer).  Prints ``attention_sinks tokens=N ppl=P seconds=S
tokens_per_s=T`` and, last, the same as one JSON line (full precision, plus the versions).
"""
import argparse
import json
import math
import time

import torch
from attention_sinks import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--sinks", type=int, default=4)
p.add_argument("--window", type=int, default=1020)
p.add_argument("--tokens", type=int, default=512)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--warmup", type=int, default=8, help="untimed first tokens through a throwaway cache")
args = p.parse_args()
torch.set_num_threads(args.threads)
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(f"{args.out}/model", attention_sink_size=args.sinks,
                                             attention_sink_window_size=args.window,
                                             torch_dtype=torch.float32).eval()
load_s = time.perf_counter() - start
ids = torch.load(f"{args.out}/ids.pt")[:args.tokens]
with torch.no_grad():
    start, past = time.perf_counter(), None
    for t in range(min(args.warmup, ids.numel())):
        past = model(ids[None, t:t + 1], past_key_values=past, use_cache=True).past_key_values
    warmup_s = time.perf_counter() - start
    past, nll, seconds = None, 0.0, 0.0
    for t in range(ids.numel() - 1):
        t0 = time.perf_counter()
        out = model(ids[None, t:t + 1], past_key_values=past, use_cache=True)
        seconds += time.perf_counter() - t0
        past = out.past_key_values
        nll += torch.nn.functional.cross_entropy(out.logits[0, -1:].float(), ids[t + 1:t + 2]).item()
n = ids.numel() - 1
print(f"attention_sinks tokens={ids.numel()} ppl={math.exp(nll / n):.4f} seconds={seconds:.2f} "
      f"tokens_per_s={n / seconds:.2f}")
import attention_sinks  # noqa: E402
import transformers  # noqa: E402

print(json.dumps({"ppl": math.exp(nll / n), "tokens_per_s": n / seconds, "seconds": seconds, "warmup_s": warmup_s,
                  "load_s": load_s, "versions": f"attention_sinks {attention_sinks.__version__}, transformers "
                                                f"{transformers.__version__}, torch {torch.__version__}"}))
