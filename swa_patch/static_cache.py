"""A static-shape rolling cache for compiled decoding: ``make_cache(model, static=True)``.

The buffers are those of :class:`~swa_patch.cache.SWACache` (S sink slots plus a ring of
``span`` slots per sliding layer), fixed from the first token; a full-attention layer gets
``max_cache_len`` slots.  A decode step (one token) is tensor-only: the stream position is a
0-d tensor, the write slot ``position mod span`` an index, the sink copy a ``where``; nothing
reads a value back to the host and nothing changes shape, so ``torch.compile(...,
fullgraph=True)`` traces one graph for every step (evictions included) and CUDA graphs can
replay it.  Multi-token forwards (the prompt) run eagerly through the same buffers.

Position mode ``shift`` needs no rebasing here: the ring keeps every key *position-free*
(rotated to position 0).  A decode step gets position 0 for its query and key, and the buffer
is rotated to each slot's true offset ``-(position - t)`` as it is read (the sinks to
``-(S + span - 1 - k)``), so no position ever exceeds ``S + span`` and nothing depends on how
long the stream is.  That read-side rotation costs O(span * head_dim) per layer and step, about
what the dynamic cache's per-step copy of the ring (sinks prepended) costs.  A multi-token
forward rotates the keys it reads into its frame and stores them back position-free.
Full-attention layers are refused in shift mode, and decode="full" everywhere (their layers
keep every key).
"""
from __future__ import annotations

import torch

from .backends.layout import KeyLayout
from .cache import SlidingLayer, SWACache, _Step, _SWALayer
from .masks import LayerSpec
from .rope import LayerRope, rotate


class StaticSWACache(SWACache):
    """:class:`SWACache` with fixed-size buffers and a tensor position (compileable)."""

    def __init__(self, specs: list[LayerSpec], max_cache_len: int | None = None, positions: str = "original",
                 ropes: list[LayerRope] | None = None):
        decode_full = [i for i, s in enumerate(specs) if s.any_decode_full]
        if decode_full:
            raise ValueError(f"static=True: layers {decode_full} decode fully (decode='full') and keep every key; "
                             "use the default (dynamic) cache")
        per_kv = [i for i, s in enumerate(specs) if s.kv_windows is not None]
        if per_kv:
            raise ValueError(f"static=True: layers {per_kv} have a window per KV head, which the fixed-size "
                             "buffers do not keep apart; use the default (dynamic) cache")
        full = [i for i, s in enumerate(specs) if s.window is None]
        if full and positions == "shift":
            raise ValueError(f"static=True with positions='shift': layers {full} use full attention, which would "
                             "re-rotate their whole cache every step; use positions='original' or the dynamic cache")
        if full and (not isinstance(max_cache_len, int) or max_cache_len < 1):
            raise ValueError(f"static=True: layers {full} use full attention and need max_cache_len (an int >= 1, "
                             f"the longest stream the cache will hold), got {max_cache_len!r}")
        self.max_cache_len = max_cache_len
        super().__init__(specs, positions, ropes)
        self.position = torch.zeros((), dtype=torch.long)     # stream index of the next token

    def _make_layer(self, layer_idx: int, spec: LayerSpec):
        if spec.window is None:
            return StaticFullLayer(self, layer_idx, spec)
        return StaticSlidingLayer(self, layer_idx, spec)

    @property
    def is_compileable(self) -> bool:
        return True

    def begin(self, q_len, attention_mask=None, batch_size=1, device=None, start=None):
        if self.position.device != torch.device(device) and not torch.compiler.is_compiling():
            self.position = self.position.to(device)
        if q_len > 1:                                   # the prompt: eager, python positions
            return super().begin(q_len, attention_mask, batch_size, device, start=int(self.position))
        if self.first_real is None:                     # a stream that starts with one token
            self.first_real = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        real = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be 2-D [batch, >= 1] with SWACache, got shape "
                                 f"{tuple(attention_mask.shape)}")
            real = attention_mask[:, -1:].bool()
        start = self.position.clone()
        first = start.expand_as(self.first_real) if real is None else torch.where(real[:, 0], start, -1)
        self.first_real.copy_(torch.where(self.first_real < 0, first, self.first_real))
        self._step = _Step(start, 1, real, None)
        if self.position_mode == "shift":        # query and key at position 0: the ring is position-free
            return torch.zeros(self.first_real.shape[0], 1, dtype=torch.long, device=start.device)
        return None

    def _rebase(self, new_base: int) -> None:
        self.base = new_base                    # the buffers are position-free: nothing to re-rotate

    def _note_first_real(self, start, q_len, real, batch_size, device):
        previous = self.first_real
        super()._note_first_real(start, q_len, real, batch_size, device)
        if previous is not None:                       # keep the buffer (its address) for compiled steps
            self.first_real = previous.copy_(self.first_real)

    def step_for(self, start, q_len, batch_size, device) -> _Step:
        if self._step is None:
            raise RuntimeError("a static SWACache needs the forward announced by the patched model's hooks")
        return self._step

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a static SWACache cannot crop (its write position is a device tensor)")

    def reset(self):
        super().reset()
        self.position = torch.zeros((), dtype=torch.long, device=self.position.device)


