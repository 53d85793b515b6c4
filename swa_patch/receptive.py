"""The receptive field of a patched stack: which input positions the last position can see.

A layer with window ``W`` and dilation ``d`` lets query ``i`` read keys ``i - k*d``
(``k < W``); stacking layers composes these offsets, so after layers ``1..l`` the last
position depends on input positions ``q - (a_1 + ... + a_l)`` with each ``a`` from its
layer's offset set.  With dilation the reachable set can have **holes** (e.g. every layer
with d=2 only reaches even distances), so two numbers are reported:

* ``reach``: the span from the oldest reachable input position to the query, the query
  itself included (``q - oldest + 1``).  For a uniform stack of L layers this is
  ``L*(W-1) + 1``; in general ``sum_l (W_l - 1)*d_l + 1`` (``d_l``: the largest dilation
  of the layer's heads when each head has its own; the layer reads the union of theirs).
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

from . import compat
from .config import max_dilation
from .masks import LayerSpec


@dataclass(frozen=True)
class LayerReach:
    """One row of the per-layer table: the stack's reach *after* this layer."""

    layer: int
    window: int | None      # None: full attention
    dilation: int | tuple     # a tuple: one per query head
    sinks: int
    span: int | None        # this layer alone: (W-1)*d + 1 (None: full)
    reach: int              # oldest reachable input position .. query, query included
    reachable: int          # positions inside ``reach`` actually reachable (holes excluded)

    @property
    def holes(self) -> int:
        return self.reach - self.reachable


def _shift_or(bits: int, spec: LayerSpec, right: bool) -> int:
    """Minkowski sum of ``bits`` with the layer's distances ``{0, d, .., (W-1)*d}``: the OR of
    ``bits`` shifted by each of them (towards lower bits when ``right``), by doubling.  With
    per-head dilations the layer reads the union of its heads' distances, and the sum
    distributes over that union."""
    if spec.per_head:
        heads = len(spec.head_dilations) if spec.head_dilations is not None else len(spec.kv_windows)
        out = 0
        for head_spec in {LayerSpec(g.window, g.dilation) for g, _ in spec.head_groups(heads)}:
            out |= _shift_or(bits, head_spec, right)
        return out

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
    return settings.layer_specs(n_layers, native_full_layers(config), getattr(config, "num_attention_heads", None),
                                compat.kv_heads(config))


def layer_reach(model_or_config, seq_len: int | None = None, **patch_options) -> list[LayerReach]:
    """The reach after each layer (see the module docstring for the two regimes)."""
    return reach_of_specs(specs_for(model_or_config, **patch_options), seq_len)


