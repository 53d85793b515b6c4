"""INTERIM — to be deleted when the real ``swa_patch.make_cache`` (cache issue) lands.

A deliberately small bounded cache so that the streaming evaluation on this branch can be
built and tested before the real cache exists.  It is *correct* for what it supports
(position mode ``original``, batch without padding), but it is not the product:

* per layer it keeps the sink keys plus the last ``span - 1`` keys, trimming by slicing
  after each call (the real cache writes a ring buffer in place);
* it refuses ``positions='shift'`` (no RoPE re-rotation), so streaming far past the
  model's trained context with sinks is *not* StreamingLLM-exact here;
* it hands the sink slots to the attention function through a forward pre-hook on each
  attention module (``swa_keys``), the same keyword the real cache uses.

:mod:`swa_patch.streaming` imports ``swa_patch.make_cache`` first and only falls back here.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import compat
from .backends.layout import KeyLayout
from .patch import layer_specs, patch_settings

_HOOKS = "_swa_interim_hooks"


class InterimWindowLayer(DynamicLayer):
    """Keys of one layer: ``sinks`` first tokens + the most recent ``slots`` tokens."""

    def __init__(self, slots: int | None, sinks: int):
        super().__init__()
        self.slots, self.sinks = slots, sinks
        self.start = 0          # stream index of self.keys[..., 0, :]
        self.seen = 0           # tokens of the stream so far
        self.sink_k = self.sink_v = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        if self.sinks and self.start == 0 and (self.sink_k is None or self.sink_k.shape[-2] < self.sinks):
            self.sink_k = keys[..., :self.sinks, :].clone()
            self.sink_v = values[..., :self.sinks, :].clone()
        if self.slots is not None and keys.shape[-2] > self.slots:
            drop = keys.shape[-2] - self.slots
            self.keys, self.values = keys[..., drop:, :].clone(), values[..., drop:, :].clone()
            self.start += drop
        else:
            self.keys, self.values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (0 if self.keys is None else self.keys.shape[-2]) + query_length, self.start

    def get_max_length(self) -> int:
        return -1 if self.slots is None else self.slots + self.sinks

    def layout(self, q_len: int, batch: int) -> KeyLayout | None:
        """Where the keys of the next ``update`` sit, when the sinks are no longer among them."""
        if not self.sinks or self.start == 0 or self.sink_k is None:
            return None
        dev = self.sink_k.device
        index = torch.arange(self.sink_k.shape[-2], device=dev).expand(batch, -1)
        return KeyLayout(self.seen, self.start, sink_k=self.sink_k, sink_v=self.sink_v,
                         sink_index=index, sink_valid=torch.ones_like(index, dtype=torch.bool))


class InterimCache(Cache):
    def __init__(self, layers):
        super().__init__(layers=layers)


def _pre_hook(module, args, kwargs):
    cache = kwargs.get("cache")
    if not isinstance(cache, InterimCache):
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    layout = cache.layers[module.layer_idx].layout(hidden.shape[1], hidden.shape[0])
    return (args, kwargs) if layout is None else (args, {**kwargs, "swa_keys": layout})


def make_cache(model, **options):
    """INTERIM bounded cache for a model patched with ``positions='original'`` (see module doc)."""
    if options:
        raise TypeError(f"the interim make_cache takes no options, got {sorted(options)}")
    settings = patch_settings(model)
    if settings is None:
        raise ValueError("make_cache(model) needs a model patched with swa_patch.patch_model")
    if settings.position_mode != "original":
        raise ValueError("the interim cache on this branch supports only positions='original'; "
                         "patch with positions='original' until the real make_cache lands")
    if not hasattr(model, _HOOKS):
        setattr(model, _HOOKS, [m.register_forward_pre_hook(_pre_hook, with_kwargs=True)
                                for _, m in compat.attention_modules(model)])
    return InterimCache([InterimWindowLayer(spec.cache_slots, spec.sinks if spec.window else 0)
                         for spec in layer_specs(model)])
