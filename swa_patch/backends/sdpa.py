"""Block-sparse band attention on torch SDPA, O(n*W) work and memory, with backward.

Queries are cut into blocks of ``bq``; block ``t`` attends only to its key band (``bq + W - 1``
keys, gathered for all blocks at once with ``unfold``) plus the sink slots, in batched SDPA
calls.  The band mask is the same for every block (the window is translation invariant), so
only blocks with padded or invalid keys, or sinks, need masks of their own.  A dilated window
is split into ``d`` residue classes (stream index mod d): each is a plain window of W over its
own subsequence, so dilated work equals undilated work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..masks import LayerSpec, slot_mask
from .layout import KeyLayout, fused_attention


def block_size(window: int, device: torch.device, grad: bool) -> int:
    """Queries per block.  With a backward (or off CPU): ~W/4, so that the wasted work
    ``(bq + W - 1) / W`` stays ~1.25x while blocks stay large enough for the backward kernel.
    A forward without grad on CPU: 32, the CPU flash kernel's own query split, so less of each
    key band is wasted (measured at 16k, W=512, fp32: forward 0.18 s at 32 against 0.29 s at
    W/4; a backward 1.8 s at 32 against 1.1 s at W/4)."""
    if device.type == "cpu" and not grad:
        return 32
    return max(32, min(256, window // 4))


def attend(q, k, v, layout: KeyLayout, spec: LayerSpec, scale, softcap=None, s_aux=None):
    """q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` (contiguous, ending at the last query)
    -> ``[B, Lq, H, D]``."""
    lq, lk = q.shape[2], k.shape[2]
    if (layout.key_index is not None or spec.window is None
            or spec.span >= layout.q_start + lq - layout.k_start):
        return _dense(q, k, v, layout, spec, scale, softcap, s_aux)
    d = spec.dilation
    if d == 1:
        return _band(q, k, v, layout, spec, scale, softcap, s_aux, layout.q_start, layout.k_start,
                     layout.q_start + torch.arange(lq, device=q.device))
    return _dilated(q, k, v, layout, spec, scale, softcap, s_aux)


def _dilated(q, k, v, layout, spec, scale, softcap, s_aux):
    """The ``d`` residue classes (stream index mod d) as ``d`` batch rows of one plain band.

    Queries and keys are padded so that both start at a stream index divisible by ``d`` and
    their lengths are multiples of ``d``; then ``view(..., n/d, d, D)`` puts class ``r`` in
    column ``r``, and moving that column into the batch dimension gives ``B*d`` sequences in
    which the dilated window is a plain window of W (sub-index = stream index // d).  Padded
    keys are marked not real; padded queries are dropped.  One SDPA call, the same work as
    d=1 (a loop over classes was measurably slower: d calls on shorter batches)."""
    b, h, lq, dim = q.shape
    hkv, lk, d = k.shape[1], k.shape[2], spec.dilation
    q_left, k_left = layout.q_start % d, layout.k_start % d
    q_right, k_right = -(q_left + lq) % d, -(k_left + lk) % d
    nq, nk = (q_left + lq + q_right) // d, (k_left + lk + k_right) // d
    real = (torch.ones(b, lk, dtype=torch.bool, device=q.device)
            if layout.key_real is None else layout.key_real)
    real = F.pad(real, (k_left, k_right), value=False)

    def classes(x, left, right, n):        # [B, H, L, D] -> [B*d, H, n, D]
        x = F.pad(x, (0, 0, left, right)).view(b, x.shape[1], n, d, dim)
        return x.permute(0, 3, 1, 2, 4).reshape(b * d, x.shape[1], n, dim)

    q_start = layout.q_start - q_left
    q_stream = (q_start + torch.arange(nq * d, device=q.device)).view(nq, d).T.repeat(b, 1)
    rep = lambda x: None if x is None else x.repeat_interleave(d, dim=0)
    sub = KeyLayout(q_start, layout.k_start - k_left,
                    real.view(b, nk, d).transpose(1, 2).reshape(b * d, nk),
                    rep(layout.sink_k), rep(layout.sink_v), rep(layout.sink_index), rep(layout.sink_valid))
    out = _band(classes(q, q_left, q_right, nq), classes(k, k_left, k_right, nk),
                classes(v, k_left, k_right, nk), sub, spec, scale, softcap, s_aux,
                q_start // d, (layout.k_start - k_left) // d, q_stream)      # [B*d, nq, H, D]
    out = out.view(b, d, nq, h, dim).transpose(1, 2).reshape(b, nq * d, h, dim)
    return out[:, q_left:q_left + lq]


def _dense(q, k, v, layout, spec, scale, softcap, s_aux):
    """The band covers every key: one SDPA call (plain causal when nothing else applies; no mask
    when the layout says every slot is visible, e.g. a decode step over a full ring without pads)."""
    lq, lk = q.shape[2], k.shape[2]
    plain = (layout.key_index is None and layout.key_real is None and not layout.n_sinks and lq == lk
             and layout.q_start == layout.k_start and not softcap and s_aux is None
             and (spec.window is None or spec.dilation == 1))   # a dilated band has gaps
    if plain:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)
    mask = None if layout.unmasked else layout.dense_mask(spec, lq, lk, q.shape[0], q.device)
    k, v = layout.keys_with_sinks(k, v)
    return fused_attention(q, k, v, mask, scale, softcap, s_aux).transpose(1, 2)


def _band(q, k, v, layout, spec, scale, softcap, s_aux, q0, k0, q_stream):
    """Plain window ``W`` in sub-index space: query sub-index ``q0 + t`` sees key sub-indices
    ``(q0 + t - W, q0 + t]``; ``k0`` is the sub-index of ``k[:, :, 0]``.  ``q_stream``: the
    stream index of each query, ``[Lq]`` or ``[B, Lq]`` (for the sink masks)."""
    b, h, lq, dim = q.shape
    hkv, w = k.shape[1], spec.window
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    bq = block_size(w, q.device, grad)
    nb = -(-lq // bq)
    kw = bq + w - 1
    offset = q0 - k0 - w + 1                                    # band key 0, in k's indices
    real = (torch.ones(b, k.shape[2], dtype=torch.bool, device=q.device)
            if layout.key_real is None else layout.key_real)
    k, v, real = _band_keys(k, v, real, offset, (nb - 1) * bq + kw)
    k_blk = k.unfold(2, kw, bq).transpose(-1, -2)              # [B, Hkv, nb, kw, D]
    v_blk = v.unfold(2, kw, bq).transpose(-1, -2)
    u = torch.arange(bq, device=q.device)[:, None]
    m = torch.arange(kw, device=q.device)[None, :]
    in_band = (m >= u) & (m <= u + w - 1)                       # [bq, kw], the same in every block
    # Blocks whose band keys are all real share ``in_band`` (nothing built per block); only the
    # first ones, whose bands start in the front padding, need a mask of their own.  Keys past
    # the end are seen only by padded queries, which are dropped.  Masks of padding, sinks or
    # (with sinks) per-query sink slots vary in every block.  With grad every block gets its own:
    # the CPU backward expands a broadcast mask over heads and blocks (measured at 16k, W=512:
    # peak 1.12 GB and 1.28 s per fwd+bwd, against 0.65 GB and 1.04 s with per-block masks).
    share = not (grad or layout.key_real is not None or layout.n_sinks)
    head = min(nb, -(-max(0, -offset) // bq)) if share else nb    # blocks with masks of their own
    real_blk = real.unfold(1, kw, bq)[:, :head]                # [B, head, kw]
    mask = in_band & (real_blk[:, :, None, :] | (m == u + w - 1))  # [B, head, bq, kw]
    if layout.n_sinks:
        stream_q = q_stream if q_stream.dim() == 2 else q_stream[None]
        stream_q = F.pad(stream_q, (0, nb * bq - lq), value=-1).view(-1, nb, bq, 1)
        sink_mask = slot_mask(spec, stream_q, layout.sink_index[:, None, None, :],
                              torch.ones((), dtype=torch.bool, device=q.device),
                              layout.sink_valid[:, None, None, :])      # [B, nb, bq, S]
        mask = torch.cat([sink_mask, mask], dim=-1)
        expand = (b, hkv, nb) + layout.sink_k.shape[2:]
        k_blk = torch.cat([layout.sink_k[:, :, None].expand(expand), k_blk], dim=3)
        v_blk = torch.cat([layout.sink_v[:, :, None].expand(expand), v_blk], dim=3)
    q_blk = (q if nb * bq == lq else F.pad(q, (0, 0, 0, nb * bq - lq))).view(b, h, nb, bq, dim)
    # One SDPA call per batch row and mask kind: for a single row, [nb, Hkv, kw, D] is a *view*
    # of the unfolded keys (overlapping blocks, no copy); merging a batch dim with the block dim
    # would copy the keys kw/bq (~5x) times over, which costs more than the attention.  Each
    # result is written once, straight into the output's layout.
    out = q.new_empty(b, nb, bq, h, dim)
    for i in range(b):
        for blocks, block_mask in ((slice(0, head), mask[i, :, None]), (slice(head, nb), in_band)):
            if blocks.start < blocks.stop:
                out[i, blocks] = fused_attention(
                    q_blk[i, :, blocks].transpose(0, 1), k_blk[i, :, blocks].transpose(0, 1),
                    v_blk[i, :, blocks].transpose(0, 1), block_mask, scale, softcap, s_aux).transpose(1, 2)
    return out.view(b, nb * bq, h, dim)[:, :lq]


def _band_keys(k, v, real, offset, length):
    """Slice or zero-pad keys so that index 0 is key ``offset`` and there are ``length``."""
    if offset >= 0:
        k, v, real = k[:, :, offset:], v[:, :, offset:], real[:, offset:]
        left = 0
    else:
        left = -offset
    right = length - left - k.shape[2]
    if right < 0:
        k, v, real = k[:, :, :right], v[:, :, :right], real[:, :right]
        right = 0
    if left or right:
        k = F.pad(k, (0, 0, left, right))
        v = F.pad(v, (0, 0, left, right))
        real = F.pad(real, (left, right), value=False)
    return k, v, real
