"""FlashAttention-4 (``flash-attn-4``, CuTe DSL kernels for Hopper and Blackwell): the flash
backend's code path with FA4's kernel (see :mod:`swa_patch.backends.flash`)."""
from __future__ import annotations

from . import flash


def attend(q, k, v, layout, spec, scale, softcap=None, s_aux=None):
    """q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` -> ``[B, Lq, H, D]``."""
    return flash.attend(q, k, v, layout, spec, scale, softcap, s_aux, kernel="flash4")
