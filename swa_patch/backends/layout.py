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
    unmasked: bool = False                  # every slot (sinks and keys) is visible to every query:
                                            # a kernel may run without a mask (a cache's full ring)

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
        """``[sink slots, keys]`` along dim 2: a view where the sink slots lie directly before the
        keys in one buffer (the rolling cache keeps them so), else a concatenated copy.  The copy
        of a whole ring per layer and decode step cost about as much as the attention itself."""
        if not self.n_sinks:
            return k, v
        return cat_keys(self.sink_k, k), cat_keys(self.sink_v, v)


def cat_keys(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], dim=2)``, as a view when ``b`` continues ``a`` in memory along dim 2
    (same storage and strides, ``b`` starting where ``a`` ends): then that view holds exactly the
    elements of ``a`` followed by those of ``b``.  Compiled code concatenates (dynamo does not
    trace storage pointers, and the compiler plans its own buffers)."""
    if (not torch.compiler.is_compiling() and a.dim() == b.dim() == 4 and a.dtype == b.dtype
            and a.device == b.device and a.stride() == b.stride()
            and a.shape[:2] == b.shape[:2] and a.shape[3:] == b.shape[3:]
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.storage_offset() == a.storage_offset() + a.shape[2] * a.stride(2)):
        return a.as_strided((a.shape[0], a.shape[1], a.shape[2] + b.shape[2], a.shape[3]), a.stride(),
                            a.storage_offset())
    return torch.cat([a, b], dim=2)


def math_attention(q, k, v, mask, scale, softcap=None, s_aux=None):
    """Explicit attention.  q ``[..., H, Lq, D]``, k/v ``[..., Hkv, Lk, D]``, mask broadcastable
    to ``[..., H, Lq, Lk]`` (bool), or None (every key visible).  ``s_aux`` ``[H]``: GPT-OSS learned
    sink logits, one extra softmax column per head whose value is dropped.  Returns ``[..., H, Lq, D]``."""
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if s_aux is not None:
        extra = s_aux.to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, extra], dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if s_aux is not None:
        probs = probs[..., :-1]
    return torch.matmul(probs, v)


def fused_attention(q, k, v, mask, scale, softcap=None, s_aux=None):
    """torch SDPA where it can express the call (no softcap, no learned sinks), else math.

    One query per head over grouped kv heads (a decode step) runs as the ``H / Hkv`` queries of
    each kv head (``[..., Hkv, H / Hkv, D]``, a view; transformers' ``pack_gqa`` does the same): the
    same scores, and on the CPU 93 us per call against 134 us with ``enable_gqa`` (9 query and 3 kv
    heads of 64, 1,028 keys, one thread), since each kv head is read once, not once per query head."""
    if mask is not None and mask.dim() == q.dim() - 1:
        mask = mask.unsqueeze(-3)
    if softcap or s_aux is not None:
        return math_attention(q, k, v, mask, scale, softcap, s_aux)
    h, hkv = q.shape[-3], k.shape[-3]
    if q.shape[-2] == 1 and h != hkv and (mask is None or mask.dim() < 3 or mask.shape[-3] == 1):
        packed = q.reshape(*q.shape[:-3], hkv, h // hkv, q.shape[-1])
        out = torch.nn.functional.scaled_dot_product_attention(packed, k, v, attn_mask=mask, scale=scale)
        return out.reshape(*q.shape[:-1], v.shape[-1])
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=h != hkv)
