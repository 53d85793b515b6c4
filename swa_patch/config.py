"""The settings object: validation before any weight is touched, and (de)serialisation."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from .masks import LayerSpec

logger = logging.getLogger("swa_patch")

BACKENDS = ("auto", "eager", "sdpa", "flex", "flash", "flash4")
FLASH_BACKENDS = ("flash", "flash4")
POSITION_MODES = ("original", "shift")
DECODE_MODES = ("window", "full")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_int(name: str, value, low: int, allow_none: bool = False):
    if value is None and allow_none:
        return
    if not _is_int(value):
        raise TypeError(f"{name} must be an int >= {low}{' or None' if allow_none else ''}, "
                        f"got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def max_dilation(entry) -> int:
    """An int dilation, or the largest of a per-head list."""
    return max(entry) if isinstance(entry, (list, tuple)) else entry


def _check_head_dilations(layer: int, values, n_heads: int | None):
    """A per-head dilation entry: ints >= 1, one per query head."""
    for d in values:
        _check_int(f"dilation[{layer}] entry", d, 1)
    if n_heads is not None and len(values) != n_heads:
        raise ValueError(f"dilation[{layer}] has {len(values)} per-head entries but the model has "
                         f"{n_heads} attention heads; give one dilation per query head "
                         f"(num_attention_heads={n_heads})")


def _check_kv_windows(layer: int, values, n_kv_heads: int | None):
    """A per-KV-head window entry: ints >= 1 or None (full), one per KV head."""
    for w in values:
        _check_int(f"window[{layer}] entry", w, 1, allow_none=True)
    if n_kv_heads is not None and len(values) != n_kv_heads:
        raise ValueError(f"window[{layer}] has {len(values)} per-KV-head entries but the model has "
                         f"{n_kv_heads} KV heads; give one window (or None for full attention) per KV head "
                         f"(num_key_value_heads={n_kv_heads})")


def _per_layer(name: str, value, n_layers: int | None) -> list | None:
    """A scalar stays a scalar (None); a list must have one entry per layer."""
    if not isinstance(value, (list, tuple)):
        return None
    if n_layers is not None and len(value) != n_layers:
        raise ValueError(f"{name} has {len(value)} entries but the model has {n_layers} layers; "
                         f"give one entry per layer (num_hidden_layers={n_layers})")
    return list(value)


@dataclass
class SWAConfig:
    """How a model is patched.

    window: keys each query sees, itself included (``i - W < j <= i``); an int, or one
        entry per layer (``None`` = full attention for that layer), and an entry may be a list
        with one window per KV head (``None`` = that head attends fully and its cache grows;
        the query heads of its GQA group follow it).
    sinks: the first ``sinks`` real tokens stay visible to every query (StreamingLLM).
    dilation: query ``i`` sees ``i - k*d`` for ``k < W``; an int or one entry per layer, and an
        entry may be a list with one dilation per query head (``num_attention_heads`` of them).
    full_layers: layer indices that keep full causal attention.
    backend: ``auto`` picks per call and logs its choice; or one of eager/sdpa/flex/flash/flash4
        (flash: flash-attn 2; flash4: FlashAttention-4).
    positions: ``original`` (absolute positions; decoding equals the training band mask) or
        ``shift`` (StreamingLLM positions inside the cache); default: shift iff sinks > 0 and
        ``decode`` is "window".
    decode: ``"window"`` (every query windowed), ``"full"`` (queries that predict answer or
        generated tokens, rows >= P - 1 for a P-token prompt, attend every earlier token in
        every windowed layer), a list of layer indices that decode fully, or one list of KV
        heads per layer (``[[], [1], ...]``: only those heads decode fully, only their caches grow).  Those layers'
        caches keep every key (prefill stays linear, memory does not), so positions are
        ``original``.
    """

    window: int | list | None = None
    sinks: int = 0
    dilation: int | list = 1
    full_layers: list[int] | None = None
    backend: str = "auto"
    positions: str | None = None
    schedule: str | None = None
    decode: str | list[int] = "window"
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.validate()

    def validate(self, n_layers: int | None = None, n_heads: int | None = None,
                 n_kv_heads: int | None = None) -> "SWAConfig":
        if self.schedule is not None:
            from .schedules import SCHEDULES, check_schedule_options  # expanded per model
            if self.schedule not in SCHEDULES:
                raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
            check_schedule_options(self)
        if self.window is None and self.schedule is None:
            raise TypeError("window is required: an int >= 1 (keys each query sees, itself included)")
        windows = _per_layer("window", self.window, n_layers)
        for layer, w in enumerate(windows if windows is not None else [self.window]):
            if windows is not None and isinstance(w, (list, tuple)):
                _check_kv_windows(layer, w, n_kv_heads)
            else:
                _check_int("window", w, 1, allow_none=windows is not None or self.schedule is not None)
        _check_int("sinks", self.sinks, 0)
        dilations = _per_layer("dilation", self.dilation, n_layers)
        for layer, d in enumerate(dilations if dilations is not None else [self.dilation]):
            if dilations is not None and isinstance(d, (list, tuple)):
                _check_head_dilations(layer, d, n_heads)
            else:
                _check_int("dilation", d, 1)
        if self.full_layers is not None:
            if not isinstance(self.full_layers, (list, tuple)):
                raise TypeError(f"full_layers must be a list of layer indices, got {self.full_layers!r}")
            for i in self.full_layers:
                _check_int("full_layers entry", i, 0)
                if n_layers is not None and i >= n_layers:
                    raise ValueError(f"full_layers entry {i} is out of range: the model has layers "
                                     f"0..{n_layers - 1}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.positions is not None and self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES} or None, got {self.positions!r}")
        self._check_decode(n_layers, n_kv_heads)
        if self.backend in FLASH_BACKENDS and any(max_dilation(d) > 1 for d in (dilations or [self.dilation])):
            raise ValueError(f"backend={self.backend!r} cannot express dilation > 1 (flash-attn windows are "
                             "contiguous); use backend='sdpa', 'flex' or 'auto'")
        return self

    def _check_decode(self, n_layers: int | None, n_kv_heads: int | None = None) -> None:
        if self._decode_per_head:
            if n_layers is not None and len(self.decode) != n_layers:
                raise ValueError(f"decode has {len(self.decode)} per-layer entries but the model has {n_layers} "
                                 f"layers; give one list of KV heads per layer ([] = that layer windowed)")
            for layer, heads in enumerate(self.decode):
                if not isinstance(heads, (list, tuple)):
                    raise TypeError(f"decode[{layer}] must be a list of KV head indices, got {heads!r} (decode is "
                                    "either layer indices or one list of KV heads per layer, not both)")
                for h in heads:
                    _check_int(f"decode[{layer}] entry", h, 0)
                    if n_kv_heads is not None and h >= n_kv_heads:
                        raise ValueError(f"decode[{layer}] entry {h} is out of range: the model has KV heads "
                                         f"0..{n_kv_heads - 1}")
        elif isinstance(self.decode, (list, tuple)):
            for i in self.decode:
                _check_int("decode entry", i, 0)
                if n_layers is not None and i >= n_layers:
                    raise ValueError(f"decode entry {i} is out of range: the model has layers 0..{n_layers - 1}")
        elif self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES} or a list of layer indices, "
                             f"got {self.decode!r}")
        if self.decodes_full and self.positions == "shift":
            raise ValueError(f"decode={self.decode!r} keeps every key of its layers and attends them at "
                             "their original positions; positions='shift' (StreamingLLM streaming) cannot "
                             "apply: use positions='original' (the default with decode != 'window')")

    @property
    def _decode_per_head(self) -> bool:
        """``decode`` is one list of KV heads per layer (not layer indices)."""
        return isinstance(self.decode, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in self.decode)

    @property
    def decodes_full(self) -> bool:
        """Some layer (or KV head) attends fully from the prompt boundary on."""
        if self._decode_per_head:
            return any(len(heads) for heads in self.decode)
        return self.decode == "full" or (isinstance(self.decode, (list, tuple)) and len(self.decode) > 0)

    def decode_full_layers(self, n_layers: int) -> set[int]:
        if self.decode == "full":
            return set(range(n_layers))
        if self._decode_per_head:
            return set()
        return set(self.decode) if isinstance(self.decode, (list, tuple)) else set()

    def decode_full_heads(self, layer: int, n_kv_heads: int | None) -> tuple[bool, ...] | None:
        """Per KV head of ``layer``, whether it decodes fully (``decode=[[heads] per layer]``), else None."""
        if not self._decode_per_head or not self.decode[layer]:
            return None
        return tuple(h in self.decode[layer] for h in range(n_kv_heads))

    @property
    def position_mode(self) -> str:
        return self.positions or ("shift" if self.sinks > 0 and not self.decodes_full else "original")

    def layer_specs(self, n_layers: int, native_full: set[int] = frozenset(),
                    n_heads: int | None = None, n_kv_heads: int | None = None) -> list[LayerSpec]:
        """One :class:`LayerSpec` per layer.  Layers the model declares full stay full unless
        the user gave a per-layer window list (which then says everything).  ``n_heads``
        (query heads) checks per-head dilations, ``n_kv_heads`` per-KV-head windows."""
        self.validate(n_layers, n_heads, n_kv_heads)
        if self.schedule is not None:
            from .schedules import expand_schedule
            windows, dilations = expand_schedule(self, n_layers)
        else:
            windows = _per_layer("window", self.window, n_layers) or [self.window] * n_layers
            dilations = _per_layer("dilation", self.dilation, n_layers) or [self.dilation] * n_layers
        if n_heads is None and any(isinstance(d, (list, tuple)) for d in dilations):
            raise ValueError("dilation has per-head lists, which need the model's num_attention_heads "
                             "(pass n_heads, or the model or its config)")
        if n_kv_heads is None and any(isinstance(w, (list, tuple)) for w in windows):
            raise ValueError("window has per-KV-head lists, which need the model's num_key_value_heads "
                             "(pass n_kv_heads, or the model or its config)")
        windows = [None if isinstance(w, (list, tuple)) and all(x is None for x in w) else w for w in windows]
        full = set(self.full_layers or ())
        if not isinstance(self.window, (list, tuple)):
            full |= set(native_full)
        decode_full = self.decode_full_layers(n_layers)
        if n_kv_heads is None and self._decode_per_head:
            raise ValueError("decode has per-KV-head lists, which need the model's num_key_value_heads "
                             "(pass n_kv_heads, or the model or its config)")
        specs = [LayerSpec(None) if (i in full or windows[i] is None)
                 else LayerSpec(windows[i], dilations[i], self.sinks, decode_full=i in decode_full,
                                kv_decode_full=self.decode_full_heads(i, n_kv_heads))
                 for i in range(n_layers)]
        dilated = [i for i, s in enumerate(specs) if s.window is not None and s.dilation > 1]
        if self.backend in FLASH_BACKENDS and dilated:
            raise ValueError(f"backend={self.backend!r} cannot express dilation > 1 (flash-attn windows are "
                             f"contiguous), and schedule={self.schedule!r} dilates layers {dilated}; "
                             f"use backend='sdpa', 'flex' or 'auto'")
        return specs

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        from . import __version__
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **out, "version": __version__}

    @classmethod
    def from_dict(cls, data: dict) -> "SWAConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        data = dict(data)
        data.pop("version", None)
        unknown = {k: data.pop(k) for k in list(data) if k not in known}
        if unknown:
            logger.warning("swa_patch: ignoring settings this version does not know: %s", sorted(unknown))
        return cls(**data, extra=unknown)

    @classmethod
    def from_kwargs(cls, window, sinks, options: dict) -> "SWAConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"window", "sinks", "extra"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"patch_model got unknown option(s) {unknown}; allowed: {sorted(known)}")
        return cls(window=window, sinks=sinks, **options)
