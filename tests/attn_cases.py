"""Attention-level helpers: random q/k/v and the dense reference on them."""
from __future__ import annotations

import torch

import torch.nn.functional as F

from swa_patch.attention import MaskInfo, contiguous_layout
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


def dense_attention(q, k, v, mask, scale, softcap=None, s_aux=None):
    """Attention under a boolean ``mask`` ``[B, H or 1, q, k]``, written here rather than taken
    from swa_patch (whose eager backend is under test): torch SDPA with the mask, or, for
    softcapping and GPT-OSS sink logits (``s_aux`` ``[H]``, one extra softmax column per head
    whose value is dropped), matmul-softmax.  q ``[B, H, q, D]``, k/v ``[B, Hkv, k, D]``."""
    if softcap is None and s_aux is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    per_kv = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(per_kv, 1), v.repeat_interleave(per_kv, 1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if s_aux is not None:
        scores = torch.cat([scores, s_aux.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], -1)
    weights = scores.softmax(-1)[..., :k.shape[2]]
    return (weights @ v.float()).to(q.dtype)


def reference(q, k, v, spec: LayerSpec, padding=None, softcap=None, s_aux=None):
    """Attention with the explicit reference mask; -> [B, n, H, D]."""
    mask = per_head(reference_mask(spec, q.shape[2], padding, device=q.device))
    return dense_attention(q, k, v, mask, q.shape[-1] ** -0.5, softcap, s_aux).transpose(1, 2)


def run_backend(module, q, k, v, spec, padding=None, softcap=None, s_aux=None):
    layout = contiguous_layout(MaskInfo(0, padding), q, k, v, spec)
    return module.attend(q, k, v, layout, spec, q.shape[-1] ** -0.5, softcap, s_aux)


def assert_close_valid(out, ref, padding, atol, rtol=0.0):
    """Compare rows of real queries (pad queries are defined but meaningless)."""
    if padding is not None:
        out, ref = out[padding], ref[padding]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
