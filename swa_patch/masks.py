"""Mask predicates shared by every backend, cache and the dense reference.

Window convention (transformers' ``sliding_window=W``): query ``i`` sees key ``j`` iff
``i - W < j <= i``.  With dilation ``d`` it sees ``j = i - k*d`` for ``k = 0 .. W-1``
(a span of ``(W-1)*d + 1`` positions); a layer may give each query head its own ``d``, and each
KV head its own ``W`` (``None``: that head attends fully; its GQA query heads follow it).
Sinks: keys ``j`` among the first ``S`` real tokens of the stream are visible to every
later query, undilated.  A ``decode_full`` layer windows only the prompt: each row has a
boundary ``full_from`` (``P - 1`` for a prompt of ``P`` tokens, the query whose output is
the first answer token), and queries ``i >= full_from`` see every earlier real key.  All
indices here are *stream indices*: the position of a token in the input stream, pads
included.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerSpec:
    """What one attention layer sees.  ``window=None`` means full causal attention.

    ``dilation`` is an int, or one int per query head.  Per-head values that differ are kept
    in ``head_dilations`` and ``dilation`` becomes their maximum, so ``span`` and
    ``cache_slots`` cover every head; kernels run one uniform spec per group of heads
    (:meth:`head_groups`), never the per-head spec itself.

    ``window`` may also be given as one entry per KV head (``None`` = full attention for that
    head).  Entries that differ are kept in ``kv_windows`` and ``window`` becomes the widest
    int, so ``span`` covers every windowed head; query head ``h`` follows KV head
    ``h // (H / Hkv)``.

    ``decode_full``: queries from each row's prompt boundary on (``full_from``) see every
    earlier key (``patch_model(..., decode="full")``); the window applies before it.
    ``kv_decode_full``: the same per KV head (``decode=[[KV heads] per layer]``), when the heads differ.
    """

    window: int | None
    dilation: int = 1
    sinks: int = 0
    head_dilations: tuple[int, ...] | None = None
    decode_full: bool = False
    kv_windows: tuple[int | None, ...] | None = None
    kv_decode_full: tuple[bool, ...] | None = None

    def __post_init__(self):
        flags = self.kv_decode_full
        if flags is not None:
            flags = tuple(bool(f) for f in flags)
            if all(flags):
                object.__setattr__(self, "decode_full", True)
            object.__setattr__(self, "kv_decode_full", None if all(flags) or not any(flags) else flags)
        per_kv = self.kv_windows
        if isinstance(self.window, (list, tuple)):
            per_kv = self.window
        if per_kv is not None:
            per_kv = tuple(per_kv)
            widths = [w for w in per_kv if w is not None]
            object.__setattr__(self, "window", max(widths) if widths else None)
            object.__setattr__(self, "kv_windows", per_kv if len(set(per_kv)) > 1 else None)
        per_head = self.head_dilations
        if isinstance(self.dilation, (list, tuple)):
            per_head = self.dilation
        if per_head is not None:
            per_head = tuple(per_head)
            object.__setattr__(self, "dilation", max(per_head))
            object.__setattr__(self, "head_dilations", per_head if len(set(per_head)) > 1 else None)

    @property
    def per_head(self) -> bool:
        """Heads differ (dilation, window or decode): kernels run :meth:`head_groups`, never this spec."""
        return self.head_dilations is not None or self.kv_windows is not None or self.kv_decode_full is not None

    @property
    def any_decode_full(self) -> bool:
        """Some head attends fully from the prompt boundary on."""
        return self.decode_full or self.kv_decode_full is not None

    @property
    def grows(self) -> bool:
        """Some KV head keeps every key (a full head, or a head that decodes fully)."""
        return self.window is None or self.any_decode_full or self.has_full_heads

    @property
    def has_full_heads(self) -> bool:
        """Some KV head attends fully (its cache grows; the others roll)."""
        return self.kv_windows is not None and None in self.kv_windows

    @functools.cache     # called per layer per call (decode steps too); specs are few and frozen
    def head_groups(self, n_heads: int, n_kv_heads: int | None = None) -> list[tuple["LayerSpec", list[int]]]:
        """``(uniform spec, query heads)`` for each distinct (window, dilation), heads in order;
        full heads (a ``None`` KV window) last, as ``LayerSpec(None)``."""
        if not self.per_head:
            return [(self, list(range(n_heads)))]
        if self.head_dilations is not None and len(self.head_dilations) != n_heads:
            raise ValueError(f"this layer has {len(self.head_dilations)} per-head dilations but the "
                             f"call has {n_heads} query heads")
        windows = self.kv_windows or (self.window,)
        if self.kv_windows is not None and ((n_kv_heads not in (None, len(windows))) or n_heads % len(windows)):
            raise ValueError(f"this layer has {len(windows)} per-KV-head windows but the call has "
                             f"{n_kv_heads} KV heads and {n_heads} query heads")
        if self.kv_decode_full is not None and ((n_kv_heads not in (None, len(self.kv_decode_full)))
                                                or n_heads % len(self.kv_decode_full)):
            raise ValueError(f"this layer has {len(self.kv_decode_full)} per-KV-head decode modes but the call "
                             f"has {n_kv_heads} KV heads and {n_heads} query heads")
        flags = self.kv_decode_full or (self.decode_full,)
        groups: dict[tuple, list[int]] = {}
        for head in range(n_heads):
            w = windows[head * len(windows) // n_heads]
            d = self.dilation if self.head_dilations is None else self.head_dilations[head]
            full = flags[head * len(flags) // n_heads] and w is not None
            groups.setdefault((w is None, w or 0, d if w is not None else 1, full), []).append(head)
        return [(self.uniform(w or None, d, full), heads) for (_, w, d, full), heads in sorted(groups.items())]

    def uniform(self, window: int | None, dilation: int, decode_full: bool | None = None) -> "LayerSpec":
        """This spec with one window, dilation and decode mode for every head (``None``: full attention)."""
        if window is None:
            return LayerSpec(None)
        return dataclasses.replace(self, window=window, dilation=dilation, head_dilations=None, kv_windows=None,
                                   kv_decode_full=None,
                                   decode_full=self.decode_full if decode_full is None else decode_full)

    def windowed(self) -> "LayerSpec":
        """The window that applies before the prompt boundary (this spec without decode_full)."""
        return dataclasses.replace(self, decode_full=False, kv_decode_full=None)

    @property
    def span(self) -> int | None:
        """Distance from the oldest visible key to the query, plus one."""
        return None if self.window is None else (self.window - 1) * self.dilation + 1

    @property
    def cache_slots(self) -> int | None:
        """Keys a cache must keep so the *next* query sees its whole band: span - 1."""
        return None if self.window is None else self.span - 1


def band(i: torch.Tensor, j: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """True where key ``j`` is in query ``i``'s (dilated) window; broadcasts."""
    if spec.per_head:
        raise ValueError("a per-head dilation or window has one band per head: use spec.head_groups()")
    diff = i - j
    inside = diff >= 0
    if spec.window is not None:
        inside = inside & (diff < spec.span)
        if spec.dilation > 1:
            inside = inside & (diff % spec.dilation == 0)
    return inside


