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

import torch
from transformers.cache_utils import DynamicCache, StaticCache

from . import packing
from .attention import ForwardFacts, MaskInfo, _forwards
from .cache import SWACache, _PendingLayout
from .compat import ATTN_NAME
from .masks import first_real_index
from .rope import model_ropes
from .state import layer_specs, patch_settings, patch_state

MAKE_CACHE_OPTIONS = ("positions", "prompt_lengths", "static", "max_cache_len", "rollback")
_CACHE_NAMES = ("cache", "past_key_values", "layer_past")
DEFAULT_DRAFT_TOKENS = 20       # transformers' default num_assistant_tokens


def make_cache(model, **options) -> SWACache:
    """A fresh :class:`SWACache` for a model patched by :func:`swa_patch.patch_model`.

    Options: ``positions`` ("original" | "shift"; default: the patch settings' mode);
    ``prompt_lengths`` (decode="full" models: an int, or one per row, counted from the start
    of the stream with left pads; default: the first forward's input is the prompt);
    ``static=True``: fixed-shape buffers and a tensor position, for ``torch.compile`` and CUDA
    graphs (``max_cache_len`` sizes full-attention layers), see :mod:`swa_patch.static_cache`;
    ``rollback=K``: each rolling buffer keeps ``K`` spare slots so that ``crop`` of up to ``K``
    newest tokens always succeeds (speculative decoding; ``generate()`` sets it by itself from
    ``num_assistant_tokens`` or ``prompt_lookup_num_tokens``).
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
    rollback = options.get("rollback") or 0
    if isinstance(rollback, bool) or not isinstance(rollback, int) or rollback < 0:
        raise ValueError(f"rollback must be an int >= 0 (tokens a crop may remove), got {rollback!r}")
    specs = layer_specs(model)
    ropes = model_ropes(model, len(specs)) if positions == "shift" else None
    if options.get("static"):
        if rollback:
            raise ValueError("make_cache(static=True) cannot roll back (its write position is a device tensor); "
                             "rollback= needs the default (dynamic) cache")
        from .static_cache import StaticSWACache
        return StaticSWACache(specs, options.get("max_cache_len"), positions, ropes)
    cache = SWACache(specs, positions, ropes, rollback=rollback)
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


def _top_level_hook(model, args, kwargs):
    """Pre-hook of the patched model: swaps generate()'s own empty DynamicCache for an
    SWACache (a DynamicCache seen again maps to the same SWACache) and settles the packed
    documents (refusing them where they cannot be honoured) and the prompt boundary of
    decode="full" layers.  Everything it reads hangs off ``model`` (the module being called),
    so a deep copy or an unpickled model uses its own state."""
    state = patch_state(model)
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
            swa = cache._swa_patch_cache = make_cache(model, rollback=state.get("generate_rollback") or 0)
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
    dense = []
    for row, starts in enumerate(documents):
        for start, end in zip(starts, starts[1:] + (n,)):
            prompt = int(label_prompt_ends(labels[row:row + 1, start:end]))
            if prompt <= 1 < end - start:           # the document's first token would attend fully
                dense.append((row, start))
            full_from[row, start:end] = start + prompt - 1
    if dense:
        raise ValueError(f"decode='full': the labels of packed document(s) at (row, start) {dense[:4]} have no -100 "
                         "prefix over a prompt, so every query there would attend every earlier key (dense "
                         "attention, no window). Put -100 over each document's prompt in labels")
    return full_from


def _boundary(state, args, kwargs, cache, prompt_lengths) -> torch.Tensor | None:
    """``[B]`` (or ``[1]``) stream index of each row's first fully attending query, recorded
    in an SWACache; None when this forward does not say (the layouts then take the default).
    A boundary taken from ``labels`` or from generate's prompt must leave each row at least one
    windowed real token: one at the row's first real token would make the row dense."""
    if cache is not None and not isinstance(cache, SWACache):
        raise ValueError(f"decode={state['settings'].decode!r} needs a cache that keeps every key of its "
                         f"layers and records the prompt boundary; got {type(cache).__name__}. Use "
                         "swa_patch.make_cache(model) or the default cache of generate()")
    tokens = _tokens(args, kwargs)
    batch, n = tokens.shape[:2]
    start = 0 if cache is None else cache.get_seq_length()
    labels = kwargs.get("labels")
    generate_end = state.get("generate_prompt_end")
    if prompt_lengths is not None:
        ends = prompt_ends(prompt_lengths, batch, None if cache is not None else n)
    elif labels is not None:
        ends = start + label_prompt_ends(labels)
        if start == 0:
            refuse_dense_rows(ends - 1, kwargs.get("attention_mask"), "labels (no -100 prefix over the prompt)")
    elif isinstance(cache, SWACache) and cache.full_from is None and generate_end is not None:
        ends = rows_of(generate_end["ends"], batch)
        if start == 0 and not generate_end["explicit"]:
            refuse_dense_rows(ends - 1, kwargs.get("attention_mask"), "generate()'s prompt")
    else:
        return None
    full_from = (ends - 1).to(tokens.device)
    if isinstance(cache, SWACache):
        cache.record_boundary(full_from)
    return full_from


