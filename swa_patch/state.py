"""Where a patched model keeps what ``patch_model`` did: one :class:`PatchState` on the model object.

Keys: ``settings`` (:class:`~swa_patch.config.SWAConfig`), ``specs`` (one
:class:`~swa_patch.masks.LayerSpec` per layer), ``attn`` (the attention implementation to
restore), ``suspended`` (inside :func:`swa_patch.original_attention`) and ``resume`` (a copy
taken inside that block: its attention comes back on first use).  The backbone (the
base model whose forward runs the layers) holds the same object under :data:`BACKBONE_ATTR`, so
its hooks see the patch however it is called (``model(...)``, ``model.model(...)``,
``get_decoder()``).  What a single forward or ``generate()`` call works out (packed documents,
the prompt boundary, drafted tokens to roll back) is never stored here: it travels with that
call (:mod:`swa_patch.generation`).  Nothing else of the patch lives outside the model's own
modules, so a deep copy or a pickle carries all of it.
"""
from __future__ import annotations

STATE_ATTR = "_swa_patch_state"
BACKBONE_ATTR = "_swa_patch_backbone_state"


class PatchState(dict):
    """The patch of one model.  ``suspended`` belongs to the model object inside an
    ``original_attention`` block, not to a copy of it: a deep copy or a pickle taken inside the
    block is a patched model of its own (its hooks switch its attention back on first use)."""

    def __reduce__(self):
        kept = {key: value for key, value in self.items() if key != "suspended"}
        if self.get("suspended"):                 # its config holds the original implementation
            kept["resume"] = True
        return PatchState, (kept,)


def patch_state(model) -> PatchState | None:
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
