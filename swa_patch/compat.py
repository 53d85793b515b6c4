"""Every touch of transformers internals lives here, so a release bump is a one-file change."""
from __future__ import annotations

import functools
import inspect
import re

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

# A name free of "flash", "sdpa", "flex_attention" and of the "org/name" shape, which
# trigger transformers' own dispatch checks or Hub kernel loading.
ATTN_NAME = "swa_patch_band"


def register(attention_fn, mask_builder) -> None:
    """Register the attention function and, under the same name, the mask builder (without
    the builder every layer would get ``attention_mask=None``: the window would be lost)."""
    AttentionInterface.register(ATTN_NAME, attention_fn)
    AttentionMaskInterface.register(ATTN_NAME, mask_builder)


def attention_modules(model):
    """(layer_idx, module) for each self-attention module that dispatches through transformers'
    attention interface."""
    found = []
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int):
            found.append((module.layer_idx, module))
    return found


@functools.cache
def _update_call_passes_kwargs(cls) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return re.search(r"\.update\([^)]*\bkwargs=kwargs", source) is not None


def cache_update_gets_kwargs(module) -> bool:
    """Whether the attention module passes its ``kwargs`` to ``cache.update`` (so an SWACache can
    hand the attention function its key layout in them).  Read from the forward's source; where it
    cannot be read, or the call passes none (GPT-NeoX), False: the patch then adds a pre-hook that
    carries the layout instead."""
    return _update_call_passes_kwargs(type(module))


def attn_implementation(model) -> str | None:
    return model.config._attn_implementation


def set_attn_implementation(model, name) -> None:
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"transformers did not switch {type(model).__name__} to attention "
                           f"{name!r} (it reports {model.config._attn_implementation!r})")


def text_config(model):
    return model.config.get_text_config(decoder=True)


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing under the name this transformers release uses
    (5.2x renamed ``gradient_checkpointing_enable``, which now warns, to
    ``activation_checkpointing_enable``)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def kv_heads(config) -> int | None:
    """The KV heads of a text config (GPT-2 and GPT-NeoX have as many as query heads)."""
    return getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
