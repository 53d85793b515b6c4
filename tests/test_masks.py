"""The window convention pinned without ``band()``.

The eager backend and the test reference (``reference_mask``) share the predicate
``swa_patch.masks.band``, so an error in it would pass every backend-vs-reference test.  This
file is where the convention itself is checked: against transformers' own
``sliding_window_causal_mask_function`` (what ``sliding_window=W`` means there) and against a
literal double loop over the rules of DESIGN.md (window, sinks, dilation, left padding,
decode="full" boundary).
"""
from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import sliding_window_causal_mask_function

from swa_patch.masks import LayerSpec, reference_mask


@pytest.mark.parametrize("window", [1, 2, 5, 9, 30])
def test_window_is_transformers_sliding_window(window):
    n = 24
    rule = sliding_window_causal_mask_function(window)
    idx = torch.arange(n)
    want = rule(torch.tensor(0), torch.tensor(0), idx[:, None], idx[None, :])
    assert torch.equal(reference_mask(LayerSpec(window), n)[0], want)
    assert int(want[-1].sum()) == min(window, n)              # W keys, the query itself included


def _literal(n, window, dilation, sinks, pads, full_from=None):
    """DESIGN.md, word for word: query i sees j = i - k*d (k < W); the first S real tokens are
    visible to every later query; pads are seen by nobody but themselves; from the boundary on
    (decode="full") a query sees every earlier real token."""
    out = torch.zeros(n, n, dtype=torch.bool)
    real = [j >= pads for j in range(n)]
    first_real = [j for j in range(n) if real[j]][:sinks]
    for i in range(n):
        for j in range(i + 1):
            in_window = (i - j) % dilation == 0 and (i - j) // dilation < window
            full = full_from is not None and i >= full_from
            out[i, j] = (i == j) or (real[j] and (in_window or j in first_real or full))
    return out


@pytest.mark.parametrize("window,dilation,sinks,pads,full_from", [
    (4, 1, 0, 0, None), (4, 1, 2, 0, None), (3, 2, 1, 0, None), (4, 3, 2, 3, None), (1, 1, 3, 2, None),
    (5, 1, 2, 4, 12), (3, 2, 1, 0, 0), (6, 1, 0, 1, 19)])
def test_reference_mask_is_the_literal_rule(window, dilation, sinks, pads, full_from):
    n = 20
    spec = LayerSpec(window, dilation, sinks, decode_full=full_from is not None)
    padding = (torch.arange(n) >= pads)[None]
    got = reference_mask(spec, n, padding, full_from=None if full_from is None else torch.tensor([full_from]))
    assert torch.equal(got[0], _literal(n, window, dilation, sinks, pads, full_from))
