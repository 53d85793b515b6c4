"""One module per kernel family, one call signature:
``attend(q, k, v, layout, spec, scale, softcap=None, s_aux=None) -> [B, Lq, H, D]``."""
from __future__ import annotations

import functools
import importlib.util

import torch

from . import eager, flash, flash4, flex, sdpa

BACKEND_MODULES = {"eager": eager, "sdpa": sdpa, "flex": flex, "flash": flash, "flash4": flash4}
# The module each FlashAttention kernel lives in (FA4 ships flash_attn/cute only, so the
# flash_attn namespace alone says nothing about flash-attn 2), and what to install.
FLASH_KERNELS = {"flash": ("flash_attn.flash_attn_interface", "pip install 'swa-patch[flash]' (flash-attn 2)"),
                 "flash4": ("flash_attn.cute", "pip install flash-attn-4 (FlashAttention-4, Hopper/Blackwell)")}


@functools.cache
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def flash_available(kernel: str = "flash") -> bool:
    """The kernel is installed and a CUDA device is present (FA4: compute capability >= 9)."""
    if not torch.cuda.is_available() or not _installed(FLASH_KERNELS[kernel][0]):
        return False
    return kernel != "flash4" or torch.cuda.get_device_capability()[0] >= 9


def check_available(backend: str, device: torch.device) -> None:
    """Raise a clear error for a backend that cannot run on ``device``."""
    if backend in FLASH_KERNELS:
        module, install = FLASH_KERNELS[backend]
        if device.type != "cuda":
            raise ValueError(f"backend={backend!r} needs a CUDA device; the model is on {device.type!r}. "
                             "Use backend='auto', 'flex' or 'sdpa'")
        if not _installed(module):
            raise ValueError(f"backend={backend!r} needs the {module.split('.')[0]} kernels ({install}); "
                             "use backend='auto', 'flex' or 'sdpa'")
