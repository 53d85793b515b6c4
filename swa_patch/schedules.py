"""Named per-layer window schedules: name -> (windows, dilations) for a stack of L layers.

Each schedule takes the user's single ``window`` W and the number of layers and returns one
window (``None`` = full attention) and one dilation per layer.  Layers are split into
quarters / groups by index, so the shape of a schedule is the same for any depth.
"""
from __future__ import annotations


def _quarter(i: int, n_layers: int) -> int:
    """0..3: which quarter of the stack layer ``i`` is in (layer-count rounding as ``4*i // L``)."""
    return min(3, (4 * i) // n_layers)


def _local_to_dilated(window: int, n_layers: int):
    """Dense windows low, dilated high: dilation 1, 2, 4, 8 by quarter of the stack (the same
    attention work per token in every layer; a uniform-W stack reaches
    ``(L/4)*(W-1)*(1+2+4+8) + 1`` tokens instead of ``L*(W-1) + 1``)."""
    return [window] * n_layers, [2 ** _quarter(i, n_layers) for i in range(n_layers)]


def _small_to_large(window: int, n_layers: int):
    """Undilated, growing windows: W/8, W/4, W/2, W by quarter (cheap low layers, the full
    window only at the top)."""
    return [max(1, window >> (3 - _quarter(i, n_layers))) for i in range(n_layers)], [1] * n_layers


def _local_global(window: int, n_layers: int):
    """Gemma 3's pattern: five window-W layers, then one full-attention layer, repeated."""
    return [None if i % 6 == 5 else window for i in range(n_layers)], [1] * n_layers


SCHEDULES = {
    "local-to-dilated": _local_to_dilated,
    "small-to-large": _small_to_large,
    "local-global": _local_global,
}


def check_schedule_options(cfg) -> None:
    """The options a named schedule cannot be combined with, named in the error."""
    if not isinstance(cfg.window, int) or isinstance(cfg.window, bool):
        raise TypeError(f"schedule={cfg.schedule!r} needs window to be one int (the schedule "
                        f"derives every layer's window from it), got window={cfg.window!r}")
    if isinstance(cfg.dilation, (list, tuple)) or cfg.dilation != 1:
        raise ValueError(f"schedule={cfg.schedule!r} sets the dilation of every layer; drop "
                         f"dilation={cfg.dilation!r} or pass per-layer window/dilation lists "
                         f"instead of a schedule")


def expand_schedule(cfg, n_layers: int):
    check_schedule_options(cfg)
    return SCHEDULES[cfg.schedule](cfg.window, n_layers)
