"""The attention function and mask builder registered with transformers.

The mask builder does not materialise a mask: it records where the queries sit in the
stream and which tokens are padding (:class:`MaskInfo`).  The attention function combines
that with its layer's :class:`~swa_patch.masks.LayerSpec` (set on the module by
``patch_model``) into a :class:`~swa_patch.backends.layout.KeyLayout`, and calls a backend.
Caches made by :func:`swa_patch.make_cache` hand their own layout (sink slots included)
through the ``swa_keys`` keyword.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from .backends import BACKEND_MODULES, flash_available
from .backends.flex import FlexCompileLimit
from .backends.layout import KeyLayout
from .masks import LayerSpec, first_real_index
from .packing import Starts

logger = logging.getLogger("swa_patch")

DECODE_MAX_QUERIES = 128   # shorter calls (decode steps, small chunks) use the sdpa kernel
FLEX_MIN_QUERIES = 2048    # auto on CUDA: flex pays its compile only on long no-grad prefills
# auto on CPU runs the sdpa band, not flex: measured on 12 prompts of 2k-16k tokens (4 layers,
# W=1024, benchmarks/varying_prompts.py) flex's prefills took as long as the band's or longer,
# and its first call compiles for 5-10 s.  backend="flex" still runs it on request.
AUTO_FLEX_ON_CPU = False


@dataclass
class MaskInfo:
    """What the registered mask builder hands each layer instead of a mask."""
    q_offset: int
    padding: torch.Tensor | None   # [B, past + q] bool (1 = real token), None if no padding
    memo: dict = field(default_factory=dict)   # per-forward work shared by layers (block masks)
    full_from: torch.Tensor | None = None      # [B] prompt boundary of decode_full layers (see
                                               # masks.LayerSpec); None: the last query.  Packed rows:
                                               # [B, n], per token its document's boundary
    documents: Starts | None = None            # packed rows: per row, where each document starts
                                               # (swa_patch.packing); None: one document per row


@dataclass(eq=False)
class ForwardFacts:
    """What the backbone's pre-hook (:mod:`swa_patch.generation`) settled for one forward: the
    prompt boundary of decode_full layers (from ``prompt_lengths`` or ``labels``) and the packed
    documents.  It travels in that forward's own keyword arguments (``swa_forward``), which
    transformers hands from the backbone through every decoder layer to the attention function
    (and gradient checkpointing keeps for the recompute): no other forward, thread or model can
    see it.  ``reached`` counts the attention calls that took it, so a family that dropped the
    keyword is caught instead of running without documents or boundary."""
    full_from: torch.Tensor | None = None
    documents: Starts | None = None
    reached: int = 0

    def mask_info(self, info):
        """The mask builder's ``info`` with this forward's facts (anything else, e.g. a prepared
        4-D mask, is returned as it is, for :func:`run_plan` to refuse)."""
        self.reached += 1
        if info is not None and not isinstance(info, MaskInfo):
            return info
        info = MaskInfo(0, None) if info is None else info
        return dataclasses.replace(info, full_from=self.full_from, documents=self.documents)


def mask_builder(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs) -> MaskInfo:
    padding = None
    if attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all())):
        padding = attention_mask.bool()          # compiled: no host sync to find out there is none
    if not torch.is_tensor(q_offset):
        q_offset = int(q_offset)
    return MaskInfo(q_offset, padding)


@dataclass(frozen=True)
class LayerPlan:
    spec: LayerSpec
    backend: str


def swa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  softcap=None, s_aux=None, swa_keys: KeyLayout | None = None,
                  swa_forward: ForwardFacts | None = None, **kwargs):
    """query ``[B, H, q, D]``, key/value ``[B, Hkv, kv, D]`` (rotated, cache included)
    -> (``[B, q, H, D]``, None)."""
    if dropout and module.training:
        raise ValueError(f"attention dropout ({dropout}) is not supported by swa_patch; set "
                         "config.attention_dropout = 0.0")
    if swa_forward is not None:
        attention_mask = swa_forward.mask_info(attention_mask)
    return run_plan(module._swa_plan, query, key, value, attention_mask, scaling, softcap, s_aux, swa_keys), None


def run_plan(plan: LayerPlan, query, key, value, attention_mask: MaskInfo | None, scaling=None, softcap=None,
             s_aux=None, swa_keys: KeyLayout | None = None) -> torch.Tensor:
    """One layer's attention under ``plan``, as :func:`swa_attention` runs it (also the way to
    call it outside a model); -> ``[B, q, H, D]``."""
    if isinstance(attention_mask, torch.Tensor):
        raise ValueError("swa_patch builds its own masks; a prepared 4-D attention_mask cannot be "
                         "combined with the sliding window. Pass a 2-D padding mask instead.")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if attention_mask is not None and attention_mask.documents is not None:
        return _attend_documents(plan, query, key, value, attention_mask, scaling, softcap, s_aux, swa_keys)
    if swa_keys is not None and not isinstance(swa_keys, (KeyLayout, SplitKeys)):
        swa_keys = swa_keys.resolve()   # from a cache whose update() got no kwargs (GPT-NeoX)
    if isinstance(swa_keys, SplitKeys):
        return _attend_head_groups(plan.backend, query, None, None, None, plan.spec, scaling, softcap, s_aux,
                                   split=swa_keys)
    layout = swa_keys if swa_keys is not None else contiguous_layout(attention_mask, query, key, value,
                                                                     plan.spec)
    dim = query.shape[-1]
    if layout.query_extra is not None:
        query = torch.cat([query, layout.query_extra(query)], dim=-1)
    if plan.spec.decode_full and plan.spec.kv_decode_full is None and plan.backend != "eager":   # eager: the predicate
        out = _attend_decode_full(plan.backend, query, key, value, layout, plan.spec, scaling, softcap, s_aux)
    else:
        out = _attend_spec(plan.backend, query, key, value, layout, plan.spec, scaling, softcap, s_aux)
    return out if layout.query_extra is None else out[..., :dim]


def _attend_documents(plan, query, key, value, info: MaskInfo, scaling, softcap, s_aux, swa_keys):
    """A packed row: each document runs alone, as its own stream (queries, keys and padding cut
    to it, stream indices from its first token, so its window and sinks are its own), on whatever
    backend the plan picks.  No call ever holds keys of two documents.  Documents of similar length
    (in any row) run as the rows of one call, right-padded to their group's length: a causal query
    never sees a key after it, so the padding changes no real query (the outputs of pad queries are
    dropped).  Groups and index tensors are worked out once per forward (:func:`_document_groups`);
    per layer, a group costs one gather per input and one scatter of its output."""
    lq = query.shape[2]
    if swa_keys is not None or info.q_offset != 0 or key.shape[2] != lq:
        raise ValueError("packed documents (position_ids that restart, cu_seq_lens_q/k or seq_idx) cannot "
                         "be combined with a cache: pass use_cache=False and no cache")
    out = query.new_empty(query.shape[0], lq, query.shape[1], value.shape[-1])
    for group in _document_groups(info, lq, query.device):
        gather = lambda x: x.transpose(1, 2)[group.rows, group.index].transpose(1, 2)   # noqa: E731  [k, H, L, D]
        part = run_plan(plan, gather(query), gather(key), gather(value),
                        MaskInfo(0, group.padding, group.memo, group.full_from), scaling, softcap, s_aux)
        if group.inside is None:
            out[group.rows, group.index] = part
        else:                                      # right padding repeats a token: write real ones only
            out[group.rows.expand_as(group.index)[group.inside], group.index[group.inside]] = part[group.inside]
    return out


@dataclass
class _DocumentGroup:
    rows: torch.Tensor               # [k, 1] the batch row of each document
    index: torch.Tensor              # [k, L] token index of each document's tokens (its last one repeated
                                     # as right padding up to L)
    inside: torch.Tensor | None      # [k, L] tokens of the document (not its right padding); None: all
    padding: torch.Tensor | None     # [k, L] real tokens, where the row has padding of its own
    full_from: torch.Tensor | None   # [k] each document's own prompt boundary (decode_full)
    memo: dict


def _group_length(length: int) -> int:
    """The length a document of ``length`` tokens is padded to: 4 steps per doubling, so a group
    wastes at most a quarter of its work and a row of documents of many lengths makes few groups."""
    step = max(1, (1 << max(0, length.bit_length() - 1)) // 4)
    return -(-length // step) * step


def _document_groups(info: MaskInfo, lq: int, device) -> list[_DocumentGroup]:
    """The documents of ``info`` grouped by :func:`_group_length`, memoised for the forward's layers."""
    if "document_groups" in info.memo:
        return info.memo["document_groups"]
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for row, starts in enumerate(info.documents):
        for start, end in zip(starts, starts[1:] + (lq,)):
            by_length.setdefault(_group_length(end - start), []).append((row, start, end))
    groups = []
    for length, docs in by_length.items():
        rows, starts, ends = (torch.tensor(x, device=device) for x in zip(*docs))
        token = starts[:, None] + torch.arange(length, device=device)
        inside = token < ends[:, None]
        index = torch.minimum(token, ends[:, None] - 1)
        inside = None if bool(inside.all()) else inside
        padding = None           # right padding needs no mask: only pad queries come after it
        if info.padding is not None:
            padding = info.padding[rows[:, None], index] & (True if inside is None else inside)
        full_from = (ends - 1 - starts if info.full_from is None      # default: each document's last token
                     else info.full_from[rows, starts] - starts)
        groups.append(_DocumentGroup(rows[:, None], index, inside, padding, full_from, {}))
    info.memo["document_groups"] = groups
    return groups


