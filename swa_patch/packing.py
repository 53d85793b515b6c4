"""Packed (padding-free) rows: several documents in one row, none attending another.

A forward says where its documents start in any of three ways (TRL's padding-free collator
passes all three): ``position_ids`` that restart (a new document starts wherever a position is
not the previous one plus one, as transformers' ``find_packed_sequence_indices`` decides; read,
like transformers does, only when the batch has no padding), ``cu_seq_lens_q``/``cu_seq_lens_k``
(flash-attn's cumulative lengths over the flattened batch) or ``seq_idx`` (a document index per
token).  :func:`document_starts` reads them once per forward (the top-level hook), checks that
they agree and returns each row's document starts; the mask builder records them in
:class:`~swa_patch.attention.MaskInfo`, and every layer runs each document as its own stream
(:func:`swa_patch.attention.run_plan`).
"""
from __future__ import annotations

import torch

Starts = tuple[tuple[int, ...], ...]     # per row, the offsets where its documents start (0 first)


def _starts_where(new: torch.Tensor) -> Starts:
    """``new`` ``[B, n]`` bool (a document starts here) -> each row's starts, 0 included."""
    new = new.clone()
    new[:, 0] = True
    return tuple(tuple(row.nonzero().flatten().tolist()) for row in new)


def from_position_ids(position_ids: torch.Tensor, batch: int, n: int) -> Starts:
    pos = position_ids.expand(batch, n)
    return _starts_where(torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1)


def from_seq_idx(seq_idx: torch.Tensor, batch: int, n: int) -> Starts:
    idx = seq_idx.reshape(-1, n).expand(batch, n)
    return _starts_where(torch.diff(idx, prepend=idx[:, :1], dim=-1) != 0)


def from_cu_seq_lens(cu_seq_lens: torch.Tensor, batch: int, n: int) -> Starts:
    """``cu_seq_lens`` ``[docs + 1]`` over the ``batch * n`` flattened tokens; no document may
    cross from one row into the next."""
    cu = [int(x) for x in cu_seq_lens.reshape(-1).tolist()]
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != batch * n or any(b <= a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seq_lens_q must rise strictly from 0 to the {batch * n} tokens of the batch "
                         f"({batch} x {n}); got {cu}")
    missing = [r for r in range(batch) if r * n not in cu]
    if missing:
        raise ValueError(f"cu_seq_lens_q puts a document across rows {missing[0] - 1} and {missing[0]}; "
                         "each row of a packed batch must hold whole documents")
    return tuple(tuple(s - r * n for s in cu[:-1] if r * n <= s < (r + 1) * n) for r in range(batch))


# Each source of document boundaries: the keyword a forward passes, and how it is read.
SOURCES = {"cu_seq_lens_q": from_cu_seq_lens, "seq_idx": from_seq_idx, "position_ids": from_position_ids}


def document_starts(kwargs: dict, batch: int, n: int, attention_mask: torch.Tensor | None) -> Starts | None:
    """Each row's document starts, from whichever of ``SOURCES`` the forward passes (those that
    mark documents must agree); None when every row holds one document.  ``position_ids`` are
    read, as transformers reads them, only where ``attention_mask`` shows no padding (generate()
    gives left pads positions that restart)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and not torch.equal(cu_q.cpu(), cu_k.cpu()):
        raise ValueError("cu_seq_lens_k differs from cu_seq_lens_q: swa_patch runs packed documents only "
                         "as self-attention over the same tokens (no cache); pass equal cumulative lengths")
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and (n == 1 or _padded(attention_mask)):
        position_ids = None
    given = {"cu_seq_lens_q": cu_k if cu_q is None else cu_q, "seq_idx": kwargs.get("seq_idx"),
             "position_ids": position_ids}
    found = {name: SOURCES[name](value, batch, n) for name, value in given.items() if value is not None}
    found = {name: starts for name, starts in found.items() if any(len(row) > 1 for row in starts)}
    if len(set(found.values())) > 1:
        raise ValueError(f"{' and '.join(found)} disagree on where the packed documents start "
                         f"({found}); pass boundaries that agree, or only one of them")
    return next(iter(found.values()), None)


def _padded(attention_mask) -> bool:
    return isinstance(attention_mask, torch.Tensor) and not bool(attention_mask.all())


def describe(kwargs: dict) -> str:
    """The keywords that marked documents, for error messages."""
    names = [name for name in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")
             if kwargs.get(name) is not None]
    return ", ".join(names) or "packed documents"
