"""Per-family LoRA defaults, the one place they live: which linear layers get adapters
(attention and MLP projections) and, for LongLoRA-style runs, which modules are trained
in full (embeddings and norms, given as name suffixes: :func:`modules_named` resolves them to the
model's module names, as peft's ``modules_to_save`` matched them itself before 0.22)."""
from __future__ import annotations

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_EMBED_NORM = ("embed_tokens", "norm")

# model_type -> (LoRA target modules, embedding + norm modules)
TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (_LLAMA_LIKE, _EMBED_NORM),
    "mistral": (_LLAMA_LIKE, _EMBED_NORM),
    "qwen2": (_LLAMA_LIKE, _EMBED_NORM),
    "qwen3": (_LLAMA_LIKE, _EMBED_NORM),
    "gemma": (_LLAMA_LIKE, _EMBED_NORM),
    "gemma2": (_LLAMA_LIKE, _EMBED_NORM),
    "gemma3_text": (_LLAMA_LIKE, _EMBED_NORM),
    "olmo2": (_LLAMA_LIKE, _EMBED_NORM),
    "granite": (_LLAMA_LIKE, _EMBED_NORM),
    "smollm3": (_LLAMA_LIKE, _EMBED_NORM),
    "phi3": (("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), _EMBED_NORM),
    "starcoder2": (("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"), _EMBED_NORM),
    # the experts are fused 3-D parameters, not nn.Linear: attention projections only
    "gpt_oss": (("q_proj", "k_proj", "v_proj", "o_proj"), _EMBED_NORM),
    "gpt_neox": (("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
                 ("embed_in", "layernorm", "final_layer_norm")),
    "phi": (("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"), ("embed_tokens", "layernorm")),
    "gpt2": (("c_attn", "c_proj", "c_fc"), ("wte", "wpe", "ln_1", "ln_2", "ln_f")),
}


def lora_targets(model_type: str) -> list[str]:
    return list(_row(model_type)[0])


def embedding_and_norm_modules(model_type: str) -> list[str]:
    return list(_row(model_type)[1])


def modules_named(model, suffixes) -> list[str]:
    """The module names (last dotted component) of ``model`` whose full name ends with one of
    ``suffixes``: ``norm`` -> ``input_layernorm``, ``post_attention_layernorm``, ``norm``.  peft
    up to 0.21 matched ``modules_to_save`` entries as suffixes of the full name; 0.22 matches whole
    name components only, so ``norm`` alone would train the final norm and silently not the layers'."""
    names = sorted({key.rsplit(".", 1)[-1] for key, _ in model.named_modules() if key.endswith(tuple(suffixes))})
    if not names:
        raise ValueError(f"no module of {type(model).__name__} ends with any of {list(suffixes)}")
    return names


def _row(model_type: str):
    if model_type not in TARGETS:
        raise ValueError(f"no default LoRA targets for model_type={model_type!r} (known: "
                         f"{', '.join(sorted(TARGETS))}); pass --target-modules")
    return TARGETS[model_type]
