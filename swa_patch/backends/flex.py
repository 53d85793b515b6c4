"""FlexAttention with a block mask built from the shared predicate (compiled, CPU and CUDA).

Keys are ``[sink slots | contiguous]``; the mask_mod maps each key slot back to its stream
index and calls :func:`swa_patch.masks.slot_mask`, so flex sees exactly the reference mask
and skips every block that mask leaves empty.  A dilated window is first permuted into its
``d`` residue classes (stream index mod d), where it is ``d`` plain bands: the block mask
then touches no more blocks than the undilated window does.

An undilated window runs in chunks of a fixed shape (``CHUNK`` queries against their
``CHUNK + span - 1`` band keys plus the sink slots; padding rows and keys are masked, so
their blocks are skipped; a prompt shorter than ``CHUNK`` runs in one power-of-two chunk):
a handful of compiled kernels serve every prompt length, where a call per
length would compile anew for each (seconds to minutes on CPU).
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ..masks import LayerSpec, band, slot_mask
from .layout import KeyLayout


BLOCK_SIZE = {"cpu": 64, "cuda": 128}   # 64 wastes less of a band on CPU (measured)
CHUNK = {"cpu": 2048, "cuda": 8192}     # queries per call of the fixed-shape window kernel (at most)
MIN_CHUNK = 256                         # shorter prompts run in power-of-two chunks from here up
# Each new query/key length, dtype, head count or mask kind is a recompile.  Dynamo's default
# limit (8) is reached by an ordinary mix of prefill lengths, and past it dynamo runs
# flex_attention *eagerly*, which materialises the whole score matrix: dense memory, the
# silent fallback this package must never make (seen on an H200: 106 GB for one 16k call).
# So: the limit is raised for these calls and reaching it raises FlexCompileLimit instead.
# Kernels compile for static shapes on every device: an undilated window runs in fixed-shape
# chunks (one kernel per layer spec whatever the length), a dilated one compiles per length.
# Dynamic shapes are no way out: the CPU code generator fails on dynamic flex kernels (torch
# 2.13), and on an H200 (torch 2.11) the first dilated call with padding (a batch-dependent
# block mask) under automatic dynamic shapes stalled for 9 minutes without returning.
RECOMPILE_LIMIT = 64


class FlexCompileLimit(RuntimeError):
    """torch.compile has no room for another flex variant; running eagerly would be dense."""


@functools.cache
def _compiled(fn, device_type: str):
    """One compiled wrapper per function and device type (each keeps its own dynamo cache)."""
    return torch.compile(fn, dynamic=False)


def _run_compiled(fn, device_type: str, *args, **kwargs):
    settings = {"recompile_limit": RECOMPILE_LIMIT, "fail_on_recompile_limit_hit": True}
    try:
        with torch._dynamo.config.patch(settings):
            return _compiled(fn, device_type)(*args, **kwargs)
    except torch._dynamo.exc.FailOnRecompileLimitHit as err:
        raise FlexCompileLimit(
            f"backend='flex': torch.compile reached its limit of {RECOMPILE_LIMIT} compiled variants of "
            f"{fn.__name__} in this process (on CPU each new sequence length is one); swa_patch refuses "
            "dynamo's eager fallback, which materialises the full score matrix. Use backend='sdpa' "
            "(block-sparse at any length) or backend='auto', which switches to it") from err


def _residue_order(start: int, length: int, d: int, device) -> torch.Tensor:
    """Permutation of ``range(length)`` grouping stream indices ``start + t`` by ``mod d``."""
    t = torch.arange(length, device=device)
    return torch.argsort(((start + t) % d) * length + t)


def _to_classes(x: torch.Tensor, d: int) -> torch.Tensor:
    """Sequence axis (2 for [B, H, L, D], else the last) regrouped by index mod d; L % d == 0."""
    if x.dim() == 4:
        b, h, n, dim = x.shape
        return x.view(b, h, n // d, d, dim).transpose(2, 3).reshape(b, h, n, dim)
    return x.view(*x.shape[:-1], x.shape[-1] // d, d).transpose(-1, -2).reshape(x.shape)


def _from_classes(x: torch.Tensor, d: int) -> torch.Tensor:
    b, h, n, dim = x.shape
    return x.view(b, h, d, n // d, dim).transpose(2, 3).reshape(b, h, n, dim)


def attend(q, k, v, layout: KeyLayout, spec: LayerSpec, scale, softcap=None, s_aux=None):
    """q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` -> ``[B, Lq, H, D]``."""
    if torch.is_grad_enabled() and q.device.type == "cpu" and q.requires_grad:
        raise RuntimeError("backend='flex' has no backward on CPU (FlexAttention does not support "
                           "backward on CPU); use backend='sdpa' or 'auto' for training on CPU")
    if s_aux is not None and q.device.type == "cpu":
        raise RuntimeError("backend='flex' cannot apply learned sink logits (s_aux) on CPU: compiled "
                           "FlexAttention on CPU returns no log-sum-exp; use backend='sdpa' or 'auto'")
    if spec.window is not None and spec.dilation == 1 and layout.key_index is None:
        return _attend_chunks(q, k, v, layout, spec, scale, softcap, s_aux)
    b, _, lq, _ = q.shape
    lk, n_s = k.shape[2], layout.n_sinks
    d = spec.dilation if spec.window is not None else 1
    dev = q.device
    q_pos = layout.q_start + torch.arange(lq, device=dev)
    k_pos = layout.k_start + torch.arange(lk, device=dev)
    real = layout.key_real
    aligned = d > 1 and all(x % d == 0 for x in (layout.q_start, layout.k_start, lq, lk))
    if aligned:   # the residue order is a reshape: strided copies instead of index gathers
        q, k, v = (_to_classes(x, d) for x in (q, k, v))
        q_pos, k_pos = _to_classes(q_pos, d), _to_classes(k_pos, d)
        real = None if real is None else _to_classes(real, d)
    elif d > 1:
        q_perm, k_perm = _residue_order(layout.q_start, lq, d, dev), _residue_order(layout.k_start, lk, d, dev)
        q, q_pos = q[:, :, q_perm], q_pos[q_perm]
        k, v, k_pos = k[:, :, k_perm], v[:, :, k_perm], k_pos[k_perm]
        real = None if real is None else real[:, k_perm]
    k, v = layout.keys_with_sinks(k, v)
    memo_key = ("flex", spec, layout.q_start, layout.k_start, lq, lk, n_s)
    block_mask = None if layout.memo is None else layout.memo.get(memo_key)
    if block_mask is None:
        mask_mod = _mask_mod(spec, q_pos, k_pos, real, layout, n_s)
        block_mask = _run_compiled(create_block_mask, dev.type, mask_mod, b if (real is not None or n_s) else None,
                                   None, lq, n_s + lk, device=dev, BLOCK_SIZE=BLOCK_SIZE[dev.type])
        if layout.memo is not None:
            layout.memo[memo_key] = block_mask
    out = _flex(q, k, v, block_mask, scale, softcap, s_aux)
    if aligned:
        out = _from_classes(out, d)
    elif d > 1:
        out = out[:, :, torch.argsort(q_perm)]
    return out.transpose(1, 2)


def _flex(q, k, v, block_mask, scale, softcap, s_aux):
    """One compiled flex_attention call -> ``[B, H, Lq, D]``; softcap as a score_mod, GPT-OSS
    learned sinks through the log-sum-exp."""
    score_mod = None
    if softcap:
        def score_mod(score, b_, h_, qi, kj):
            return torch.tanh(score / softcap) * softcap
    result = _run_compiled(flex_attention, q.device.type, q, k, v, score_mod=score_mod, block_mask=block_mask,
                           scale=scale, enable_gqa=q.shape[1] != k.shape[1], return_lse=s_aux is not None)
    if s_aux is None:
        return result
    out, lse = result       # one extra softmax column per head, value zero
    return out * torch.sigmoid(lse - s_aux.float().view(1, -1, 1)).unsqueeze(-1).to(out.dtype)


def _attend_chunks(q, k, v, layout: KeyLayout, spec: LayerSpec, scale, softcap, s_aux):
    """An undilated window in fixed-shape calls: chunk ``t`` holds queries at stream indices
    ``a .. a + C - 1`` (``a = q_start + t*C``) and the keys ``a - span + 1 .. a + C - 1``
    (zero-padded outside the given keys, masked), after the sink slots.  Every call has the
    same shapes, and the mask_mod reads positions from tensors, so the kernels compile once
    per layer spec and chunk size whatever the prompt length."""
    from .sdpa import _band_keys

    b, h, lq, _ = q.shape
    dev, n_s, span = q.device, layout.n_sinks, spec.span
    c = _chunk_size(lq, CHUNK[dev.type])
    chunks = -(-lq // c)
    kc = c + span - 1
    n_keys = k.shape[2]
    real = (torch.ones(b, n_keys, dtype=torch.bool, device=dev) if layout.key_real is None
            else layout.key_real)
    k, v, real = _band_keys(k, v, real, layout.q_start - span + 1 - layout.k_start, (chunks - 1) * c + kc)
    q = torch.nn.functional.pad(q, (0, 0, 0, chunks * c - lq))
    q_end = torch.tensor(layout.q_start + lq, device=dev)
    # Keys zero-padded in front of each chunk's first real key: chunk 0's, and later ones' too
    # while ``t * c < front`` (a window wider than the chunk, e.g. W=4096 against 2,048 queries).
    # A plain layout (every key real, no sinks, the keys reaching the last query) needs no
    # per-element lookup: its mask is the band in chunk coordinates minus that padding.
    front = layout.k_start - (layout.q_start - span + 1)
    plain = layout.key_real is None and not n_s and layout.k_start + n_keys >= layout.q_start + lq
    memo = {} if layout.memo is None else layout.memo
    outs = []
    for t in range(chunks):
        pad = max(0, front - t * c)
        chunk_key = ("flex-chunk", spec, layout.q_start, layout.k_start, lq, n_s, t)
        key = ("flex-local", spec, pad, c) if plain else chunk_key   # a local mask serves many chunks
        block_mask = memo.get(key)
        if block_mask is None:
            if plain:
                mask_mod, rows = _local_band_mask_mod(spec, torch.tensor(pad, device=dev)), None
            else:
                q0 = torch.tensor(layout.q_start + t * c, device=dev)
                mask_mod, rows = _chunk_mask_mod(spec, q0, q_end, _fresh(real[:, t * c:t * c + kc]), layout, n_s), b
            block_mask = _run_compiled(create_block_mask, dev.type, mask_mod, rows, None, c, n_s + kc, device=dev,
                                       BLOCK_SIZE=BLOCK_SIZE[dev.type])
            memo[key] = block_mask
        memo[chunk_key] = block_mask      # the mask each chunk used (benchmarks count its blocks)
        keys, values = layout.keys_with_sinks(_fresh(k[:, :, t * c:t * c + kc]), _fresh(v[:, :, t * c:t * c + kc]))
        outs.append(_flex(_fresh(q[:, :, t * c:(t + 1) * c]), keys, values, block_mask, scale, softcap, s_aux))
    return torch.cat(outs, dim=2)[:, :, :lq].transpose(1, 2)


def _chunk_size(lq: int, largest: int) -> int:
    """Queries per chunk: ``largest``, or for a shorter prompt the power of two that holds it
    (at least MIN_CHUNK), so a 512-token prompt does not pay for 2,048 padded queries and the
    kernels still come in a handful of shapes."""
    return min(largest, max(MIN_CHUNK, 1 << (lq - 1).bit_length()))


def _fresh(x: torch.Tensor) -> torch.Tensor:
    """A copy with standard strides.  A slice keeps the strides of the whole prompt (even where a
    size-1 dimension makes it count as contiguous), and dynamo guards on strides: without the
    copy every prompt length would compile anew."""
    return x.clone(memory_format=torch.contiguous_format)


def _local_band_mask_mod(spec, pad):
    """The window in chunk coordinates (query ``qi`` sits at key ``qi + span - 1``), the first
    ``pad`` keys (zero padding; a 0-d tensor, so every chunk shares one compiled kernel) masked.
    No per-score gather: flex evaluates this in its partial blocks, where the general mask's
    lookup of a ``[B, L]`` tensor costs 15-30 % more per 16k call on CPU.  Rows past the prompt see
    real or padded keys and are discarded; keys past the last real one lie after every real
    query, so the band already hides them."""
    offset = spec.span - 1

    def local_band(b, h, qi, kj):
        return band(qi + offset, kj, spec) & (kj >= pad)

    return local_band


def _chunk_mask_mod(spec, q0, q_end, real, layout, n_s):
    """mask_mod over (sink slots | chunk keys) of one chunk; ``q0``, ``q_end`` 0-d tensors."""
    span = spec.span

    def contiguous(b, h, qi, kj):
        i, kc = q0 + qi, (kj - n_s).clamp(min=0)
        return slot_mask(spec, i, q0 - span + 1 + kc, kj < 0, real[b, kc]) & (i < q_end)

    if not n_s:
        return contiguous
    s_index, s_valid = layout.sink_index, layout.sink_valid

    def with_sinks(b, h, qi, kj):
        ks = kj.clamp(0, n_s - 1)
        sink = slot_mask(spec, q0 + qi, s_index[b, ks], kj >= 0, s_valid[b, ks]) & (q0 + qi < q_end)
        return torch.where(kj < n_s, sink, contiguous(b, h, qi, kj))

    return with_sinks


def _mask_mod(spec, q_pos, k_pos, real, layout, n_s):
    """mask_mod(b, h, q_idx, kv_idx) over (sink slots | contiguous keys)."""
    lk = k_pos.shape[0]
    if real is None:
        real = torch.ones(1, lk, dtype=torch.bool, device=k_pos.device)
    real_rows = real.shape[0]

    def contiguous(b, h, qi, kj):
        kc = (kj - n_s).clamp(0, lk - 1)
        return slot_mask(spec, q_pos[qi], k_pos[kc], kj < 0, real[b % real_rows, kc])

    q0, k0 = int(q_pos[0]), int(k_pos[0])

    def band_only(b, h, qi, kj):   # no padding, no sinks, no permutation: the predicate alone
        return band(q0 + qi, k0 + kj, spec)

    if not n_s and layout.key_real is None and spec.dilation == 1:
        return band_only

    if not n_s:
        return contiguous
    s_index, s_valid = layout.sink_index, layout.sink_valid

    def with_sinks(b, h, qi, kj):
        ks = kj.clamp(0, n_s - 1)
        sink = slot_mask(spec, q_pos[qi], s_index[b, ks], kj >= 0, s_valid[b, ks])
        return torch.where(kj < n_s, sink, contiguous(b, h, qi, kj))

    return with_sinks