def reach_of_specs(specs: list[LayerSpec], seq_len: int | None = None) -> list[LayerReach]:
    if seq_len is None:
        full = [i for i, s in enumerate(specs) if s.window is None or s.has_full_heads]
        if full:
            raise ValueError(f"layers {full} use full attention (in some head): the stack's receptive field is the "
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
    if spec.window is None or spec.has_full_heads:
        return (1 << (highest + 1)) - 1        # full causal (in some head): every position up to the highest
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
    dilation = spec.head_dilations or spec.dilation
    return LayerReach(idx, spec.window, dilation if spec.window is not None else 1,
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


# ---- the ``swa-patch receptive-field`` sub-command ------------------------------------------

def _per_layer_arg(name: str, tokens: list[str] | None, allow_full: bool):
    """``8`` -> 8; ``1x6 2x6`` -> [1]*6 + [2]*6; ``full`` -> None (windows only);
    ``1,2,4,8`` -> (1, 2, 4, 8), one value per head (dilations only)."""
    if not tokens:
        return None
    values = []
    for token in tokens:
        value, _, times = token.partition("x")
        try:
            if allow_full and value == "full":
                item = None
            elif not allow_full and "," in value:
                item = tuple(int(part) for part in value.split(","))
            else:
                item = int(value)
            count = int(times) if times else 1
        except ValueError:
            heads = "" if allow_full else ", D,D,.. (one per head)"
            raise SystemExit(f"--{name}: cannot read {token!r}; use an int, "
                             f"{'full, ' if allow_full else ''}or VALUExCOUNT (e.g. 2x6){heads}") from None
        values += [item] * count
    return values[0] if len(values) == 1 and len(tokens) == 1 and "x" not in tokens[0] else values


def load_config(model: str, layers: int | None = None):
    """A transformers config from a model folder, a config.json, or a ``model_type``."""
    import os

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    overrides = {} if layers is None else {"num_hidden_layers": layers}
    if os.path.exists(model):
        config = AutoConfig.from_pretrained(model)
        if layers is not None:
            config.num_hidden_layers = layers
            types = getattr(config, "layer_types", None)
            if types is not None and len(types) != layers:
                raise SystemExit(f"--layers {layers}: {model} declares layer_types for "
                                 f"{len(types)} layers; drop --layers or use a model_type")
        return config
    if model in CONFIG_MAPPING:
        return AutoConfig.for_model(model, **overrides)
    raise SystemExit(f"--model {model!r} is neither a path nor a known model_type")


def _dilation_text(dilation) -> str:
    """``4``, or the distinct per-head dilations ``1/2/4/8``."""
    return str(dilation) if isinstance(dilation, int) else "/".join(map(str, sorted(set(dilation))))


def format_table(rows: list[LayerReach]) -> str:
    width = max(4, *(len(_dilation_text(r.dilation)) for r in rows))
    head = f"{'layer':>5} {'window':>7} {'dil':>{width}} {'sinks':>5} {'span':>7} {'reach':>8} {'reachable':>9} {'holes':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.layer:>5} {'full' if r.window is None else r.window:>7} {_dilation_text(r.dilation):>{width}} "
                     f"{r.sinks:>5} {'-' if r.span is None else r.span:>7} {r.reach:>8} "
                     f"{r.reachable:>9} {r.holes:>7}")
    return "\n".join(lines)


def plot_reach(rows: list[LayerReach], path: str, title: str, baseline: list[LayerReach] | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    layers = [r.layer for r in rows]
    ax.step(layers, [r.reach for r in rows], where="mid", label="reach (span, query included)")
    if any(r.holes for r in rows):
        ax.step(layers, [r.reachable for r in rows], where="mid", linestyle=":", label="reachable positions")
    if baseline is not None:
        ax.step(layers, [r.reach for r in baseline], where="mid", linestyle="--", label="undilated")
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run_cli(args) -> int:
    config = load_config(args.model, args.layers)
    dilation = _per_layer_arg("dilation", args.dilation, False) or 1
    if isinstance(dilation, tuple):                  # one per-head pattern for every layer
        dilation = [dilation] * config.num_hidden_layers
    options = {"window": _per_layer_arg("window", args.window, True), "dilation": dilation,
               "sinks": args.sinks}
    if args.full_layers:
        options["full_layers"] = args.full_layers
    if args.schedule:
        options["schedule"] = args.schedule
    try:
        rows = layer_reach(config, args.seq_len, **options)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"swa-patch receptive-field: {err}") from None
    last = rows[-1]
    print(f"{config.model_type}, {len(rows)} layers"
          + ("" if args.seq_len is None else f", last of {args.seq_len} tokens"))
    print(format_table(rows))
    print(f"receptive field: {last.reach} tokens ({last.reachable} reachable, {last.holes} holes)")
    if args.plot:
        baseline = None
        if all(r.window is not None for r in rows) and any(max_dilation(r.dilation) > 1 for r in rows):
            undilated = [LayerSpec(r.window, 1, r.sinks) for r in rows]
            baseline = reach_of_specs(undilated, args.seq_len)
        plot_reach(rows, args.plot, f"{config.model_type}: receptive field per layer", baseline)
        print(f"wrote {args.plot}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("receptive-field", help="per-layer reach of a window schedule",
                              description="Print how far back the last position sees after each "
                              "layer (span from the oldest reachable input, itself included).")
    p.add_argument("--model", required=True, help="model folder, config.json, or a model_type (llama, gemma3_text, ...)")
    p.add_argument("--window", nargs="+", help="one window, or per layer (W, full, WxCOUNT)")
    p.add_argument("--dilation", nargs="+", help="one dilation, or per layer (D or DxCOUNT, e.g. 1x6 2x6 4x6 8x6); "
                   "D,D,.. gives one per attention head, for every layer if it is the only value "
                   "(e.g. 1,1,2,2,4,4,8,8)")
    p.add_argument("--sinks", type=int, default=0)
    p.add_argument("--full-layers", type=int, nargs="+", help="layer indices kept at full attention")
    p.add_argument("--schedule", help="named schedule (local-to-dilated, small-to-large, local-global)")
    p.add_argument("--layers", type=int, help="override num_hidden_layers")
    p.add_argument("--seq-len", type=int, help="exact for the last of N tokens (counts sinks and full layers)")
    p.add_argument("--plot", help="write a PNG of reach per layer")
    p.set_defaults(func=_run_cli)
