"""Per-architecture facts, one row per ``model_type``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    rope: str = "rope"            # "rope" | "partial" (rotary on part of head_dim) | "absolute"
    native_window: bool = False   # the architecture has its own sliding window / layer types
    notes: str = ""


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(native_window=True),
    "qwen2": Family(native_window=True),
    "qwen3": Family(native_window=True),
    "gemma": Family(),
    "gemma2": Family(native_window=True, notes="logit softcapping; alternating local/global"),
    "gemma3_text": Family(native_window=True, notes="global layers stay global; per-type RoPE base"),
    "phi3": Family(native_window=True),
    "starcoder2": Family(native_window=True),
    "olmo2": Family(),
    "granite": Family(),
    "gpt_oss": Family(native_window=True, notes="learned per-head sink logits (s_aux) kept"),
    "smollm3": Family(native_window=True),
    "gpt_neox": Family(rope="partial"),
    "phi": Family(rope="partial"),
    "gpt2": Family(rope="absolute", notes="absolute positions: no position mode 'shift'"),
}


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"swa_patch does not support model_type={model_type!r}; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def native_full_layers(config) -> set[int]:
    """Layers a hybrid model declares global (Gemma 2/3, GPT-OSS, Qwen2 max_window_layers)."""
    types = getattr(config, "layer_types", None) or []
    if "sliding_attention" not in types:
        return set()          # not a hybrid stack: every layer gets the window
    return {i for i, t in enumerate(types) if t == "full_attention"}


def retype_conflicts(config, new_types) -> list[str]:
    """Why layers cannot take ``new_types``: where a layer's type also picks something besides
    the window (Gemma 3: ``rope_parameters`` keyed by layer type, RoPE base 1e4 local, 1e6
    global), a retyped layer would reload with another RoPE.  Empty when nothing else changes."""
    old = getattr(config, "layer_types", None) or []
    per_type = getattr(config, "rope_parameters", None)
    if not isinstance(per_type, dict) or not {"sliding_attention", "full_attention"} & set(per_type):
        return []
    return [f"layer {i} as {new} (a {config.model_type} layer's type also picks its RoPE: "
            f"rope_parameters[{was!r}]={per_type.get(was)} vs [{new!r}]={per_type.get(new)})"
            for i, (was, new) in enumerate(zip(old, new_types))
            if was != new and per_type.get(was) != per_type.get(new)]
