"""Where a patched model keeps what ``patch_model`` did: one dict on the model object.

Keys: ``settings`` (:class:`~swa_patch.config.SWAConfig`), ``specs`` (one
:class:`~swa_patch.masks.LayerSpec` per layer), ``attn`` (the attention implementation to
restore), ``suspended`` (inside :func:`swa_patch.original_attention`), and for the
``generate`` call in progress: ``generate_prompt_end`` (where its prompt ends, for
decode="full") and ``generate_rollback`` (drafted tokens a crop may remove).  Nothing else
of the patch lives outside the model's own modules, so a deep copy carries all of it.
"""
from __future__ import annotations

STATE_ATTR = "_swa_patch_state"


def patch_state(model) -> dict | None:
    return getattr(model, STATE_ATTR, None)


def patch_settings(model):
    """The :class:`~swa_patch.config.SWAConfig` a model was patched with, or None."""
    state = patch_state(model)
    return None if state is None else state["settings"]


def layer_specs(model):
    """One :class:`~swa_patch.masks.LayerSpec` per layer of a patched model."""
    state = patch_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by swa_patch.patch_model")
    return state["specs"]


def find_patched(model):
    """The patched model inside ``model`` (itself, or wrapped by peft, DDP, ...)."""
    for module in model.modules():
        if patch_state(module) is not None:
            return module
    raise ValueError(f"{type(model).__name__} holds no model patched by swa_patch.patch_model")
