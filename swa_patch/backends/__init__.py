"""One module per kernel family, one call signature:
``attend(q, k, v, layout, spec, scale, softcap=None, s_aux=None) -> [B, Lq, H, D]``."""
from __future__ import annotations

import importlib.util

import torch

from . import eager, flash, flex, sdpa

BACKEND_MODULES = {"eager": eager, "sdpa": sdpa, "flex": flex, "flash": flash}


def flash_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def check_available(backend: str, device: torch.device) -> None:
    """Raise a clear error for a backend that cannot run on ``device``."""
    if backend == "flash":
        if device.type != "cuda":
            raise ValueError(f"backend='flash' needs a CUDA device; the model is on {device.type!r}. "
                             "Use backend='auto', 'flex' or 'sdpa'")
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("backend='flash' needs the flash-attn package (pip install "
                             "'swa-patch[flash]'); use backend='auto', 'flex' or 'sdpa'")
