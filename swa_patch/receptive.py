"""The receptive field of a patched stack: which input positions the last position can see.

A layer with window ``W`` and dilation ``d`` lets query ``i`` read keys ``i - k*d``
(``k < W``); stacking layers composes these offsets, so after layers ``1..l`` the last
position depends on input positions ``q - (a_1 + ... + a_l)`` with each ``a`` from its
layer's offset set.  With dilation the reachable set can have **holes** (e.g. every layer
with d=2 only reaches even distances), so two numbers are reported:

* ``reach``: the span from the oldest reachable input position to the query, the query
  itself included (``q - oldest + 1``).  For a uniform stack of L layers this is
  ``L*(W-1) + 1``; in general ``sum_l (W_l - 1)*d_l + 1``.
* ``reachable``: how many positions inside that span are actually reachable (``<= reach``).

Two regimes:

* ``seq_len=None`` (default): a stream long enough that the start is out of reach (the
  steady state of streaming).  Sinks are *not* counted (they sit at the start of the
  stream, outside any finite span; see ``sinks`` in the detail rows).  A stack with a
  full-attention layer has no finite reach: a :class:`ValueError` asks for ``seq_len``.
* ``seq_len=n``: exact for the last position ``n-1`` of an ``n``-token, unpadded sequence,
  sinks (the first S tokens) and full layers included; the reach is then at most ``n``.

Everything is computed exactly with bitsets (Python ints, bit ``t`` = distance ``t`` from
the query, or position ``t`` when ``seq_len`` is given).
"""
from __future__ import annotations

from dataclasses import dataclass

from .masks import LayerSpec


@dataclass(frozen=True)
class LayerReach:
    """One row of the per-layer table: the stack's reach *after* this layer."""

    layer: int
    window: int | None      # None: full attention
    dilation: int
    sinks: int
    span: int | None        # this layer alone: (W-1)*d + 1 (None: full)
    reach: int              # oldest reachable input position .. query, query included
    reachable: int          # positions inside ``reach`` actually reachable (holes excluded)

    @property
    def holes(self) -> int:
        return self.reach - self.reachable


def _offsets(spec: LayerSpec) -> int:
    """Bitset of the distances one layer reads (bit t: query - t)."""
    bits = 0
    for k in range(spec.window):
        bits |= 1 << (k * spec.dilation)
    return bits


def _shift_or(bits: int, spec: LayerSpec, right: bool) -> int:
    """Minkowski sum of ``bits`` with the layer's distances ``{0, d, .., (W-1)*d}``: the OR of
    ``bits`` shifted by each of them (towards lower bits when ``right``), by doubling."""
    def shift(x, t):
        return x >> t if right else x << t

    out, offset, block, count, remaining = 0, 0, bits, 1, spec.window
    while remaining:           # block = OR of shifts by k*d for k < count (count = 1, 2, 4, ..)
        if remaining & 1:
            out |= shift(block, offset * spec.dilation)
            offset += count
        block |= shift(block, count * spec.dilation)
        count, remaining = count * 2, remaining >> 1
    return out


def specs_for(model_or_config, **patch_options) -> list[LayerSpec]:
    """Per-layer specs for a patched model (its own settings), or for a model / config and
    ``patch_model`` options (``window``, ``sinks``, ``dilation``, ``full_layers``,
    ``schedule``), validated exactly as ``patch_model`` would."""
    from .config import SWAConfig
    from .families import native_full_layers

    state = getattr(model_or_config, "_swa_patch_state", None)
    if state is not None and not patch_options:
        return list(state["specs"])
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    n_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(n_layers, int):
        raise TypeError(f"receptive_field needs a model or a config with num_hidden_layers, got "
                        f"{type(model_or_config).__name__}")
    options = dict(patch_options)
    settings = SWAConfig.from_kwargs(options.pop("window", None), options.pop("sinks", 0), options)
    return settings.layer_specs(n_layers, native_full_layers(config))


def layer_reach(model_or_config, seq_len: int | None = None, **patch_options) -> list[LayerReach]:
    """The reach after each layer (see the module docstring for the two regimes)."""
    return reach_of_specs(specs_for(model_or_config, **patch_options), seq_len)


def reach_of_specs(specs: list[LayerSpec], seq_len: int | None = None) -> list[LayerReach]:
    if seq_len is None:
        full = [i for i, s in enumerate(specs) if s.window is None]
        if full:
            raise ValueError(f"layers {full} use full attention: the stack's receptive field is the "
                             f"whole sequence; pass seq_len=<tokens> for an exact figure")
        bits, rows = 1, []                     # bit t: input at distance t from the query
        for idx, spec in enumerate(specs):
            bits = _shift_or(bits, spec, right=False)
            rows.append(_row(idx, spec, bits.bit_length(), bits.bit_count()))
        return rows
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    q = seq_len - 1
    bits, rows = 1 << q, []                    # bit p: input position p; start from the query
    # Walk the stack top-down: the inputs of layer l that the (already reached) outputs read.
    # Rows are reported bottom-up: the reach of layers 0..l as seen from the query, which is
    # the top-down walk of a stack made of layers 0..l only; compute each prefix exactly.
    for top in range(len(specs)):
        bits = 1 << q
        for spec in reversed(specs[: top + 1]):
            bits = _layer_inputs(bits, spec)
        lowest = (bits & -bits).bit_length() - 1
        rows.append(_row(top, specs[top], q - lowest + 1, bits.bit_count()))
    return rows


def _layer_inputs(bits: int, spec: LayerSpec) -> int:
    """Positions read by the positions in ``bits`` through one layer (unpadded stream)."""
    highest = bits.bit_length() - 1
    if spec.window is None:
        return (1 << (highest + 1)) - 1        # full causal: every position up to the highest
    out = _shift_or(bits, spec, right=True)
    if spec.sinks:
        out |= (1 << min(spec.sinks, highest + 1)) - 1   # sink j is read by any query i >= j
    return out


def reachable_positions(model_or_config, seq_len: int, **patch_options) -> list[int]:
    """Input positions (0-based) the last of ``seq_len`` unpadded tokens depends on through
    the whole stack, holes left out (the exact set behind ``reach`` and ``reachable``)."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    bits = 1 << (seq_len - 1)
    for spec in reversed(specs_for(model_or_config, **patch_options)):
        bits = _layer_inputs(bits, spec)
    return [p for p in range(seq_len) if bits >> p & 1]


def _row(idx, spec, reach, reachable) -> LayerReach:
    return LayerReach(idx, spec.window, spec.dilation if spec.window is not None else 1,
                      spec.sinks if spec.window is not None else 0, spec.span, reach, reachable)


def receptive_field(model_or_config, seq_len: int | None = None, **patch_options) -> int:
    """Span of input positions the last position can see through the whole stack, itself
    included: ``L*(W-1) + 1`` for a uniform stack of L layers with window W,
    ``sum_l (W_l-1)*d_l + 1`` with dilations (a span that may contain unreachable holes;
    :func:`layer_reach` reports how many positions are really reachable).

    ``model_or_config``: a patched model (its own settings are used), or a model / config
    plus ``patch_model`` options (``window=``, ``dilation=``, ``full_layers=``, ``schedule=``,
    ``sinks=``).  ``seq_len=None``: a long stream (sinks not counted; full-attention layers
    raise); ``seq_len=n``: exact for the last token of an n-token sequence, sinks and full
    layers included.
    """
    return layer_reach(model_or_config, seq_len, **patch_options)[-1].reach
