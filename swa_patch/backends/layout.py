"""Where each query and key of one attention call sits in the stream.

Every backend receives keys in one layout: ``S`` *sink slots* (copies of the first S real
tokens, held in ``sink_k``/``sink_v``) plus a *contiguous* block of keys with stream
indices ``k_start, k_start+1, ...`` that ends at the last query (or, for a cache's ring
buffer, any order given by ``key_index``; only the dense kernels take that form).  Queries have stream
indices ``q_start, q_start+1, ...``.  The visibility of every slot is decided by
:func:`swa_patch.masks.slot_mask`, so all backends share one mask predicate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import LayerSpec, slot_mask


@dataclass
class KeyLayout:
    q_start: int
    k_start: int
    key_real: torch.Tensor | None = None    # [B, Lk] bool, contiguous keys that are real tokens
    sink_k: torch.Tensor | None = None      # [B, Hkv, S, D]
    sink_v: torch.Tensor | None = None      # [B, Hkv, S, D]
    sink_index: torch.Tensor | None = None  # [B, S] stream index each sink slot holds
    sink_valid: torch.Tensor | None = None  # [B, S] bool, slot holds a real, already-seen token
    memo: dict | None = None                # shared by the layers of one forward (flex block masks)
    key_index: torch.Tensor | None = None   # [Lk] stream index per key slot when the keys are NOT
                                            # contiguous (a ring buffer); k_start is then unused
    query_extra: object | None = None       # callable [B, H, q, D] -> [B, H, q, D]: widens the query
                                            # to [q, query_extra(q)]; keys and values come widened
                                            # (shift-mode cache chunks); output keeps the first D
    full_from: torch.Tensor | None = None   # [B] stream index of each row's first query that sees
                                            # every earlier key (decode_full specs only)

    @property
    def n_sinks(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2]

    def dense_mask(self, spec: LayerSpec, q_len: int, k_len: int, batch: int, device) -> torch.Tensor:
        """Boolean ``[B, q_len, S + k_len]`` mask over (sink slots, contiguous keys); built once per
        forward for all layers that share ``spec`` (their layouts are identical)."""
        if self.memo is None:
            return self._dense_mask(spec, q_len, k_len, batch, device)
        key = ("dense", spec, q_len, k_len, self.q_start, self.k_start, self.n_sinks, self.key_index is None)
        if key not in self.memo:
            self.memo[key] = self._dense_mask(spec, q_len, k_len, batch, device)
        return self.memo[key]

    def _dense_mask(self, spec, q_len, k_len, batch, device):
        i = self.q_start + torch.arange(q_len, device=device)[:, None]
        jc = (self.k_start + torch.arange(k_len, device=device) if self.key_index is None
              else self.key_index.to(device))
        real = (torch.ones(batch, k_len, dtype=torch.bool, device=device)
                if self.key_real is None else self.key_real)
        full = None
        if spec.decode_full:
            if self.full_from is None:
                raise ValueError("a decode_full layer needs the prompt boundary (KeyLayout.full_from)")
            full = i[None] >= self.full_from.to(device).view(-1, 1, 1)          # [B, q, 1]
        contiguous = slot_mask(spec, i[None], jc[None, None], torch.zeros((), dtype=torch.bool,
                               device=device), real[:, None, :], full)
        if not self.n_sinks:
            return contiguous
        sinks = slot_mask(spec, i[None], self.sink_index[:, None, :], torch.ones((), dtype=torch.bool,
                          device=device), self.sink_valid[:, None, :], full)
        return torch.cat([sinks, contiguous], dim=-1)

    def keys_with_sinks(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.n_sinks:
            return k, v
        return torch.cat([self.sink_k, k], dim=2), torch.cat([self.sink_v, v], dim=2)


def math_attention(q, k, v, mask, scale, softcap=None, s_aux=None):
    """Explicit attention.  q ``[..., H, Lq, D]``, k/v ``[..., Hkv, Lk, D]``, mask broadcastable
    to ``[..., H, Lq, Lk]`` (bool).  ``s_aux`` ``[H]``: GPT-OSS learned sink logits, one extra
    softmax column per head whose value is dropped.  Returns ``[..., H, Lq, D]``."""
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if s_aux is not None:
        extra = s_aux.to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, extra], dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if s_aux is not None:
        probs = probs[..., :-1]
    return torch.matmul(probs, v)


def fused_attention(q, k, v, mask, scale, softcap=None, s_aux=None):
    """torch SDPA where it can express the call (no softcap, no learned sinks), else math."""
    if mask is not None and mask.dim() == q.dim() - 1:
        mask = mask.unsqueeze(-3)
    if softcap or s_aux is not None:
        return math_attention(q, k, v, mask, scale, softcap, s_aux)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[-3] != k.shape[-3])