def _attend_spec(requested, query, key, value, layout, spec, scaling, softcap, s_aux):
    if not spec.per_head:
        return _attend(requested, query, key, value, layout, spec, scaling, softcap, s_aux)
    return _attend_head_groups(requested, query, key, value, layout, spec, scaling, softcap, s_aux)


def _attend_decode_full(requested, query, key, value, layout: KeyLayout, spec, scaling, softcap, s_aux):
    """A decode_full layer: in each row the queries before its boundary attend the window
    (block-sparse, like any window layer) and the queries from it on attend every earlier
    key (full causal; the sinks are among those keys).  Rows that share a boundary run
    together, so a batch costs two kernel calls per distinct boundary."""
    lq = query.shape[2]
    cuts = _boundary_cuts(layout, query.shape[0], lq)
    rows_by_cut: dict[int, list[int]] = {}
    for row, cut in enumerate(cuts):
        rows_by_cut.setdefault(cut, []).append(row)
    if len(rows_by_cut) == 1:
        return _split_at(requested, query, key, value, layout, spec, cuts[0], scaling, softcap, s_aux)
    out = query.new_empty(query.shape[0], lq, query.shape[1], value.shape[-1])
    for cut, rows in rows_by_cut.items():
        idx = torch.tensor(rows, device=query.device)
        sub = _layout_rows(layout, idx, rows)
        out[idx] = _split_at(requested, query[idx], key[idx], value[idx], sub, spec, cut, scaling, softcap, s_aux)
    return out