class _StaticMixin:
    """Shared by static layers: the position lives in the cache, the last layer advances it."""

    def get_seq_length(self):
        return self.owner.position

    def _begin_update(self, key_states, value_states):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            if not torch.compiler.is_compiling():
                for t in vars(self).values():
                    if torch.is_tensor(t):
                        torch._dynamo.mark_static_address(t)
        step = self.owner._step
        b, _, q, _ = key_states.shape
        real = step.real if step.real is not None else torch.ones(b, q, dtype=torch.bool, device=key_states.device)
        return step, real

    @staticmethod
    def _position(step, device) -> torch.Tensor:
        """The step's start as a tensor (a first token fed alone arrives through the eager path)."""
        return step.start if torch.is_tensor(step.start) else torch.tensor(step.start, device=device)

    def _advance(self, q: int) -> None:
        if self.layer_idx == len(self.owner.layers) - 1:
            self.owner.position.add_(q)


class StaticSlidingLayer(_StaticMixin, SlidingLayer):
    is_compileable = True

    def _frame_shift(self, idx: torch.Tensor) -> torch.Tensor:
        """Where stream indices ``idx`` sit in the current frame (shift mode)."""
        return (idx - self.owner.base)[None, None, :]

    def _stored_keys(self, slots):
        keys = self.keys[:, :, slots]
        if self.owner.position_mode == "shift":
            keys = rotate(keys, self._frame_shift(self.slot_index[slots]), self.owner.ropes[self.layer_idx])
        return keys

    def _to_store(self, keys, idx):
        if self.owner.position_mode == "shift":
            keys = rotate(keys, -self._frame_shift(idx), self.owner.ropes[self.layer_idx])
        return keys

    def shift_frame(self, delta, rope) -> None:
        pass                                    # position-free: nothing depends on the frame

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if query_length == 1:
            return self.n, 0
        seen = int(self.owner.position)
        old = min(seen, self.n - 1)
        return old + query_length, seen - old

    def update(self, key_states, value_states, *args, kwargs: dict | None = None, **extra):
        q = key_states.shape[2]
        if q > 1:                                          # eager: the dynamic layer's chunk path
            step, _ = self._begin_update(key_states, value_states)
            self.seen = step.start
            out = super().update(key_states, value_states, *args, kwargs=kwargs, **extra)
            self._advance(q)
            return out
        step, real = self._begin_update(key_states, value_states)
        pos = self._position(step, key_states.device)
        slot = torch.remainder(pos, self.n).reshape(1)
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        self.slot_index.index_copy_(0, slot, pos.reshape(1))
        self.slot_real.index_copy_(1, slot, real)
        layout = KeyLayout(pos, 0, self.slot_real, key_index=self.slot_index)
        keys, shift = self.keys, self.owner.position_mode == "shift"
        if shift:            # each slot at its true offset from the query (at position 0)
            keys = rotate(keys, (self.slot_index - pos)[None, None, :], self.owner.ropes[self.layer_idx])
        if self.spec.sinks:
            sink_index = self._store_sinks(key_states, value_states, step, real, sync=False,
                                           frame_base=pos if shift else None)
            layout.sink_k, layout.sink_v = self.sink_k, self.sink_v
            if shift:        # sink k directly before the oldest window slot
                offset = self.spec.sinks + self.n - 1 - torch.arange(self.spec.sinks, device=pos.device)
                layout.sink_k = rotate(self.sink_k, -offset, self.owner.ropes[self.layer_idx])
            layout.sink_index, layout.sink_valid = sink_index, self.sink_filled
        self.owner.publish(self.layer_idx, layout, kwargs)
        self._advance(1)
        return keys, self.values


class StaticFullLayer(_StaticMixin, _SWALayer):
    """Full causal attention over ``max_cache_len`` preallocated slots (key ``j`` at slot ``j``)."""
    is_compileable = True
    is_sliding = False

    def __init__(self, owner: StaticSWACache, layer_idx: int, spec: LayerSpec):
        super().__init__(owner, layer_idx)
        self.spec, self.n = spec, owner.max_cache_len

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, h, self.n, d)
        self.values = value_states.new_zeros(b, h, self.n, value_states.shape[-1])
        self.key_real = torch.zeros(b, self.n, dtype=torch.bool, device=key_states.device)
        self.is_initialized = True

    def _batch_tensors(self):
        return ["keys", "values", "key_real"]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.n, 0) if query_length == 1 else (int(self.owner.position) + query_length, 0)

    def update(self, key_states, value_states, *args, kwargs: dict | None = None, **extra):
        step, real = self._begin_update(key_states, value_states)
        q = key_states.shape[2]
        if q > 1:                                          # eager prompt: the stream so far, in order
            end = step.start + q
            if end > self.n:
                raise ValueError(f"the stream reaches {end} tokens, past max_cache_len={self.n} of this static cache")
            self.keys[:, :, step.start:end] = key_states
            self.values[:, :, step.start:end] = value_states
            self.key_real[:, step.start:end] = real
            layout = KeyLayout(step.start, 0, self.key_real[:, :end])
            self.owner.publish(self.layer_idx, layout, kwargs)
            self._advance(q)
            return self.keys[:, :, :end], self.values[:, :, :end]
        pos = self._position(step, key_states.device)
        slot = pos.reshape(1)                              # past max_cache_len: index_copy_ raises
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        self.key_real.index_copy_(1, slot, real)
        layout = KeyLayout(pos, 0, self.key_real)
        self.owner.publish(self.layer_idx, layout, kwargs)
        self._advance(1)
        return self.keys, self.values
