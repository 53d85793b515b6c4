"""patch_model / unpatch_model: registration, per-layer plans, config write-back."""
from __future__ import annotations

import contextlib
import dataclasses
import logging

from . import compat
from .attention import LayerPlan, mask_builder, swa_attention
from .backends import check_available
from .config import SWAConfig
from .families import family_of, native_full_layers
from .generation import install_generation_hooks, remove_generation_hooks
from .state import STATE_ATTR, PatchState, find_patched, layer_specs, patch_settings, patch_state

logger = logging.getLogger("swa_patch")

# Registered when swa_patch is imported, not only inside patch_model: a patched model unpickled
# in a fresh process (torch.load imports swa_patch for its hooks) finds its attention function.
# This adds a name to transformers' registries; it changes nothing that is already there.
compat.register(swa_attention, mask_builder)

CONFIG_KEY = "swa_patch"      # namespaced block written into config.json
__all__ = ["original_attention", "patch_model", "unpatch_model", "patch_settings", "layer_specs"]


def patch_model(model, window=None, sinks: int = 0, **options):
    """Give ``model`` sliding-window attention in place and return it.

    ``window`` keys per query, itself included (``i - W < j <= i``); ``sinks`` first real
    tokens always visible.  Options: see :class:`swa_patch.config.SWAConfig`.  Everything is
    validated before the model is touched; patching twice with the same settings is a no-op,
    with other settings an error.
    """
    settings = options.pop("settings", None) or SWAConfig.from_kwargs(window, sinks, options)
    inner = _wrapped_model(model)
    if inner is not model:                      # a peft model: patch the transformers model inside
        patch_model(inner, settings=settings)
        return model
    text_config = _check_model(model)
    family = family_of(text_config)
    n_layers = text_config.num_hidden_layers
    specs = settings.layer_specs(n_layers, native_full_layers(text_config), text_config.num_attention_heads,
                                 compat.kv_heads(text_config))
    _warn_past_trained_windows(text_config, specs)
    if settings.positions is None and family.rope == "absolute":
        settings = dataclasses.replace(settings, positions="original")   # nothing to shift
    if settings.position_mode == "shift":
        if family.rope == "absolute":
            raise ValueError(f"positions='shift' needs rotary position embeddings; {text_config.model_type} "
                             "uses absolute positions: use positions='original'")
        from .rope import model_ropes
        model_ropes(model, n_layers)     # refuses RoPE that cannot be re-rotated exactly
    check_available(settings.backend, next(model.parameters()).device)
    state = patch_state(model)
    if state is not None:
        if state["settings"].to_dict() == settings.to_dict():
            return model
        raise ValueError(f"model is already patched with {state['settings']}; call "
                         f"swa_patch.unpatch_model(model) before patching with {settings}")
    modules = compat.attention_modules(model)
    if len(modules) != n_layers:
        raise ValueError(f"found {len(modules)} attention modules for {n_layers} layers in "
                         f"{type(model).__name__}; cannot patch this architecture")

    state = PatchState(settings=settings, attn=compat.attn_implementation(model), specs=specs)
    for idx, module in modules:
        module._swa_plan = LayerPlan(specs[idx], settings.backend)
    compat.set_attn_implementation(model, compat.ATTN_NAME)
    setattr(text_config, CONFIG_KEY, settings.to_dict())
    setattr(model, STATE_ATTR, state)
    logger.info("swa_patch: patched %s (%d layers): %s", type(model).__name__, n_layers, settings)
    install_generation_hooks(model)
    return model


def _warn_past_trained_windows(text_config, specs) -> None:
    """A layer the model declares local (``layer_types[i] == "sliding_attention"``) was trained
    to see ``sliding_window`` keys; a wider window, full attention or decode="full" there shows it
    distances it never saw.  Allowed (it is what the user asked for) but said out loud: Gemma-3-270M,
    with its local windows at 1024 instead of 512, goes from perplexity 11.6 to 161 on 2k tokens of
    text (transformers' own sliding window and ours alike)."""
    types, trained = getattr(text_config, "layer_types", None) or [], getattr(text_config, "sliding_window", None)
    if not isinstance(trained, int):
        return
    wider = [i for i, (kind, spec) in enumerate(zip(types, specs)) if kind == "sliding_attention"
             and (spec.window is None or spec.span > trained or spec.decode_full or spec.has_full_heads)]
    if wider:
        logger.warning("swa_patch: layers %s of this %s were trained with a %d-token window and now attend further "
                       "(a wider window, full attention or decode='full'); such a model can degrade badly (Gemma-3-270M: "
                       "perplexity 11.6 -> 161 with 1024-token local windows). Keep those layers at <= %d, e.g. "
                       "decode=[its global layers] instead of 'full'", wider, text_config.model_type, trained, trained)


def unpatch_model(model):
    """Undo :func:`patch_model` exactly; a model that is not patched is returned unchanged."""
    inner = _wrapped_model(model)
    if inner is not model:
        unpatch_model(inner)
        return model
    state = patch_state(model)
    if state is None:
        return model
    if state.get("suspended"):
        raise RuntimeError("unpatch_model inside swa_patch.original_attention(model): leave the block first")
    remove_generation_hooks(model)
    for _, module in compat.attention_modules(model):
        module.__dict__.pop("_swa_plan", None)
    compat.set_attn_implementation(model, state["attn"])
    text_config = compat.text_config(model)
    if hasattr(text_config, CONFIG_KEY):
        delattr(text_config, CONFIG_KEY)
    delattr(model, STATE_ATTR)
    return model


@contextlib.contextmanager
def original_attention(model):
    """Inside the block a patched model (or a peft / DDP wrapper around one) runs the attention
    it had before :func:`patch_model`: the model's own attention function, masks and caches,
    exactly; the window comes back when the block ends, even on an error.  Distillation uses
    it as the teacher: ``with peft_model.disable_adapter(), original_attention(peft_model):``
    gives the original model's logits from the same weights, no second copy held.

    The switch belongs to the model object (its config names the attention function every layer
    calls), so it holds for every forward of that model while the block is open, in any thread;
    a copy taken inside the block is a patched model of its own."""
    base = find_patched(model)
    state = patch_state(base)
    if state.get("suspended"):
        raise RuntimeError("original_attention blocks do not nest: this model is already inside one")
    state.pop("resume", None)
    compat.set_attn_implementation(base, state["attn"])
    state["suspended"] = True
    try:
        yield model
    finally:
        state["suspended"] = False
        compat.set_attn_implementation(base, compat.ATTN_NAME)


def _wrapped_model(model):
    """The transformers model inside a peft wrapper (``get_base_model``), else ``model``: hooks
    and the generate wrapper belong on the model whose own forward ``generate()`` calls."""
    get_base_model = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if callable(get_base_model) else model


def _check_model(model):
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"patch_model needs a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False) or not hasattr(model, "generate"):
        raise ValueError(f"patch_model needs a decoder-only causal LM (…ForCausalLM); got "
                         f"{type(model).__name__}")
    if not getattr(config, "is_causal", True):
        raise ValueError("patch_model needs a causal model; this config sets is_causal=False")
    return compat.text_config(model)
