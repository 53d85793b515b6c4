"""Named per-layer window schedules: name -> (windows, dilations) for a stack of L layers."""
from __future__ import annotations


def _local_to_dilated(window: int, n_layers: int):
    """Dense windows low, dilated high: dilation 1, 2, 4, 8 by quarter of the stack."""
    dilations = [2 ** min(3, (4 * i) // n_layers) for i in range(n_layers)]
    return [window] * n_layers, dilations


SCHEDULES = {"local-to-dilated": _local_to_dilated}


def expand_schedule(cfg, n_layers: int):
    if not isinstance(cfg.window, int) or isinstance(cfg.window, bool):
        raise TypeError(f"schedule={cfg.schedule!r} needs window to be one int, got {cfg.window!r}")
    return SCHEDULES[cfg.schedule](cfg.window, n_layers)
