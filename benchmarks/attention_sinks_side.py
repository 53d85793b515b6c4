"""Step 2 of 2 (see attention_sinks_export.py), run in the venv with attention-sinks 0.4.0
and transformers 4.34:

    python benchmarks/attention_sinks_side.py OUT_DIR --sinks 4 --window 1020 --tokens 512

token-by-token streaming perplexity and tokens/s of the attention_sinks package on the
exported ids; prints one line ``attention_sinks tokens=N ppl=P seconds=S tokens_per_s=T``.
"""
import argparse
import math
import time

import torch
from attention_sinks import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--sinks", type=int, default=4)
p.add_argument("--window", type=int, default=1020)
p.add_argument("--tokens", type=int, default=512)
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)
model = AutoModelForCausalLM.from_pretrained(f"{args.out}/model", attention_sink_size=args.sinks,
                                             attention_sink_window_size=args.window,
                                             torch_dtype=torch.float32).eval()
ids = torch.load(f"{args.out}/ids.pt")[:args.tokens]
past, nll, seconds = None, 0.0, 0.0
with torch.no_grad():
    for t in range(ids.numel() - 1):
        t0 = time.perf_counter()
        out = model(ids[None, t:t + 1], past_key_values=past, use_cache=True)
        seconds += time.perf_counter() - t0
        past = out.past_key_values
        nll += torch.nn.functional.cross_entropy(out.logits[0, -1:].float(), ids[t + 1:t + 2]).item()
n = ids.numel() - 1
print(f"attention_sinks tokens={ids.numel()} ppl={math.exp(nll / n):.4f} seconds={seconds:.2f} "
      f"tokens_per_s={n / seconds:.2f}")