def _boundary_cuts(layout: KeyLayout, batch: int, lq: int) -> list[int]:
    """Per row, the local index of the first query that attends fully (``lq``: none); computed
    once per forward for all layers (one host sync)."""
    memo_key = ("cuts", layout.q_start, lq)
    if layout.memo is not None and memo_key in layout.memo:
        return layout.memo[memo_key]
    if layout.full_from is None:
        raise ValueError("a decode_full layer needs the prompt boundary (KeyLayout.full_from)")
    cuts = (layout.full_from - layout.q_start).clamp(0, lq).expand(batch).tolist()
    if layout.memo is not None:
        layout.memo[memo_key] = cuts
    return cuts


def _layout_rows(layout: KeyLayout, idx: torch.Tensor, rows: list[int]) -> KeyLayout:
    """The layout of batch rows ``idx``; masks built for them are memoised apart from the
    other rows' (the memo keys do not name rows)."""
    take = lambda x: None if x is None else x[idx]
    memo = None if layout.memo is None else layout.memo.setdefault(("rows", tuple(rows)), {})
    return dataclasses.replace(layout, key_real=take(layout.key_real), sink_k=take(layout.sink_k),
                               sink_v=take(layout.sink_v), sink_index=take(layout.sink_index),
                               sink_valid=take(layout.sink_valid), full_from=None, memo=memo)


