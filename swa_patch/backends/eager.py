"""The dense reference: one explicit boolean mask over every key slot, plain math."""
from __future__ import annotations

from .layout import KeyLayout, math_attention


def attend(q, k, v, layout: KeyLayout, spec, scale, softcap=None, s_aux=None):
    """q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` -> ``[B, Lq, H, D]``."""
    mask = layout.dense_mask(spec, q.shape[2], k.shape[2], q.shape[0], q.device)
    k, v = layout.keys_with_sinks(k, v)
    out = math_attention(q, k, v, mask[:, None], scale, softcap, s_aux)
    return out.transpose(1, 2)
