"""Side-by-side with the attention_sinks 0.4 package (transformers 4.34, separate venv), step 1
of 2, run with *this* environment (transformers 5.x):

    python benchmarks/attention_sinks_export.py OUT_DIR --tokens 2048

writes OUT_DIR/model (a plain LlamaForCausalLM checkpoint of SmolLM2-135M that 4.34 can read:
a GGUF-loaded model refuses save_pretrained, and 4.34 needs ``rope_theta`` at top level) and
OUT_DIR/ids.pt (the first --tokens tokens of the default text, tokenised here so both sides
see identical ids).  Step 2: benchmarks/attention_sinks_side.py in the 4.34 venv.
"""
import argparse
import json
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from swa_patch.models import load_model, load_text

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--tokens", type=int, default=2048)
args = p.parse_args()
out = Path(args.out)
model, tok = load_model("smollm2-135m")
plain = LlamaForCausalLM(model.config)
plain.load_state_dict(model.state_dict())
plain.save_pretrained(out / "model")
cfg = json.loads((out / "model" / "config.json").read_text())
cfg["rope_theta"] = float(model.config.rope_parameters["rope_theta"])
cfg.pop("rope_parameters", None)
cfg["torch_dtype"] = "float32"
(out / "model" / "config.json").write_text(json.dumps(cfg, indent=1))
ids = tok(load_text(), return_tensors="pt").input_ids[0, :args.tokens].clone()
torch.save(ids, out / "ids.pt")
print(f"wrote {out / 'model'} and {ids.numel()} ids to {out / 'ids.pt'}")
