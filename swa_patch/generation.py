"""How a patched model meets its caches and ``generate()``: :func:`make_cache` and the hooks
``patch_model`` installs (``unpatch_model`` removes them).

- The empty ``DynamicCache`` that ``generate()`` makes by itself becomes an :class:`SWACache`.
- Each forward through an SWACache is announced to it first (which tokens come, which are
  pads; in position mode ``shift`` the cache assigns the position ids).
- decode="full": the prompt boundary of a forward comes from ``prompt_lengths=`` (a forward
  keyword or a :func:`make_cache` option), from ``labels`` (where each row's ``-100`` prefix
  ends) or from ``generate()`` (its prompt); without any, the input of the first forward is
  the prompt.  A cache records it once; a forward without a cache hands it to the mask builder.
- Packed rows (``position_ids`` that restart, ``cu_seq_lens_q/k``, ``seq_idx``): the documents
  are read once per forward (:mod:`swa_patch.packing`) and handed to the mask builder (with a
  cache they are refused before any layer runs); decode="full" takes each document's boundary
  from ``labels``.
- Inside :func:`swa_patch.original_attention` the hooks stand aside.

The dependency runs one way: ``patch`` -> ``generation`` -> ``cache``.
"""
from __future__ import annotations

import functools

import torch
from transformers.cache_utils import DynamicCache, StaticCache

from . import packing
from .attention import ForwardFacts, MaskInfo, _forwards
from .cache import SWACache, _PendingLayout
from .rope import model_ropes
from .state import layer_specs, patch_settings, patch_state

MAKE_CACHE_OPTIONS = ("positions", "prompt_lengths", "static", "max_cache_len")
_CACHE_NAMES = ("cache", "past_key_values", "layer_past")


def make_cache(model, **options) -> SWACache:
    """A fresh :class:`SWACache` for a model patched by :func:`swa_patch.patch_model`.

    Options: ``positions`` ("original" | "shift"; default: the patch settings' mode);
    ``prompt_lengths`` (decode="full" models: an int, or one per row, counted from the start
    of the stream with left pads; default: the first forward's input is the prompt);
    ``static=True``: fixed-shape buffers and a tensor position, for ``torch.compile`` and CUDA
    graphs (``max_cache_len`` sizes full-attention layers), see :mod:`swa_patch.static_cache`.
    """
    unknown = sorted(set(options) - set(MAKE_CACHE_OPTIONS))
    if unknown:
        raise TypeError(f"make_cache got unknown option(s) {unknown}; allowed: {list(MAKE_CACHE_OPTIONS)}")
    settings = patch_settings(model)
    if settings is None:
        raise ValueError("make_cache(model) needs a model patched by swa_patch.patch_model")
    positions = options.get("positions") or settings.position_mode
    if positions not in ("original", "shift"):
        raise ValueError(f"positions must be 'original' or 'shift', got {positions!r}")
    specs = layer_specs(model)
    ropes = model_ropes(model, len(specs)) if positions == "shift" else None
    if options.get("static"):
        from .static_cache import StaticSWACache
        return StaticSWACache(specs, options.get("max_cache_len"), positions, ropes)
    cache = SWACache(specs, positions, ropes)
    if options.get("prompt_lengths") is not None:
        _require_decode_full(settings)
        cache.record_boundary(prompt_ends(options["prompt_lengths"]) - 1)
    return cache


def prompt_ends(prompt_lengths, batch: int | None = None, stream_end: int | None = None) -> torch.Tensor:
    """``prompt_lengths`` (an int or one per row) as a ``[B]`` or ``[1]`` long tensor, checked:
    every value >= 1, and <= ``stream_end`` when the whole stream is in one forward."""
    ends = torch.as_tensor(prompt_lengths)
    if ends.is_floating_point() or ends.dtype == torch.bool or ends.dim() > 1:
        raise TypeError(f"prompt_lengths must be an int or one int per row, got {prompt_lengths!r}")
    ends = ends.reshape(-1).long()
    if batch is not None and ends.numel() not in (1, batch):
        raise ValueError(f"prompt_lengths has {ends.numel()} values for a batch of {batch} rows")
    if ends.numel() and int(ends.min()) < 1:
        raise ValueError(f"prompt_lengths must be >= 1 (tokens of prompt, left pads included), got "
                         f"{ends.tolist()}")
    if stream_end is not None and ends.numel() and int(ends.max()) > stream_end:
        raise ValueError(f"prompt_lengths {ends.tolist()} reach past the sequence ({stream_end} tokens); "
                         f"the allowed range is 1..{stream_end} (to feed a prompt in chunks, pass a cache: "
                         "swa_patch.make_cache(model, prompt_lengths=...))")
    return ends


