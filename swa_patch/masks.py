"""Mask predicates shared by every backend, cache and the dense reference.

Window convention (transformers' ``sliding_window=W``): query ``i`` sees key ``j`` iff
``i - W < j <= i``.  With dilation ``d`` it sees ``j = i - k*d`` for ``k = 0 .. W-1``
(a span of ``(W-1)*d + 1`` positions).  Sinks: keys ``j`` among the first ``S`` real
tokens of the stream are visible to every later query, undilated.  All indices here are
*stream indices*: the position of a token in the input stream, pads included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerSpec:
    """What one attention layer sees.  ``window=None`` means full causal attention."""

    window: int | None
    dilation: int = 1
    sinks: int = 0

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
    diff = i - j
    inside = diff >= 0
    if spec.window is not None:
        inside = inside & (diff < spec.span)
        if spec.dilation > 1:
            inside = inside & (diff % spec.dilation == 0)
    return inside


def reference_mask(spec: LayerSpec, n: int, attention_mask: torch.Tensor | None = None,
                   device=None) -> torch.Tensor:
    """Dense boolean mask ``[B, n, n]`` over stream indices for a whole sequence.

    ``attention_mask`` is the usual 2-D ``[B, n]`` padding mask (1 = real token).  A pad
    query sees itself only, so no row is empty.  This is the reference every backend and
    cache is tested against.
    """
    real = (torch.ones(1, n, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.bool())
    idx = torch.arange(n, device=real.device)
    i, j = idx[:, None], idx[None, :]
    first_real = first_real_index(real)  # [B]
    sink = (j[None] >= first_real[:, None, None]) & (j[None] < first_real[:, None, None] + spec.sinks)
    visible = band(i, j, spec)[None] | (sink & (j <= i)[None])
    return (visible & real[:, None, :]) | (i == j)[None]


def first_real_index(real: torch.Tensor) -> torch.Tensor:
    """Index of the first real token of each row of a ``[B, n]`` boolean mask."""
    return real.int().argmax(dim=-1)


def slot_mask(spec: LayerSpec, i: torch.Tensor, j: torch.Tensor, is_sink_slot: torch.Tensor,
              valid: torch.Tensor) -> torch.Tensor:
    """Visibility of key slots that hold stream index ``j``; all arguments broadcast.

    Keys come in two kinds.  A *contiguous* key is visible when it is in the band (and is a
    real token, or the query itself).  A *sink slot* holds a copy of one of the first S real
    tokens; it is visible when that token is in the past and **not** already in the band,
    so a token that is both sink and in-window is counted exactly once.
    """
    in_band = band(i, j, spec)
    sink_part = is_sink_slot & valid & (j <= i) & ~in_band
    band_part = ~is_sink_slot & in_band & (valid | (i == j))
    return sink_part | band_part
