"""FlashAttention: ``window_size=(W-1, 0)`` for the band, a second call over the sink slots,
merged through the log-sum-exp (no flash kernel expresses "first S OR last W").

Two kernels, one code path: ``flash`` is flash-attn 2 (``flash_attn.flash_attn_func``), ``flash4``
is FlashAttention-4 (``flash_attn.cute.flash_attn_func``, CuTe DSL, Hopper and Blackwell).  Both
take ``[B, L, H, D]`` tensors, GQA, softcap, and return the log-sum-exp ``[B, H, Lq]``; their
windows are inclusive on both sides and bottom-right aligned, so our W (query itself included)
is ``(W-1, 0)`` (FA4 spells "unbounded" ``None`` where FA2 says ``-1``).  Queries whose band
still overlaps some sinks (stream index in ``[W, S+W-1)``, at most S-1 rows) go through the
sdpa band kernel, so no key is counted twice.  Padded batches also use the sdpa kernel (see
attention.choose_backend).  GPT-OSS learned sink logits are applied after the merge, through
the log-sum-exp, for both kernels alike.
"""
from __future__ import annotations

import torch

from . import sdpa
from .layout import KeyLayout


def flash_attn_func(*args, **kwargs):
    """Indirection so tests can substitute a pure-torch stand-in on machines without CUDA."""
    from flash_attn import flash_attn_func as real
    return real(*args, **kwargs)


def flash4_attn_func(*args, **kwargs):
    """FlashAttention-4's entry point, by the same indirection."""
    from flash_attn.cute import flash_attn_func as real
    return real(*args, **kwargs)


def _call(q, k, v, scale, causal, window, softcap, kernel="flash"):
    """One kernel call on ``[B, H, L, D]`` tensors; ``window`` in FA2's (-1 = unbounded) form."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kernel == "flash4":
        out, lse = flash4_attn_func(q, k, v, softmax_scale=scale, causal=causal,
                                    window_size=tuple(None if w < 0 else w for w in window),
                                    softcap=softcap or 0.0, return_lse=True)
    else:
        out, lse, _ = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window,
                                      softcap=softcap or 0.0, return_attn_probs=True)
    return out, lse          # [B, Lq, H, D], [B, H, Lq]


def _merge(out_a, lse_a, out_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).transpose(1, 2).unsqueeze(-1)
    wb = torch.exp(lse_b - lse).transpose(1, 2).unsqueeze(-1)
    return (out_a.float() * wa + out_b.float() * wb).to(out_a.dtype), lse


def attend(q, k, v, layout: KeyLayout, spec, scale, softcap=None, s_aux=None, kernel="flash"):
    """q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` -> ``[B, Lq, H, D]``."""
    if spec.dilation > 1:
        raise ValueError(f"backend={kernel!r} cannot express dilation > 1")
    window = (-1, 0) if spec.window is None else (spec.window - 1, 0)
    out, lse = _call(q, k, v, scale, True, window, softcap, kernel)
    lq = q.shape[2]
    if layout.n_sinks and spec.window is not None:
        # rows whose whole band lies past every sink slot see all (valid) sinks in full
        last_sink = int(layout.sink_index.max())
        full_from = max(0, last_sink + spec.window - layout.q_start)
        partial_from = max(0, spec.window - layout.q_start)
        if full_from < lq and bool(layout.sink_valid.all()):
            o_s, l_s = _call(q[:, :, full_from:], layout.sink_k, layout.sink_v, scale, False, (-1, -1), softcap,
                             kernel)
            merged, lse_m = _merge(out[:, full_from:], lse[:, :, full_from:], o_s, l_s)
            out = torch.cat([out[:, :full_from], merged], dim=1)
            lse = torch.cat([lse[:, :, :full_from], lse_m], dim=2)
        else:
            full_from = lq
        if partial_from < full_from:
            rows = slice(partial_from, full_from)
            sub = KeyLayout(layout.q_start + partial_from, layout.k_start, layout.key_real, layout.sink_k,
                            layout.sink_v, layout.sink_index, layout.sink_valid)
            keep = layout.q_start + full_from - layout.k_start
            part = sdpa.attend(q[:, :, rows], k[:, :, :keep], v[:, :, :keep], sub, spec, scale, softcap, s_aux)
            if s_aux is not None:            # ``part`` already includes the learned sinks
                out = _with_s_aux(out, lse, s_aux)
            return torch.cat([out[:, :partial_from], part, out[:, full_from:]], dim=1)
    return out if s_aux is None else _with_s_aux(out, lse, s_aux)


def _with_s_aux(out, lse, s_aux):
    """GPT-OSS learned sinks: one extra softmax column per head whose value is zero."""
    w = torch.sigmoid(lse.float() - s_aux.float().view(1, -1, 1)).transpose(1, 2).unsqueeze(-1)
    return (out.float() * w).to(out.dtype)