def label_prompt_ends(labels: torch.Tensor) -> torch.Tensor:
    """Per row, where the ``-100`` prefix of ``labels`` ``[B, n]`` ends: the index of the first
    answer token (``labels[t]`` is predicted by query ``t - 1``; ``labels[0]`` never is), or
    ``n`` for a row without one."""
    answer = labels[:, 1:] != -100
    n = labels.shape[1]
    return torch.where(answer.any(1), answer.int().argmax(1) + 1, n).long()


def _require_decode_full(settings) -> None:
    if not settings.decodes_full:
        raise ValueError(f"prompt_lengths applies to models patched with decode='full' or a list of "
                         f"decode layers; this one has decode={settings.decode!r}")


def _find_cache(kwargs: dict):
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def _tokens(args, kwargs) -> torch.Tensor:
    tokens = kwargs.get("input_ids", args[0] if args else None)
    return kwargs["inputs_embeds"] if tokens is None else tokens


def _top_level_hook(model, state: dict):
    """Pre-hook of the patched model: swaps generate()'s own empty DynamicCache for an
    SWACache (a DynamicCache seen again maps to the same SWACache) and settles the packed
    documents (refusing them where they cannot be honoured) and the prompt boundary of
    decode="full" layers."""
    def hook(module, args, kwargs):
        _forwards.append(ForwardFacts())         # popped by _end_of_forward, whatever happens
        prompt_lengths = kwargs.pop("prompt_lengths", None)
        name, cache = _find_cache(kwargs)
        if state.get("suspended"):
            if isinstance(cache, SWACache):
                raise ValueError("an SWACache cannot serve the original attention: inside "
                                 "swa_patch.original_attention(model) use the model's own caches")
            return args, kwargs
        if isinstance(cache, StaticCache):
            raise ValueError("a pre-allocated cache (StaticCache, cache_implementation='static') is not "
                             "supported by a patched model; use swa_patch.make_cache(model) or the default "
                             "cache of generate()")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            swa = getattr(cache, "_swa_patch_cache", None)
            if swa is None and cache.get_seq_length() == 0:
                swa = cache._swa_patch_cache = make_cache(model)
            if swa is not None:
                kwargs = {**kwargs, name: swa}
                cache = swa
        facts = _forwards[-1]
        facts.documents = _documents(state, args, kwargs, cache, prompt_lengths)
        if state["settings"].decodes_full and facts.documents is not None:
            facts.full_from = _document_boundaries(kwargs.get("labels"), facts.documents)
        elif state["settings"].decodes_full:
            facts.full_from = _boundary(state, args, kwargs, cache, prompt_lengths)
        elif prompt_lengths is not None:
            _require_decode_full(state["settings"])
        return args, kwargs
    return hook


def _documents(state, args, kwargs, cache, prompt_lengths) -> packing.Starts | None:
    """The packed documents of this forward (:mod:`swa_patch.packing`), refused before any layer
    runs where they cannot be honoured exactly."""
    tokens = _tokens(args, kwargs)
    mask = kwargs.get("attention_mask")
    mask = mask.padding if isinstance(mask, MaskInfo) else mask
    if tokens is None or tokens.dim() < 2:
        return None
    starts = packing.document_starts(kwargs, tokens.shape[0], tokens.shape[1], mask)
    if starts is None:
        return None
    if cache is not None:
        raise ValueError(f"packed documents ({packing.describe(kwargs)}) cannot be combined with a cache "
                         f"({type(cache).__name__}): a cache continues one stream per row. Pass "
                         "use_cache=False and no cache for a packed forward, or one document per row")
    if prompt_lengths is not None and state["settings"].decodes_full:
        raise ValueError(f"prompt_lengths gives one prompt boundary per row, but the rows hold packed documents "
                         f"({packing.describe(kwargs)}): pass labels instead (each document's prompt ends where "
                         "its -100 prefix ends) or nothing (each document's last token predicts its answer)")
    return starts


def _document_boundaries(labels, documents: packing.Starts) -> torch.Tensor | None:
    """decode="full" on packed rows: ``[B, n]``, per token the stream index of its document's first
    fully attending query, where that document's ``-100`` prefix of ``labels`` ends (as for the
    document alone); None without labels (each document's last token, the layouts' default)."""
    if labels is None:
        return None
    n = labels.shape[1]
    full_from = torch.empty(labels.shape, dtype=torch.long)
    for row, starts in enumerate(documents):
        for start, end in zip(starts, starts[1:] + (n,)):
            full_from[row, start:end] = start + int(label_prompt_ends(labels[row:row + 1, start:end])) - 1
    return full_from