def rows_of(values: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-row ``values`` (``[1]`` or ``[B]``) for a batch that generate() expanded to ``B * k``
    rows (beams, ``num_return_sequences``: each row repeated ``k`` times in place)."""
    if values.numel() in (1, batch):
        return values
    if batch % values.numel():
        raise ValueError(f"prompt_lengths has {values.numel()} values for a batch of {batch} rows")
    return values.repeat_interleave(batch // values.numel())


def refuse_dense_rows(full_from: torch.Tensor, attention_mask, source: str) -> None:
    """decode="full": raise when a row's boundary falls at (or before) its first real token, so
    every query of the row would attend every earlier key: dense attention, not the window."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        first = first_real_index(attention_mask.bool())
    else:
        first = torch.zeros(full_from.shape, dtype=torch.long)
    dense = (full_from.cpu() <= first.cpu()).expand(max(full_from.numel(), first.numel()))
    if bool(dense.any()):
        rows = dense.nonzero().flatten().tolist()
        raise ValueError(f"decode='full': the prompt boundary from {source} falls at the first real token of "
                         f"row(s) {rows}, so every query there would attend every earlier key (dense attention, "
                         "no window). Give each row's prompt: a -100 prefix over it in labels, or "
                         "prompt_lengths= (tokens of prompt per row, left pads included; passing prompt_lengths "
                         "explicitly also runs a one-token prompt on purpose)")


def _end_of_forward(module, args, kwargs, output):
    if _forwards:
        _forwards.pop()


def _announce_step(module, args, kwargs):
    """Decoder pre-hook: tell an SWACache which tokens come (and which are pads); in shift
    mode replace ``position_ids`` with the cache's frame positions."""
    _, cache = _find_cache(kwargs)
    if not isinstance(cache, SWACache):
        return None
    if module.config._attn_implementation != ATTN_NAME:        # inside original_attention (shared config)
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


def _pending_layout(module, args, kwargs):
    """Attention pre-hook: a placeholder for families whose cache.update gets no kwargs."""
    _, cache = _find_cache(kwargs)
    if not isinstance(cache, SWACache) or "swa_keys" in kwargs:
        return None
    return args, {**kwargs, "swa_keys": _PendingLayout(cache, module.layer_idx)}


class PatchedGenerate:
    """``model.generate`` of a patched model.  It notes what the hooks must know of the call,
    then runs the class's ``generate``: where the prompt ends (decode="full": the boundary must
    not depend on how generate feeds the prompt, e.g. ``prefill_chunk_size``; ``prompt_lengths=``
    if given, e.g. to attend fully from a question on, else its input) and how many drafted
    tokens one verification may reject (speculative decoding: the cache reserves that many
    rollback slots).  It holds the model it belongs to as plain state, so ``copy.deepcopy``
    and pickling hand a copy its own."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        model = self.model
        state = patch_state(model)
        prompt_lengths = kwargs.pop("prompt_lengths", None)
        tokens = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if prompt_lengths is not None:
            _require_decode_full(state["settings"])
            ends = prompt_ends(prompt_lengths, tokens.shape[0], tokens.shape[1])
            state["generate_prompt_end"] = {"ends": ends, "explicit": True}
        elif tokens is not None:
            state["generate_prompt_end"] = {"ends": torch.tensor([tokens.shape[1]]), "explicit": False}
        state["generate_rollback"] = _check_rollback(kwargs, draft_length(model, kwargs))
        try:
            return type(model).generate(model, *args, **kwargs)
        finally:
            state["generate_prompt_end"] = state["generate_rollback"] = None


def draft_length(model, kwargs: dict) -> int:
    """The most drafted tokens one verification step of this ``generate()`` call may reject:
    ``num_assistant_tokens`` of the draft's generation config (with ``assistant_model``, or for
    the draft itself), ``prompt_lookup_num_tokens``, else 0."""
    config = kwargs.get("generation_config") or model.generation_config
    assistant = kwargs.get("assistant_model")
    lookup = kwargs.get("prompt_lookup_num_tokens", getattr(config, "prompt_lookup_num_tokens", None))
    if getattr(config, "is_assistant", False):
        draft_config = config
    elif assistant is not None:
        draft_config = assistant.generation_config
    elif lookup:
        return int(lookup)
    else:
        return 0
    schedule = draft_config.num_assistant_tokens_schedule or "constant"
    if schedule != "constant":
        raise ValueError(f"num_assistant_tokens_schedule={schedule!r} grows the draft without bound, but a rolling "
                         "cache reserves a fixed number of rollback slots: use 'constant' (and set "
                         "num_assistant_tokens on the draft's generation config)")
    return int(draft_config.num_assistant_tokens or DEFAULT_DRAFT_TOKENS)


def _check_rollback(kwargs: dict, needed: int) -> int:
    _, cache = _find_cache(kwargs)
    if needed and isinstance(cache, SWACache) and cache.rollback < needed:
        raise ValueError(f"speculative decoding drafts up to {needed} tokens, but the cache passed to generate() "
                         f"can roll back {cache.rollback}: use swa_patch.make_cache(model, rollback={needed}) "
                         "or let generate() make its cache")
    return needed


_MODULE_HOOKS = ("_top_level_hook", "_end_of_forward", "_announce_step", "_pending_layout")


def install_generation_hooks(model) -> None:
    """Hooks that make a patched model (and its ``generate()``) use an SWACache, and the
    ``generate`` wrapper.  Every hook is a module-level function that finds its state through
    the module it runs on: nothing captures ``model``."""
    from . import compat
    model.register_forward_pre_hook(_top_level_hook, with_kwargs=True)
    model.register_forward_hook(_end_of_forward, with_kwargs=True, always_call=True)
    model.base_model.register_forward_pre_hook(_announce_step, with_kwargs=True)
    for _, module in compat.attention_modules(model):
        module.register_forward_pre_hook(_pending_layout, with_kwargs=True)
    model.generate = PatchedGenerate(model)


def remove_generation_hooks(model) -> None:
    """Remove what :func:`install_generation_hooks` added, found by identity (handles would
    point at the original's hook dicts in a deep copy)."""
    ours = {globals()[name] for name in _MODULE_HOOKS}
    for module in model.modules():
        for hooks, linked in ((module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
                              (module._forward_hooks, (module._forward_hooks_with_kwargs,
                                                       module._forward_hooks_always_called))):
            for hook_id in [i for i, fn in hooks.items() if fn in ours]:
                del hooks[hook_id]
                for extra in linked:
                    extra.pop(hook_id, None)
    model.__dict__.pop("generate", None)