def _split_at(requested, query, key, value, layout: KeyLayout, spec, cut, scaling, softcap, s_aux):
    """Queries ``[:cut]`` through the window, ``[cut:]`` through full causal attention."""
    lq, parts = query.shape[2], []
    if cut > 0:      # keys end at the last windowed query, as every kernel expects
        end = layout.q_start + cut - layout.k_start
        window_layout = dataclasses.replace(layout, full_from=None,
                                            key_real=None if layout.key_real is None else layout.key_real[:, :end])
        parts.append(_attend_spec(requested, query[:, :, :cut], key[:, :, :end], value[:, :, :end],
                                  window_layout, spec.windowed(), scaling, softcap, s_aux))
    if cut < lq:
        if layout.k_start > 0:
            raise RuntimeError(f"a decode_full layer attends every earlier key, but the keys start at "
                               f"position {layout.k_start}: use swa_patch.make_cache(model)")
        full_layout = KeyLayout(layout.q_start + cut, 0, layout.key_real, memo=layout.memo)
        parts.append(_attend(requested, query[:, :, cut:], key, value, full_layout, LayerSpec(None),
                             scaling, softcap, s_aux))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _attend(requested, query, key, value, layout, spec, scaling, softcap, s_aux):
    backend = choose_backend(requested, query, spec, layout, s_aux is not None)
    try:
        return BACKEND_MODULES[backend].attend(query, key, value, layout, spec, scaling, softcap, s_aux)
    except FlexCompileLimit as err:
        if requested != "auto":
            raise
        if "flex-limit" not in _logged:
            _logged.add("flex-limit")
            logger.warning("swa_patch: %s; backend='auto' runs 'sdpa' for such calls from now on", err)
        return BACKEND_MODULES["sdpa"].attend(query, key, value, layout, spec, scaling, softcap, s_aux)


