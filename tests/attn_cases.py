"""Attention-level helpers: random q/k/v and the dense reference on them."""
from __future__ import annotations

import torch

from swa_patch.attention import MaskInfo, contiguous_layout
from swa_patch.backends.layout import math_attention
from swa_patch.masks import LayerSpec, reference_mask
from tests.models import per_head


def random_qkv(b, h, hkv, n, dim, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    make = lambda heads: torch.randn(b, heads, n, dim, generator=g).to(dtype).requires_grad_(grad)
    return make(h), make(hkv), make(hkv)


def left_padding(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    pads = torch.randint(0, n // 2, (b,), generator=g)
    pads[0] = 0
    return torch.arange(n)[None, :] >= pads[:, None]


def reference(q, k, v, spec: LayerSpec, padding=None, softcap=None, s_aux=None):
    """Eager attention with the explicit reference mask; -> [B, n, H, D]."""
    mask = per_head(reference_mask(spec, q.shape[2], padding, device=q.device))
    return math_attention(q, k, v, mask, q.shape[-1] ** -0.5, softcap, s_aux).transpose(1, 2)


def run_backend(module, q, k, v, spec, padding=None, softcap=None, s_aux=None):
    layout = contiguous_layout(MaskInfo(0, padding), q, k, v, spec)
    return module.attend(q, k, v, layout, spec, q.shape[-1] ** -0.5, softcap, s_aux)


def assert_close_valid(out, ref, padding, atol, rtol=0.0):
    """Compare rows of real queries (pad queries are defined but meaningless)."""
    if padding is not None:
        out, ref = out[padding], ref[padding]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
