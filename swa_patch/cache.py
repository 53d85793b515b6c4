"""Constant-memory KV caches on transformers' Cache API, and the hooks that make
``model.generate()`` use them.

:class:`SWACache` holds one layer object per model layer.  A sliding layer keeps

- ``S`` *sink slots*: copies of each row's first ``S`` real tokens (never pads), and
- a *rolling buffer* of ``span = (W-1)*d + 1`` slots, token ``t`` written in place at slot
  ``t mod span``.

A single-token step returns the buffer itself with a :class:`KeyLayout` whose ``key_index``
says which stream index each slot holds (no copy); a multi-token chunk returns its keys in
stream order (the previous ``span - 1`` tokens, then the chunk) and keeps the last ``span``.
A full-attention layer grows like transformers' ``DynamicLayer``; so does a ``decode_full``
layer (``patch_model(..., decode="full")``), whose answer queries attend every earlier key:
its prompt queries still attend only their window (plus sinks gathered from the kept keys),
and the cache records each row's prompt boundary (``full_from``) once, so chunking never
moves it.  The layout reaches the attention function through the ``kwargs`` dict the model
passes to ``cache.update``.

Position mode ``shift`` (StreamingLLM): every key in the window keeps its true offset
``i - j`` (< span) to the query, and a sink ``k`` (the k-th real token) that is outside the
query's band sits at offset ``S + span - 1 - k``, as if directly before the oldest window
slot: no relative position ever exceeds ``S + span - 1`` (``S + W - 1`` undilated).
Absolute positions live in a *frame*: queries get ``t - base``; cached keys are stored at
``t - base``; when ``t - base`` reaches ``2 * (S + span_max)`` the frame is rebased and the
cached keys are re-rotated once (amortised O(head_dim) per token and head for a sliding
layer; full layers re-rotate their whole cache, O(N / (S + span)) per token).  Sinks are
stored un-rotated and rotated to their offset per decode step (O(S * head_dim), into the sink
slots that precede the ring, with cos/sin computed once per step for all layers); for a
multi-token chunk the query is widened to ``[q, R(-p) q]`` so one kernel call gives every
query its own sink offset (see :func:`_sink_query`).

A decode step costs about what the unpatched model's step costs: the sink slots and the ring
share one buffer, so the kernel reads ``[sinks, ring]`` as a view (no per-step copy), and once
the ring is full, holds no pad and every sink lies before the window, every slot is visible, so
the layout says ``unmasked`` and the kernel runs without a mask.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import SplitKeys, gather_sinks
from .backends.layout import KeyLayout, cat_keys
from .masks import LayerSpec
from .rope import LayerRope, rotate, rotate_half, rotate_with, rotation_tables


@dataclass
class _Step:
    """One forward call: queries at stream indices ``start .. start + length - 1``."""
    start: int
    length: int
    real: torch.Tensor | None           # [B, length] bool, None = all real
    positions: torch.Tensor | None      # [length] frame positions (shift mode)
    memo: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)   # what every layer of the step reuses (see once)

    def once(self, key, make):
        """``make()`` once per step for all layers (sink indices, sink rotation tables, ...): the
        same small tensors were built 30 times per decode step (SmolLM2's layers)."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]


class _PendingLayout:
    """Handed to the attention function by a pre-hook for families whose ``cache.update``
    receives no ``kwargs`` (GPT-NeoX): resolves to the layout the cache made for the layer."""

    def __init__(self, cache: "SWACache", layer_idx: int):
        self.cache, self.layer_idx = cache, layer_idx

    def resolve(self) -> KeyLayout | None:
        return self.cache._layouts.pop(self.layer_idx, None)


class SWACache(Cache):
    """Rolling + sink KV cache for a model patched by :func:`swa_patch.patch_model`.

    specs: one :class:`LayerSpec` per layer; positions: ``"original"`` or ``"shift"``;
    ropes: one :class:`LayerRope` per layer (required for ``"shift"``); rollback: spare
    slots per rolling buffer, so that :meth:`crop` of up to ``rollback`` newest tokens always
    succeeds (speculative decoding rejects drafted tokens that way).
    """

    def __init__(self, specs: list[LayerSpec], positions: str = "original",
                 ropes: list[LayerRope] | None = None, rollback: int = 0):
        if positions not in ("original", "shift"):
            raise ValueError(f"positions must be 'original' or 'shift', got {positions!r}")
        if positions == "shift" and (ropes is None or len(ropes) != len(specs)):
            raise ValueError("positions='shift' needs ropes: one LayerRope per layer")
        decode_full = [i for i, s in enumerate(specs) if s.any_decode_full]
        if positions == "shift" and decode_full:
            raise ValueError(f"layers {decode_full} decode fully (decode='full'): their cache keeps every key "
                             "at its original position; positions='shift' cannot apply, use 'original'")
        self.rollback = rollback
        self.specs, self.position_mode, self.ropes = list(specs), positions, ropes
        self.rope_group = _rope_groups(ropes)       # layers whose RoPE is the same share rotation tables
        super().__init__(layers=[self._make_layer(i, s) for i, s in enumerate(specs)])
        spans = [s.span for s in specs if s.window is not None]
        self.keep = max((s.sinks for s in specs), default=0) + max(spans, default=1)
        self.base = 0                      # frame origin (shift mode)
        self.first_real: torch.Tensor | None = None   # [B] first real stream index, -1 if none
        self.full_from: torch.Tensor | None = None   # [B] or [1] prompt boundary of decode_full layers
        self._step: _Step | None = None
        self._layouts: dict[int, KeyLayout] = {}

    def _make_layer(self, layer_idx: int, spec: LayerSpec):
        if spec.window is None or spec.decode_full:
            return FullLayer(self, layer_idx, spec)
        if not spec.grows:
            return SlidingLayer(self, layer_idx, spec)
        window_heads, _, growing = _head_kinds(spec)
        return SplitLayer(self, layer_idx, spec) if window_heads else FullLayer(self, layer_idx, growing)

    # ---- one forward -------------------------------------------------------------------
    def begin(self, q_len: int, attention_mask: torch.Tensor | None = None, batch_size: int = 1,
              device=None, start: int | None = None) -> torch.Tensor | None:
        """Announce a forward of ``q_len`` new tokens.  ``attention_mask`` ``[B, >= q_len]``
        (its last ``q_len`` columns describe the new tokens).  Returns the ``[B, q_len]``
        position ids to use in shift mode, else None."""
        start = self.get_seq_length() if start is None else start
        real = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] < q_len:
                raise ValueError(f"attention_mask must be 2-D [batch, >= {q_len}] with SWACache, got "
                                 f"shape {tuple(attention_mask.shape)}")
            real = attention_mask[:, -q_len:].bool()
            batch_size, device = real.shape[0], real.device
            real = None if bool(real.all()) else real
        self._note_first_real(start, q_len, real, batch_size, device)
        positions = None
        if self.position_mode == "shift":
            if start + q_len - self.base > 2 * self.keep:
                self._rebase(start - self.keep)
            positions = torch.arange(start - self.base, start - self.base + q_len, device=device)
        self._step = _Step(start, q_len, real, positions)
        return None if positions is None else positions[None].expand(batch_size, q_len)

    def step_is_unpadded(self) -> bool:
        """Whether the forward just announced (:meth:`begin`) brings no pad."""
        return self._step is not None and self._step.real is None

    def record_boundary(self, full_from: torch.Tensor) -> None:
        """Record each row's prompt boundary (``[B]`` or ``[1]``: the stream index of the first
        query that attends every earlier key in decode_full layers).  Recorded once: a later
        different boundary is an error, so chunking can never move it."""
        full_from = torch.as_tensor(full_from).reshape(-1)
        if self.full_from is None:
            self.full_from = full_from
        elif self.full_from.shape != full_from.shape or not torch.equal(self.full_from.cpu(), full_from.cpu()):
            raise ValueError(f"this cache already records the prompt boundary at {self.full_from.tolist()} "
                             f"(prompt_lengths {(self.full_from + 1).tolist()}); got "
                             f"{(full_from + 1).tolist()}: use a fresh cache for a new prompt")

    def boundary(self, step: "_Step", device) -> torch.Tensor:
        """The recorded boundary; a stream fed without one has the end of its first forward as
        the prompt end (what ``generate`` does: the prompt, then one token per step)."""
        if self.full_from is None:
            full_from = torch.tensor([step.start + step.length - 1])
            dense = (self.first_real.cpu() < 0) | (self.first_real.cpu() >= full_from)
            if bool(dense.any()):
                raise ValueError(f"decode='full': the first forward through this cache ({step.length} token(s)) would "
                                 f"be the whole prompt, leaving row(s) {dense.nonzero().flatten().tolist()} no windowed "
                                 "token before its first real token: every query would attend every earlier key "
                                 "(dense attention). Pass prompt_lengths= to make_cache(model, ...) or to the forward")
            self.full_from = full_from
        return self.full_from.to(device)

    def _note_first_real(self, start, q_len, real, batch_size, device):
        if self.first_real is None:
            self.first_real = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        if real is None:
            first = torch.full_like(self.first_real, start)
        else:
            first = torch.where(real.any(1), start + real.int().argmax(1), -1)
        self.first_real = torch.where(self.first_real < 0, first, self.first_real)

    def _rebase(self, new_base: int) -> None:
        delta = new_base - self.base
        for layer, rope in zip(self.layers, self.ropes):
            layer.shift_frame(-delta, rope)
        self.base = new_base

    def step_for(self, start: int, q_len: int, batch_size: int, device) -> _Step:
        step = self._step
        if step is not None and step.start == start and step.length == q_len:
            return step
        if self.position_mode == "shift":
            raise RuntimeError("SWACache(positions='shift') got a forward that the patched model's "
                               "hooks did not announce; call the model patched by swa_patch.patch_model")
        self.begin(q_len, None, batch_size, device, start=start)
        return self._step

    def publish(self, layer_idx: int, layout: KeyLayout, kwargs: dict | None) -> None:
        """Hand ``layout`` to the attention call of ``layer_idx``."""
        if kwargs is not None:
            kwargs["swa_keys"] = layout
        else:
            self._layouts[layer_idx] = layout

    # ---- bookkeeping -------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by every tensor of the cache."""
        return sum(layer.nbytes() for layer in self.layers)

    def reset(self):
        super().reset()
        self.base, self.first_real, self.full_from, self._step = 0, None, None, None
        self._layouts.clear()

    def _batch_op(self, fn) -> None:
        for layer in self.layers:
            layer.map_batch(fn)
        if self.first_real is not None:
            self.first_real = fn(self.first_real)
        if self.full_from is not None and self.full_from.numel() > 1:
            self.full_from = fn(self.full_from)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._batch_op(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._batch_op(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._batch_op(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest ``-tokens_to_remove`` tokens (transformers' convention: a
        negative count).  A rolling buffer gives back at most ``rollback`` tokens (at least 1);
        in position mode ``shift`` the kept keys stay in the cache's frame, so nothing moves."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0:
            return
        new_len = self.get_seq_length() + tokens_to_remove
        if new_len < 0:
            raise ValueError(f"crop({tokens_to_remove}) removes more tokens than the cache has seen")
        for layer in self.layers:
            layer.check_crop(new_len)
        for layer in self.layers:
            layer.crop_to(new_len)
        if self.first_real is not None:
            self.first_real = torch.where(self.first_real >= new_len, -1, self.first_real)
        self._step = None

    @property
    def is_croppable(self) -> bool:
        """Whether ``crop`` restores the cache exactly (transformers' assisted decoding asks):
        with ``rollback`` spare slots reserved, or no rolling layer at all."""
        return self.rollback > 0 or not any(layer.rolls for layer in self.layers)

    @property
    def is_compileable(self) -> bool:
        return False


class _SWALayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False
    rolls = False          # evicts keys (a crop may need rollback slots)

    def __init__(self, owner: SWACache, layer_idx: int):
        super().__init__()
        self.owner, self.layer_idx, self.seen = owner, layer_idx, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def _begin_update(self, key_states, value_states):
        """The step this update belongs to and its ``[B, q]`` real-token mask."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, q, _ = key_states.shape
        step = self.owner.step_for(self.seen, q, b, key_states.device)
        real = step.real if step.real is not None else step.once(
            ("real", b, q), lambda: torch.ones(b, q, dtype=torch.bool, device=key_states.device))
        return step, real

    def reset(self) -> None:
        for name, value in list(vars(self).items()):
            if torch.is_tensor(value):
                setattr(self, name, None)
        self.keys = self.values = None
        self.is_initialized, self.seen = False, 0

    def reorder_cache(self, beam_idx):
        self.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self.map_batch(lambda t: t[indices])

    def _batch_tensors(self) -> list[str]:
        return ["keys", "values"]

    def map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in self._batch_tensors():
            setattr(self, name, fn(getattr(self, name)))

    def nbytes(self) -> int:
        """Bytes of the layer's tensors (a sliding layer's ring and sink slots are views that
        split one buffer: each counts its part)."""
        held: dict[int, int] = {}
        for t in vars(self).values():
            if torch.is_tensor(t):
                held[t.data_ptr()] = max(held.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return sum(held.values())


class FullLayer(_SWALayer):
    """Every key kept: keys ``[B, Hkv, N, D]`` grow; ``key_real`` ``[B, N]``.  Full causal
    attention, or a decode_full window layer (``spec``): prompt queries attend their window
    and the sinks, queries from the row's boundary on attend every key."""
    is_sliding = False

    def __init__(self, owner: SWACache, layer_idx: int, spec: LayerSpec):
        super().__init__(owner, layer_idx)
        self.spec = spec

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.key_real = torch.zeros(b, 0, dtype=torch.bool, device=key_states.device)
        self.padded = False        # any pad seen: without, kernels take their unmasked paths
        self.is_initialized = True

    def _batch_tensors(self):
        return ["keys", "values", "key_real"]

    def update(self, key_states, value_states, *args, kwargs: dict | None = None, **extra):
        """key/value ``[B, Hkv, q, D]`` -> every key so far ``[B, Hkv, N, D]``."""
        b, _, q, _ = key_states.shape
        step, real = self._begin_update(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.key_real = torch.cat([self.key_real, real], dim=1)
        self.padded = self.padded or step.real is not None
        layout = KeyLayout(self.seen, 0, self.key_real if self.padded else None, memo=step.memo,
                           unmasked=q == 1 and not self.padded and not self.spec.decode_full)   # sees every key
        if self.spec.decode_full:
            layout.full_from = self.owner.boundary(step, key_states.device)
            if self.spec.sinks:
                first = self.owner.first_real
                index = first[:, None] + torch.arange(self.spec.sinks, device=first.device)
                gather_sinks(layout, self.keys, self.values, index,
                             (first[:, None] >= 0) & (index < self.seen + q))
        self.owner.publish(self.layer_idx, layout, kwargs)
        self.seen += q
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def shift_frame(self, delta: int, rope: LayerRope) -> None:
        if self.is_initialized:
            self.keys = rotate(self.keys, delta, rope)

    def check_crop(self, new_len: int) -> None:
        pass

    def crop_to(self, new_len: int) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[:, :, :new_len], self.values[:, :, :new_len]
            self.key_real = self.key_real[:, :new_len]
        self.seen = new_len


class SlidingLayer(_SWALayer):
    """Sink slots ``[B, Hkv, S, D]`` + a rolling buffer ``[B, Hkv, n, D]`` written in place.

    Both live in one buffer per tensor ``[B, Hkv, S + n, D]``: the S sink slots, then the ring;
    the attributes are views that split it (``keys``/``values``: the ring; ``sink_v``: the value
    sink slots; the key sink slots are ``sink_k`` in position mode ``original`` and
    ``sink_slots_k`` in ``shift``, where ``sink_k`` keeps the sinks un-rotated and each decode step
    writes them, rotated to its offsets, into ``sink_slots_k``).  A decode step so hands the kernel
    ``[sinks, ring]`` as one view (:func:`~swa_patch.backends.layout.cat_keys`) instead of a copy
    of the whole ring per layer and step.

    Host-side facts (no device sync per step) say when every slot is visible to a decode query,
    so that the kernel can drop the mask: ``held_from`` (the ring holds every stream index from
    there on), ``pads_until`` (no pad at or after it entered the ring) and ``sink_last`` (an upper
    bound on the newest sink's stream index, read once when the sinks fill).
    """
    is_sliding = True
    rolls = True

    def __init__(self, owner: SWACache, layer_idx: int, spec: LayerSpec):
        super().__init__(owner, layer_idx)
        self.spec, self.n = spec, spec.span + max(owner.rollback, 1) - 1   # rollback - 1 spare slots

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        dev, s = key_states.device, self.spec.sinks
        self._split(key_states.new_zeros(b, h, s + self.n, d),
                    value_states.new_zeros(b, h, s + self.n, value_states.shape[-1]))
        self.slot_index = torch.full((self.n,), -1, dtype=torch.long, device=dev)
        self.slot_real = torch.zeros(b, self.n, dtype=torch.bool, device=dev)
        if self.owner.position_mode == "shift":
            self.sink_k = key_states.new_zeros(b, h, s, d)      # un-rotated (frame position 0)
            self.sink_half = torch.zeros_like(self.sink_k)      # rotate_half(sink_k), for _add_sinks
            self.sink_offset = s + self.spec.span - 1 - torch.arange(s, device=dev)
        self.sink_filled = torch.zeros(b, s, dtype=torch.bool, device=dev)
        self.sinks_full, self.sink_last = False, None
        self.held_from = self.pads_until = 0
        self.is_initialized = True

    def _split(self, keys_all: torch.Tensor, values_all: torch.Tensor) -> None:
        """Point the attributes at the sink slots and the ring of ``[B, Hkv, S + n, D]`` buffers."""
        s = self.spec.sinks
        self.keys, self.values = keys_all[:, :, s:], values_all[:, :, s:]
        self.sink_v = values_all[:, :, :s]
        if self.owner.position_mode == "original":
            self.sink_k = keys_all[:, :, :s]
        else:
            self.sink_slots_k = keys_all[:, :, :s]

    def _key_sink_slots(self) -> torch.Tensor:
        return self.sink_k if self.owner.position_mode == "original" else self.sink_slots_k

    def _batch_tensors(self):
        shift = self.owner.position_mode == "shift"
        return ["slot_real", "sink_filled"] + (["sink_k", "sink_half"] if shift else [])

    def map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        keys_all, values_all = cat_keys(self._key_sink_slots(), self.keys), cat_keys(self.sink_v, self.values)
        super().map_batch(fn)                     # the tensors of _batch_tensors
        self._split(fn(keys_all), fn(values_all))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if query_length == 1:
            return self.n, 0
        old = min(self.seen, self.spec.cache_slots)
        return old + query_length, self.seen - old

    def update(self, key_states, value_states, *args, kwargs: dict | None = None, **extra):
        """key/value ``[B, Hkv, q, D]`` (rotated) -> the keys this step attends over:
        the buffer ``[B, Hkv, span, D]`` for q == 1, else ``[B, Hkv, old + q, D]`` in order."""
        b, _, q, _ = key_states.shape
        step, real = self._begin_update(key_states, value_states)
        sink_index = self._store_sinks(key_states, value_states, step, real)
        if q == 1:
            keys, values, layout = self._decode(key_states, value_states, step, real)
        else:
            keys, values, layout = self._chunk(key_states, value_states, step, real)
        if self.spec.sinks:
            self._add_sinks(layout, step, sink_index)
            if layout.sink_k.shape[-1] != keys.shape[-1]:      # shift-mode chunk: widened keys
                keys, values = _widen(keys, 0), _widen(values, 0)
        self.seen += q
        self.owner.publish(self.layer_idx, layout, kwargs)
        return keys, values

    def _store_sinks(self, k, v, step: _Step, real, sync: bool = True, frame_base=None) -> torch.Tensor:
        """Copy the chunk's sink tokens into the sink slots (in place); returns sink stream
        indices [B, S].  ``sync=False`` (static caches): no host sync, the copy runs every step.
        ``frame_base``: the stream index at frame position 0 of ``k`` (default: the cache's)."""
        s = self.spec.sinks
        first = self.owner.first_real
        sink_index = step.once(("sink_index", s), lambda: first[:, None] + torch.arange(s, device=k.device))
        if not s or (sync and self.sinks_full):
            return sink_index
        local = sink_index - step.start
        inside = (first[:, None] >= 0) & (local >= 0) & (local < step.length)
        local = local.clamp(0, step.length - 1)
        new = inside & real.gather(1, local)
        if not sync or bool(new.any()):
            idx = local[:, None, :, None]
            gk = k.gather(2, idx.expand(-1, k.shape[1], -1, k.shape[3]))
            gv = v.gather(2, idx.expand(-1, v.shape[1], -1, v.shape[3]))
            if self.owner.position_mode == "shift":     # store at frame position 0
                rope = self.owner.ropes[self.layer_idx]
                base = self.owner.base if frame_base is None else frame_base
                gk = rotate(gk, -(sink_index - base)[:, None, :], rope)
            sel = new[:, None, :, None]
            self.sink_k.copy_(torch.where(sel, gk, self.sink_k))
            self.sink_v.copy_(torch.where(sel, gv, self.sink_v))
            self.sink_filled |= new
            if sync and self.owner.position_mode == "shift":     # (static decode steps do not use it)
                self.sink_half.copy_(rotate_half(self.sink_k, rope))
            if sync:
                self._note_sinks_full()                  # then no more device syncs per step
        return sink_index

    def _note_sinks_full(self) -> None:
        """Whether every row's sinks are stored; when they first are, ``sink_last`` (one sync)."""
        was = self.sinks_full
        self.sinks_full = bool(self.sink_filled.all())
        if self.sinks_full and not was:
            self.sink_last = int(self.owner.first_real.max()) + self.spec.sinks - 1

    def _note_held(self, step: _Step) -> None:
        """After writing the step's tokens: the ring holds every index from ``held_from`` on (the
        n newest at most: a crop only removes the newest), and pads, if any, end before
        ``pads_until``."""
        end = step.start + step.length
        self.held_from = max(self.held_from, end - self.n)
        if step.real is not None:
            self.pads_until = end

    def _all_visible(self, i: int) -> bool:
        """Whether query ``i`` (just written) sees every slot of ``[sinks, ring]``, so the kernel
        needs no mask: an undilated window whose ring (no spare rollback slots) holds exactly the
        ``span`` tokens of the band, none a pad, and every row's sinks stored and older than the band
        (a sink inside the band would be counted twice without the mask)."""
        spec, band_start = self.spec, i - self.spec.span + 1
        if spec.dilation != 1 or spec.per_head or self.n != spec.span:
            return False
        if self.held_from > band_start or self.pads_until > band_start:
            return False
        return not spec.sinks or (self.sinks_full and self.sink_last < band_start)

    def _decode(self, k, v, step: _Step, real):
        slot = step.start % self.n
        self.keys.narrow(2, slot, 1).copy_(k)
        self.values.narrow(2, slot, 1).copy_(v)
        self.slot_index[slot] = step.start
        self.slot_real.narrow(1, slot, 1).copy_(real)
        self._note_held(step)
        layout = KeyLayout(step.start, 0, self.slot_real, memo=step.memo, key_index=self.slot_index,
                           unmasked=self._all_visible(step.start))
        return self.keys, self.values, layout

    def _stored_keys(self, slots: torch.Tensor) -> torch.Tensor:
        """Buffered keys of ``slots`` as the chunk's attention needs them (in the current frame)."""
        return self.keys[:, :, slots]

    def _to_store(self, keys: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Keys of stream indices ``idx`` as the buffer keeps them."""
        return keys

    def _chunk(self, k, v, step: _Step, real):
        old = min(step.start, self.spec.cache_slots)      # the band of the chunk's first query
        slots = torch.arange(step.start - old, step.start, device=k.device) % self.n
        keys = torch.cat([self._stored_keys(slots), k], dim=2)
        values = torch.cat([self.values[:, :, slots], v], dim=2)
        key_real = torch.cat([self.slot_real[:, slots], real], dim=1)
        keep = min(self.n, old + step.length)
        end = step.start + step.length
        idx = torch.arange(end - keep, end, device=k.device)
        self.keys[:, :, idx % self.n] = self._to_store(keys[:, :, -keep:], idx)
        self.values[:, :, idx % self.n] = values[:, :, -keep:]
        self.slot_index[idx % self.n] = idx
        self.slot_real[:, idx % self.n] = key_real[:, -keep:]
        self._note_held(step)
        layout = KeyLayout(step.start, step.start - old, key_real, memo=step.memo)
        return keys, values, layout

    def _add_sinks(self, layout: KeyLayout, step: _Step, sink_index) -> None:
        layout.sink_index = sink_index          # once full, the sinks' validity never changes in place
        layout.sink_valid = self.sink_filled if self.sinks_full else self.sink_filled.clone()
        if self.owner.position_mode == "original":
            layout.sink_k, layout.sink_v = self.sink_k, self.sink_v
            return
        rope = self.owner.ropes[self.layer_idx]
        if step.length == 1:      # one query: rotate the S sinks to (query position - offset), in place
            s, dim = self.spec.sinks, self.sink_k.shape[-1]
            key = ("sink_rotation", self.owner.rope_group[self.layer_idx], s, self.spec.span, dim, self.sink_k.dtype)
            cos, sin = step.once(key, lambda: rotation_tables(step.positions[0] - self.sink_offset, rope, dim,
                                                              self.sink_k.dtype))
            layout.sink_k = rotate_with(self.sink_k, self.sink_half, cos, sin, out=self.sink_slots_k)
            layout.sink_v = self.sink_v
            return
        layout.sink_k = _widen(rotate(self.sink_k, -self.sink_offset, rope), 1)
        layout.sink_v = _widen(self.sink_v, 0)
        layout.query_extra = _sink_query(step.positions, rope)

    def shift_frame(self, delta: int, rope: LayerRope) -> None:
        if self.is_initialized:
            self.keys.copy_(rotate(self.keys, delta, rope))     # in place: the ring stays a view

    def check_crop(self, new_len: int) -> None:
        """The next query (stream index ``new_len``) needs keys from ``new_len - span + 1`` on;
        the buffer holds the last ``n`` tokens seen."""
        if max(0, new_len - self.spec.cache_slots) < self.seen - self.n:
            limit = self.n - self.spec.span + 1
            raise ValueError(f"cannot crop layer {self.layer_idx} back to {new_len} tokens ({self.seen - new_len} "
                             f"removed): its rolling buffer keeps {limit} token(s) of rollback and has evicted keys "
                             f"the next query needs; reserve more with swa_patch.make_cache(model, rollback=K)")

    def crop_to(self, new_len: int) -> None:
        if new_len == 0:
            self.reset()
            return
        if self.is_initialized:
            gone = self.slot_index >= new_len
            self.slot_index[gone] = -1
            self.slot_real[:, gone] = False
            first = self.owner.first_real[:, None] + torch.arange(self.spec.sinks, device=self.keys.device)
            self.sink_filled = self.sink_filled & (first < new_len)
            self._note_sinks_full()
        self.seen = new_len


class SplitLayer(_SWALayer):
    """A layer whose KV heads differ in kind (``window=[[W, None, ...]]``, ``decode=[[heads] per
    layer]``): the windowed heads live in a :class:`SlidingLayer` (sinks + ring, constant memory),
    the full heads and the heads that decode fully in a :class:`FullLayer` that grows; the attention function gets both parts as
    :class:`~swa_patch.attention.SplitKeys` and runs each head group on its own part's keys."""
    is_sliding = False
    rolls = True

    def __init__(self, owner: SWACache, layer_idx: int, spec: LayerSpec):
        super().__init__(owner, layer_idx)
        self.spec = spec
        self.window_heads, self.full_heads, growing = _head_kinds(spec)
        windows = spec.kv_windows or (spec.window,) * (len(self.window_heads) + len(self.full_heads))
        windowed = dataclasses.replace(spec, window=tuple(windows[h] for h in self.window_heads), kv_windows=None,
                                       kv_decode_full=None)
        self.window_part = SlidingLayer(owner, layer_idx, windowed)
        self.full_part = FullLayer(owner, layer_idx, growing)

    @property
    def parts(self) -> tuple["_SWALayer", "_SWALayer"]:
        return self.window_part, self.full_part

    def lazy_initialization(self, key_states, value_states):
        self.is_initialized = True

    def update(self, key_states, value_states, *args, kwargs: dict | None = None, **extra):
        """key/value ``[B, Hkv, q, D]`` -> the windowed heads' keys and values (the full heads'
        travel in the published :class:`~swa_patch.attention.SplitKeys`)."""
        self.is_initialized = True
        out = []
        for part, heads in ((self.window_part, self.window_heads), (self.full_part, self.full_heads)):
            published: dict = {}
            k, v = part.update(_heads(key_states, heads), _heads(value_states, heads), kwargs=published)
            out.append((k, v, published["swa_keys"]))
        self.keys, self.values = self.full_part.keys, self.full_part.values
        self.seen += key_states.shape[2]
        self.owner.publish(self.layer_idx, SplitKeys(key_states.shape[1], self.window_heads, out[0],
                                                     self.full_heads, out[1]), kwargs)
        return out[0][0], out[0][1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.full_part.get_mask_sizes(query_length)

    def map_batch(self, fn) -> None:
        for part in self.parts:
            part.map_batch(fn)
        self.keys, self.values = self.full_part.keys, self.full_part.values

    def nbytes(self) -> int:
        return sum(part.nbytes() for part in self.parts)

    def reset(self) -> None:
        for part in self.parts:
            part.reset()
        self.keys = self.values = None
        self.is_initialized, self.seen = False, 0

    def shift_frame(self, delta: int, rope: LayerRope) -> None:
        for part in self.parts:
            part.shift_frame(delta, rope)

    def check_crop(self, new_len: int) -> None:
        self.window_part.check_crop(new_len)

    def crop_to(self, new_len: int) -> None:
        for part in self.parts:
            part.crop_to(new_len)
        self.keys, self.values = self.full_part.keys, self.full_part.values
        self.seen = new_len


def _head_kinds(spec: LayerSpec) -> tuple[list[int], list[int], LayerSpec]:
    """(KV heads that only roll, KV heads that keep every key, the spec of a cache layer holding the
    latter: full, or marked decode_full so it records the boundary and gathers the sinks that a
    decode-full head's prompt queries see)."""
    n_kv = len(spec.kv_windows or spec.kv_decode_full)
    windows = spec.kv_windows or (spec.window,) * n_kv
    decodes = spec.kv_decode_full or (spec.decode_full,) * n_kv
    rolling = [h for h in range(n_kv) if windows[h] is not None and not decodes[h]]
    growing = [h for h in range(n_kv) if windows[h] is None or decodes[h]]
    decoding = [windows[h] for h in growing if decodes[h] and windows[h] is not None]
    kept = LayerSpec(max(decoding), spec.dilation, spec.sinks, decode_full=True) if decoding else LayerSpec(None)
    return rolling, growing, kept


def _heads(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """``x[:, heads]``: a view when the heads are consecutive."""
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return x[:, heads[0]:heads[0] + len(heads)]
    return x[:, heads]


def _rope_groups(ropes: list[LayerRope] | None) -> list[int] | None:
    """Per layer, the first layer with the same RoPE frequencies (most models: one for all)."""
    if ropes is None:
        return None
    firsts: list[int] = []
    groups: list[int] = []
    for i, rope in enumerate(ropes):
        same = (j for j in firsts if ropes[j].inv_freq.shape == rope.inv_freq.shape
                and torch.equal(ropes[j].inv_freq, rope.inv_freq))
        groups.append(next(same, i))
        if groups[-1] == i:
            firsts.append(i)
    return groups


def _widen(x: torch.Tensor, half: int) -> torch.Tensor:
    """``[..., D]`` -> ``[..., 2D]`` with ``x`` in the first (half=0) or second half."""
    zeros = torch.zeros_like(x)
    return torch.cat([x, zeros] if half == 0 else [zeros, x], dim=-1)


def _sink_query(positions: torch.Tensor, rope: LayerRope):
    """For a shift-mode chunk: maps rotated queries ``[B, H, q, D]`` to their un-rotated form
    ``R(-p) q`` so that ``[q, R(-p) q] . [0, R(-offset_k) sink_k]`` scores each sink at offset_k
    from every query, while ``[q, R(-p) q] . [k, 0]`` keeps the window scores."""
    return lambda query: rotate(query, -positions, rope)