def reference_mask(spec: LayerSpec, n: int, attention_mask: torch.Tensor | None = None,
                   device=None, full_from: torch.Tensor | None = None,
                   documents: torch.Tensor | None = None, heads: int | None = None) -> torch.Tensor:
    """Dense boolean mask ``[B, n, n]`` over stream indices for a whole sequence
    (``[B, H, n, n]`` for a per-head dilation or window: one mask per query head; ``heads``:
    the number of query heads, default one per per-head entry).

    ``attention_mask`` is the usual 2-D ``[B, n]`` padding mask (1 = real token).  A pad
    query sees itself only, so no row is empty.  ``full_from`` ``[B]`` (decode_full specs):
    each row's first query that sees every earlier key; default ``n - 1`` (the whole input
    is the prompt, its last token predicts the answer).  ``documents`` ``[B, n]`` (packed rows):
    a document id per token, as transformers' ``find_packed_sequence_indices`` gives; a query
    sees keys of its own document only, and the sinks are the first S real tokens of each
    document.  This is the reference every backend and cache is tested against.
    """
    if spec.per_head:
        return _per_head_reference(spec, n, attention_mask, device, full_from, documents, heads)
    real = (torch.ones(1, n, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.bool())
    idx = torch.arange(n, device=real.device)
    i, j = idx[:, None], idx[None, :]
    doc = (torch.zeros(1, n, dtype=torch.long, device=real.device) if documents is None
           else torch.as_tensor(documents, device=real.device))
    same = doc[:, :, None] == doc[:, None, :]                                    # [B, n, n]
    # first real token of each key's document: the one the sinks count from
    first_real = torch.where(same & real[:, None, :], j[None], n).amin(-1)      # [B, n]
    sink = (j[None] >= first_real[:, None, :]) & (j[None] < first_real[:, None, :] + spec.sinks)
    visible = band(i, j, spec)[None] | (sink & (j <= i)[None])
    if spec.decode_full:
        full_from = torch.full((1,), n - 1) if full_from is None else torch.as_tensor(full_from)
        full_query = i[None] >= full_from.to(real.device).view(-1, 1, 1)
        visible = torch.where(full_query, (j <= i)[None], visible)
    return (visible & same & real[:, None, :]) | (i == j)[None]


def _per_head_reference(spec: LayerSpec, n, attention_mask, device, full_from, documents, heads):
    """One mask per query head ``h``: the window of its KV head ``h // (heads / Hkv)`` and its own
    dilation, worked out here head by head (not through :meth:`LayerSpec.head_groups`)."""
    kv = spec.kv_windows or (spec.window,)
    flags = spec.kv_decode_full or (spec.decode_full,)
    n_kv = max(len(kv), len(flags))
    heads = heads or (len(spec.head_dilations) if spec.head_dilations is not None else n_kv)
    if heads % n_kv:
        raise ValueError(f"{heads} query heads cannot share {n_kv} KV heads evenly")
    by_spec, per_head = {}, []
    for head in range(heads):
        window = kv[head // (heads // len(kv))]
        d = spec.head_dilations[head] if spec.head_dilations is not None else spec.dilation
        full = flags[head // (heads // len(flags))]
        one = (LayerSpec(None) if window is None else
               dataclasses.replace(spec, window=window, dilation=d, head_dilations=None, kv_windows=None,
                                   kv_decode_full=None, decode_full=full))
        if one not in by_spec:
            by_spec[one] = reference_mask(one, n, attention_mask, device, full_from, documents)
        per_head.append(by_spec[one])
    return torch.stack(per_head, dim=1)


def first_real_index(real: torch.Tensor) -> torch.Tensor:
    """Index of the first real token of each row of a ``[B, n]`` boolean mask."""
    return real.int().argmax(dim=-1)


def slot_mask(spec: LayerSpec, i: torch.Tensor, j: torch.Tensor, is_sink_slot: torch.Tensor,
              valid: torch.Tensor, full_query: torch.Tensor | None = None) -> torch.Tensor:
    """Visibility of key slots that hold stream index ``j``; all arguments broadcast.

    Keys come in two kinds.  A *contiguous* key is visible when it is in the band (and is a
    real token, or the query itself).  A *sink slot* holds a copy of one of the first S real
    tokens; it is visible when that token is in the past and **not** already in the band,
    so a token that is both sink and in-window is counted exactly once.  ``full_query``
    (decode_full specs): queries at or past their row's boundary see every earlier
    contiguous key and no sink slot (their sinks are among the contiguous keys).
    """
    in_band = band(i, j, spec)
    sink_part = is_sink_slot & valid & (j <= i) & ~in_band
    band_part = ~is_sink_slot & in_band & (valid | (i == j))
    if full_query is None:
        return sink_part | band_part
    full_part = ~is_sink_slot & (j <= i) & (valid | (i == j))
    return torch.where(full_query, full_part, sink_part | band_part)