def _attend_head_groups(requested, query, key, value, layout, spec, scaling, softcap, s_aux, split=None):
    """Heads that differ (per-head dilation, per-KV-head window): the heads that share a window
    and dilation form one uniform call (the same work per head as an undilated layer, on any
    backend); outputs go back to head order.  ``split`` (:class:`SplitKeys`, from a cache that keeps
    its full KV heads apart from its rolling ones): each group reads the keys of its own part."""
    n_kv = key.shape[1] if split is None else split.n_kv
    dim, outs, order = query.shape[-1], [], []
    for group_spec, heads in spec.head_groups(query.shape[1], n_kv):
        grows = group_spec.window is None or group_spec.decode_full
        k, v, part_layout, held = (key, value, layout, None) if split is None else split.part(grows)
        q, k, v, group_layout, group_aux = _select_heads(query, k, v, part_layout, s_aux, heads,
                                                         query.shape[1] // n_kv, held)
        if group_spec.window is None and group_layout.n_sinks:    # a full head's sinks are among its keys
            group_layout = dataclasses.replace(group_layout, sink_k=None, sink_v=None, sink_index=None,
                                               sink_valid=None)
        if split is not None and group_layout.query_extra is not None:    # a shift-mode chunk's window part
            q = torch.cat([q, group_layout.query_extra(q)], dim=-1)
        attend = _attend_decode_full if group_spec.decode_full and requested != "eager" else _attend
        out = attend(requested, q, k, v, group_layout, group_spec, scaling, softcap, group_aux)
        outs.append(out[..., :dim])
        order += heads
    out = torch.cat(outs, dim=2)                                  # [B, q, H, D], group order
    if order != sorted(order):
        out = out[:, :, torch.argsort(torch.tensor(order, device=out.device))]
    return out


@dataclass
class SplitKeys:
    """The keys of a cache layer whose KV heads differ in kind: ``window`` holds the rolling
    heads (``window_heads``, a ring of constant size), ``full`` the heads that keep every key
    (``full_heads``: full heads, and heads that decode fully); each part is ``(key, value, layout)``
    of its own heads only."""
    n_kv: int
    window_heads: list[int]
    window: tuple
    full_heads: list[int]
    full: tuple

    def part(self, full: bool) -> tuple:
        """``(key, value, layout, kv_heads)`` of the full or the windowed heads."""
        return (*self.full, self.full_heads) if full else (*self.window, self.window_heads)


def _select_heads(query, key, value, layout: KeyLayout, s_aux, heads: list[int], per_kv: int | None = None,
                  kv_heads_held: list[int] | None = None):
    """Query ``heads`` and the key/value heads they read.  Whole GQA groups keep their shared
    kv heads; a GQA group split across dilations gets one kv head per query head.  ``key`` holds
    the KV heads ``kv_heads_held`` (default: all of them, in order)."""
    per_kv = per_kv or query.shape[1] // key.shape[1]
    local = (lambda kv: kv) if kv_heads_held is None else kv_heads_held.index
    kv_heads = sorted({local(h // per_kv) for h in heads})
    if len(heads) != len(kv_heads) * per_kv:                       # a split GQA group
        kv_heads = [local(h // per_kv) for h in heads]
    take = lambda x, idx: None if x is None else _take_heads(x, idx)
    group_layout = dataclasses.replace(layout, sink_k=take(layout.sink_k, kv_heads),
                                       sink_v=take(layout.sink_v, kv_heads))
    return (_take_heads(query, heads), _take_heads(key, kv_heads), _take_heads(value, kv_heads),
            group_layout, None if s_aux is None else s_aux[heads])


def _take_heads(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """``x[:, heads]``: a view when the heads are consecutive."""
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return x[:, heads[0]:heads[0] + len(heads)]
    return x.index_select(1, torch.tensor(heads, device=x.device))


def contiguous_layout(info: MaskInfo | None, query, key, value, spec: LayerSpec) -> KeyLayout:
    """Layout of keys that a plain forward or a transformers cache returns: one contiguous
    block ending at the last query.  Sinks are gathered from that block."""
    lq, lk = query.shape[2], key.shape[2]
    q_start = lk - lq if info is None else info.q_offset
    k_start = q_start + lq - lk
    if k_start < 0:
        raise ValueError(f"got {lk} keys for a stream of {q_start + lq} tokens: a pre-allocated cache "
                         "(StaticCache, cache_implementation='static') is not supported; use "
                         "swa_patch.make_cache(model) or the default cache of generate()")
    padding = None if info is None else info.padding
    if padding is not None and padding.shape[1] < q_start + lq:
        raise ValueError(f"attention_mask covers {padding.shape[1]} tokens but the stream has "
                         f"{q_start + lq}; pass the mask of every token seen so far")
    key_real = None if padding is None else padding[:, k_start:k_start + lk]
    keeps_all = spec.grows
    oldest_needed = 0 if keeps_all else max(0, q_start - spec.span + 1)
    if k_start > oldest_needed:
        raise RuntimeError(f"the cache kept keys from position {k_start} on, but this layer's "
                           f"{'decode_full attention' if spec.any_decode_full else 'window'} needs them from "
                           f"{oldest_needed}: use swa_patch.make_cache(model)")
    layout = KeyLayout(q_start, k_start, key_real, memo=None if info is None else info.memo)
    if spec.any_decode_full:
        full_from = None if info is None else info.full_from
        layout.full_from = (torch.full((1,), q_start + lq - 1, device=key.device) if full_from is None
                            else full_from.to(key.device))
    if spec.window is None or not spec.sinks:
        return layout
    first = (torch.zeros(query.shape[0], dtype=torch.long, device=key.device) if padding is None
             else first_real_index(padding))
    index = first[:, None] + torch.arange(spec.sinks, device=key.device)
    if bool(((index < q_start + lq) & (index < k_start)).any()):
        raise RuntimeError("the cache dropped the attention-sink tokens: use swa_patch.make_cache(model)")
    gather_sinks(layout, key, value, index, index < q_start + lq)
    return layout


def gather_sinks(layout: KeyLayout, key, value, index: torch.Tensor, exists: torch.Tensor) -> None:
    """Fill the layout's sink slots with copies of the contiguous keys at stream ``index``
    ``[B, S]`` (``exists``: the token has been seen; a pad is never a valid sink)."""
    b, s = index.shape
    local = (index - layout.k_start).clamp(0, key.shape[2] - 1)
    valid = exists if layout.key_real is None else exists & layout.key_real.gather(1, local)
    gather = local[:, None, :, None].expand(b, key.shape[1], s, key.shape[3])
    layout.sink_k, layout.sink_v = key.gather(2, gather), value.gather(2, gather)
    layout.sink_index, layout.sink_valid = index, valid


_logged: set = set()


def choose_backend(requested: str, query, spec: LayerSpec, layout: KeyLayout, s_aux: bool = False) -> str:
    """The kernel for one call.  Short query blocks (decode steps, small chunks) always use
    the sdpa kernel; ``auto`` picks FlashAttention-4 on CUDA (Hopper+) when installed, then
    flash-attn 2, flex for long prefills without gradients on CUDA, sdpa otherwise.  Every
    choice that differs from the request is logged."""
    lq = query.shape[2]
    if requested in ("eager", "sdpa"):
        return requested
    if lq <= DECODE_MAX_QUERIES:        # every decode step: decided before any logging work
        if requested not in _logged_short:
            _logged_short.add(requested)
            _log_choice(requested, "sdpa", f"calls of <= {DECODE_MAX_QUERIES} queries (decode steps, small chunks)")
        return "sdpa"
    if layout.key_index is not None:
        choice, why = "sdpa", "keys from a ring buffer (dense kernel over the cache)"
    elif requested in ("flash", "flash4") and (layout.key_real is not None):
        choice, why = "sdpa", "left padding (flash path here is unpadded)"
    elif requested != "auto":
        return requested
    elif spec.window is None:
        choice, why = "sdpa", "full attention (torch SDPA's dense causal kernel)"
    elif query.is_cuda and flash_available("flash4") and spec.dilation == 1 and layout.key_real is None:
        choice, why = "flash4", "CUDA with FlashAttention-4"
    elif query.is_cuda and flash_available("flash") and spec.dilation == 1 and layout.key_real is None:
        choice, why = "flash", "CUDA with flash-attn"
    elif s_aux and not query.is_cuda:
        choice, why = "sdpa", "learned sink logits on CPU (compiled flex has no log-sum-exp there)"
    elif query.requires_grad and torch.is_grad_enabled():
        choice, why = ("flex", "CUDA training") if query.is_cuda else ("sdpa", "training on CPU (flex has no CPU backward)")
    elif lq >= FLEX_MIN_QUERIES and (query.is_cuda or AUTO_FLEX_ON_CPU):
        choice, why = "flex", f"long prefill ({lq} queries)"
    elif lq >= FLEX_MIN_QUERIES:
        choice, why = "sdpa", f"CPU prefill ({lq} queries; flex would compile for no gain)"
    else:
        choice, why = "sdpa", f"short prefill ({lq} queries)"
    _log_choice(requested, choice, why)
    return choice


_logged_short: set = set()


def _log_choice(requested: str, choice: str, why: str) -> None:
    """Log each kind of choice once."""
    key = (requested, choice, why.split(" (")[0])
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        logger.info("swa_patch: backend=%r runs %r for %s", requested, choice, why)