def _boundary(state, args, kwargs, cache, prompt_lengths) -> torch.Tensor | None:
    """``[B]`` (or ``[1]``) stream index of each row's first fully attending query, recorded
    in an SWACache; None when this forward does not say (the layouts then take the default)."""
    if cache is not None and not isinstance(cache, SWACache):
        raise ValueError(f"decode={state['settings'].decode!r} needs a cache that keeps every key of its "
                         f"layers and records the prompt boundary; got {type(cache).__name__}. Use "
                         "swa_patch.make_cache(model) or the default cache of generate()")
    tokens = _tokens(args, kwargs)
    batch, n = tokens.shape[:2]
    start = 0 if cache is None else cache.get_seq_length()
    labels = kwargs.get("labels")
    if prompt_lengths is not None:
        ends = prompt_ends(prompt_lengths, batch, None if cache is not None else n)
    elif labels is not None:
        ends = start + label_prompt_ends(labels)
    elif isinstance(cache, SWACache) and cache.full_from is None and state.get("generate_prompt_end") is not None:
        ends = state["generate_prompt_end"]
    else:
        return None
    full_from = (ends - 1).to(tokens.device)
    if isinstance(cache, SWACache):
        cache.record_boundary(full_from)
    return full_from


def _end_of_forward(module, args, kwargs, output):
    if _forwards:
        _forwards.pop()


def _announce_step(state: dict):
    """Decoder pre-hook: tell an SWACache which tokens come (and which are pads); in shift
    mode replace ``position_ids`` with the cache's frame positions."""
    def hook(module, args, kwargs):
        _, cache = _find_cache(kwargs)
        if not isinstance(cache, SWACache):
            return None
        if state.get("suspended"):
            raise ValueError("an SWACache cannot serve the original attention: inside "
                             "swa_patch.original_attention(model) use the model's own caches")
        tokens = _tokens(args, kwargs)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, MaskInfo):       # generate() builds masks ahead for compileable caches
            mask = mask.padding
            kwargs = {**kwargs, "attention_mask": mask}
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            raise ValueError("SWACache needs a 2-D attention_mask [batch, tokens] (or none)")
        positions = cache.begin(tokens.shape[1], mask, tokens.shape[0], tokens.device)
        if positions is None:
            return args, kwargs
        return args, {**kwargs, "position_ids": positions}
    return hook


def _pending_layout(module, args, kwargs):
    """Attention pre-hook: a placeholder for families whose cache.update gets no kwargs."""
    _, cache = _find_cache(kwargs)
    if not isinstance(cache, SWACache) or "swa_keys" in kwargs:
        return None
    return args, {**kwargs, "swa_keys": _PendingLayout(cache, module.layer_idx)}


def _recording_generate(model, state: dict):
    """``model.generate`` that tells the hooks where the prompt ends (decode="full": the
    boundary must not depend on how generate feeds the prompt, e.g. ``prefill_chunk_size``):
    ``prompt_lengths=`` if given (e.g. to attend fully from a question on), else its input."""
    original = type(model).generate.__get__(model)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        prompt_lengths = kwargs.pop("prompt_lengths", None)
        tokens = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if prompt_lengths is not None:
            state["generate_prompt_end"] = prompt_ends(prompt_lengths, tokens.shape[0], tokens.shape[1])
        elif tokens is not None:
            state["generate_prompt_end"] = torch.tensor([tokens.shape[1]])
        try:
            return original(*args, **kwargs)
        finally:
            state["generate_prompt_end"] = None
    return generate


def install_generation_hooks(model) -> list:
    """Hooks that make a patched model (and its ``generate()``) use an SWACache; returns the
    handles (``unpatch_model`` removes them, and the ``generate`` wrapper of decode="full")."""
    from . import compat
    state = patch_state(model)
    handles = [model.register_forward_pre_hook(_top_level_hook(model, state), with_kwargs=True),
               model.register_forward_hook(_end_of_forward, with_kwargs=True, always_call=True),
               model.base_model.register_forward_pre_hook(_announce_step(state), with_kwargs=True)]
    for _, module in compat.attention_modules(model):
        handles.append(module.register_forward_pre_hook(_pending_layout, with_kwargs=True))
    if state["settings"].decodes_full:
        model.generate = _recording_generate(model, state)
    return handles


def remove_generation_hooks(model, handles) -> None:
    for handle in handles:
        handle.remove()
    model.__dict__.pop("generate", None)
