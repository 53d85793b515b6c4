"""How a patched model meets its caches and ``generate()``: :func:`make_cache` and the hooks
``patch_model`` installs (``unpatch_model`` removes them).

- The backbone (the base model that runs the layers, ``model.model``) settles each forward in a
  pre-hook, however it is called (``model(...)``, ``model.model(...)``, ``get_decoder()``, a value
  or reward head on the backbone):
  - the empty ``DynamicCache`` that ``generate()`` makes by itself becomes an :class:`SWACache`;
  - packed rows (``position_ids`` that restart, ``cu_seq_lens_q/k``, ``seq_idx``): the documents
    are read once (:mod:`swa_patch.packing`) and refused where a cache would mix them;
  - decode="full": the prompt boundary comes from ``prompt_lengths=`` (a forward keyword or a
    :func:`make_cache` option), from ``labels`` (where each row's, or each packed document's,
    ``-100`` prefix ends; the causal-LM wrapper's pre-hook hands its ``labels`` or ``shift_labels``
    down) or from ``generate()`` (its prompt).  A cache records it once; a training forward
    without one is refused; otherwise the input of the first forward is the prompt;
  - each forward through an SWACache is announced to it (which tokens come, which are pads; in
    position mode ``shift`` the cache assigns the position ids).
- What one forward works out travels in that forward's own keyword arguments
  (:class:`~swa_patch.attention.ForwardFacts` under ``swa_forward``) down to the attention
  function; what one ``generate()`` call works out (its prompt, the drafted tokens a
  verification may reject) lives in a :class:`contextvars.ContextVar` set for that call and
  reset after it.  No module global holds either, so forwards and ``generate()`` calls in other
  threads, on this model or another, and a ``generate()`` that re-enters itself
  (``assistant_model=model``, ``assistant_early_exit``) each see their own.
- Inside :func:`swa_patch.original_attention` the hooks stand aside.

The dependency runs one way: ``patch`` -> ``generation`` -> ``cache``.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, StaticCache

from . import compat, packing
from .attention import ForwardFacts, MaskInfo
from .cache import SWACache, _PendingLayout
from .masks import first_real_index
from .rope import model_ropes
from .state import BACKBONE_ATTR, layer_specs, patch_settings, patch_state

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
    return _new_cache(model, layer_specs(model), settings, **options)


def _new_cache(model, specs, settings, **options) -> SWACache:
    """:func:`make_cache` for the patch ``specs``/``settings`` of ``model`` (the patched model or
    its backbone: both hold its rotary embedding)."""
    positions = options.get("positions") or settings.position_mode
    if positions not in ("original", "shift"):
        raise ValueError(f"positions must be 'original' or 'shift', got {positions!r}")
    rollback = options.get("rollback") or 0
    if isinstance(rollback, bool) or not isinstance(rollback, int) or rollback < 0:
        raise ValueError(f"rollback must be an int >= 0 (tokens a crop may remove), got {rollback!r}")
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


LABELS_KEY = "swa_labels"        # the wrapper's labels, handed down to the backbone's hook
FACTS_KEY = "swa_forward"        # this forward's ForwardFacts, handed down to the attention function


@dataclass(frozen=True, eq=False)
class GenerateCall:
    """What one ``generate()`` call on a patched model tells its forwards: where its prompt ends
    (``[1]`` or ``[B]``; decode="full") and how many drafted tokens one verification may reject
    (the rolling cache it makes reserves that many rollback slots)."""
    state: dict
    prompt_ends: torch.Tensor | None
    rollback: int


# The generate() calls in progress in this thread / asyncio task, innermost last.
_GENERATE_CALLS: contextvars.ContextVar[tuple[GenerateCall, ...]] = contextvars.ContextVar(
    "swa_patch_generate_calls", default=())


def _generate_call(state) -> GenerateCall | None:
    """The innermost ``generate()`` call in progress on the model that owns ``state``."""
    return next((call for call in reversed(_GENERATE_CALLS.get()) if call.state is state), None)


def _find_cache(kwargs: dict):
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def _tokens(args, kwargs) -> torch.Tensor:
    tokens = kwargs.get("input_ids", args[0] if args else None)
    return kwargs["inputs_embeds"] if tokens is None else tokens


def _hand_labels_down(model, args, kwargs):
    """Pre-hook of the causal-LM wrapper (decode="full" models): its ``labels`` (or TRL's and
    transformers' ``shift_labels``, given as labels) reach the backbone's hook, which takes the
    prompt boundary from them.  The wrapper passes its keyword arguments on to the backbone."""
    state = patch_state(model)
    if state.get("suspended") or not state["settings"].decodes_full:
        return None
    labels, shifted = kwargs.get("labels"), kwargs.get("shift_labels")
    if labels is None and shifted is not None:          # shift_labels[t] is predicted by query t
        labels = F.pad(shifted[..., :-1], (1, 0), value=-100)
    return None if labels is None else (args, {**kwargs, LABELS_KEY: labels})


def _begin_forward(backbone, args, kwargs):
    """Pre-hook of the backbone: swaps generate()'s own empty DynamicCache for an SWACache (a
    DynamicCache seen again maps to the same SWACache), settles the packed documents and the
    prompt boundary of decode="full" layers (refusing what cannot be honoured) and announces the
    step to an SWACache.  Everything it reads hangs off the module it runs on or comes with the
    call, so a copy, another thread or a nested call sees its own."""
    state = getattr(backbone, BACKBONE_ATTR)
    prompt_lengths = kwargs.pop("prompt_lengths", None)
    labels = kwargs.pop(LABELS_KEY, None)
    name, cache = _find_cache(kwargs)
    if state.get("suspended"):
        if isinstance(cache, SWACache):
            raise ValueError("an SWACache cannot serve the original attention: inside "
                             "swa_patch.original_attention(model) use the model's own caches")
        return args, kwargs
    _check_attention(backbone, state)
    if isinstance(cache, StaticCache):
        raise ValueError("a pre-allocated cache (StaticCache, cache_implementation='static') is not "
                         "supported by a patched model; use swa_patch.make_cache(model) or the default "
                         "cache of generate()")
    if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
        swa = getattr(cache, "_swa_patch_cache", None)
        if swa is None and cache.get_seq_length() == 0:
            call = _generate_call(state)
            swa = cache._swa_patch_cache = _new_cache(backbone, state["specs"], state["settings"],
                                                      rollback=call.rollback if call else 0)
        if swa is not None:
            kwargs = {**kwargs, name: swa}
            cache = swa
    documents = _documents(state, args, kwargs, cache, prompt_lengths)
    full_from = None
    if state["settings"].decodes_full:
        full_from = (_document_boundaries(labels, documents, kwargs.get("attention_mask")) if documents
                     else _boundary(state, args, kwargs, cache, prompt_lengths, labels))
        if full_from is None and cache is None and backbone.training and torch.is_grad_enabled():
            _refuse_training_without_boundary(state)
    elif prompt_lengths is not None:
        _require_decode_full(state["settings"])
    if isinstance(cache, SWACache):
        kwargs = _announce_step(args, kwargs, cache)
    if documents is not None or (full_from is not None and cache is None):
        kwargs = {**kwargs, FACTS_KEY: ForwardFacts(full_from, documents)}
    return args, kwargs


def _end_forward(backbone, args, kwargs, output):
    """Post-hook of the backbone: the forward's facts reached its attention layers (a family that
    dropped the keyword would have run without its documents or boundary)."""
    facts = kwargs.get(FACTS_KEY)
    if facts is not None and facts.reached == 0:
        raise RuntimeError(f"{type(backbone).__name__} did not pass swa_patch's per-forward keyword "
                           f"{FACTS_KEY!r} to its attention layers, so packed documents or the decode='full' "
                           "boundary were not applied; this architecture is not supported for that use")


def _check_attention(backbone, state) -> None:
    """A model copied or unpickled inside ``original_attention`` comes with the original attention
    implementation in its config and ``resume`` in its state: switch it back on first use.  Any
    other implementation on a patched model was set behind the patch's back: refuse it."""
    if backbone.config._attn_implementation == compat.ATTN_NAME:
        return
    if state.pop("resume", False):
        compat.set_attn_implementation(backbone, compat.ATTN_NAME)
        return
    raise ValueError(f"this patched model's attention implementation was changed to "
                     f"{backbone.config._attn_implementation!r}; use swa_patch.original_attention(model) for the "
                     "original attention, or swa_patch.unpatch_model(model) before set_attn_implementation")


def _refuse_training_without_boundary(state) -> None:
    raise ValueError(
        f"decode={state['settings'].decode!r}: this training forward has no prompt boundary (no labels with a -100 "
        "prefix over the prompt, no prompt_lengths), so its answers would be trained through the window. Pass "
        "labels, or prompt_lengths= (tokens of prompt per row, left pads included). Under transformers' Trainer, "
        "which pops labels before the forward when label_smoothing_factor > 0 or a compute_loss_func is set, add "
        "a 'prompt_lengths' column to the dataset and set TrainingArguments(remove_unused_columns=False) so "
        "that it reaches the forward")


def _documents(state, args, kwargs, cache, prompt_lengths) -> packing.Starts | None:
    """The packed documents of this forward (:mod:`swa_patch.packing`), refused before any layer
    runs where they cannot be honoured exactly."""
    tokens = _tokens(args, kwargs)
    mask = kwargs.get("attention_mask")
    mask = mask.padding if isinstance(mask, MaskInfo) else mask
    if tokens is None or tokens.dim() < 2 or tokens.shape[1] == 1:     # one token per row: one document
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


def _document_boundaries(labels, documents: packing.Starts, attention_mask) -> torch.Tensor | None:
    """decode="full" on packed rows: ``[B, n]``, per token the stream index of its document's first
    fully attending query, where that document's ``-100`` prefix of ``labels`` ends (as for the
    document alone); None without labels (each document's last token, the layouts' default).
    Computed for all documents at once (segment minima), with one host sync for the refusal."""
    if labels is None:
        return None
    b, n = labels.shape
    pos = torch.arange(n, device=labels.device).expand(b, n)
    first = torch.zeros(b, n, dtype=torch.bool, device=labels.device)
    for row, starts in enumerate(documents):
        first[row, list(starts)] = True
    doc = first.flatten().long().cumsum(0).view(b, n) - 1               # a global id per document
    start_of = torch.where(first, pos, 0).cummax(1).values
    last = torch.cat([first[:, 1:], torch.ones(b, 1, dtype=torch.bool, device=labels.device)], 1)
    end_of = torch.where(last, pos + 1, n).flip(1).cummin(1).values.flip(1)
    answer = (labels != -100) & (pos != start_of)                        # labels[start] is never predicted
    per_doc = lambda x, how: torch.full((int(doc.max()) + 1,), n if how == "amin" else 0, device=labels.device,  # noqa: E731
                                        dtype=torch.long).scatter_reduce(0, doc.flatten(), x.flatten().long(), how)
    prompt_end = per_doc(torch.where(answer, pos, end_of), "amin")[doc]  # the first answer label, or the end
    real = (torch.ones(b, n, dtype=torch.bool, device=labels.device) if not isinstance(attention_mask, torch.Tensor)
            else attention_mask.bool())
    first_real = per_doc(torch.where(real, pos, n), "amin")[doc]
    dense = (prompt_end - 1 <= first_real) & (per_doc(real, "sum")[doc] > 1) & first
    if bool(dense.any()):
        where = [tuple(x) for x in dense.nonzero().tolist()]
        raise ValueError(f"decode='full': the labels of packed document(s) at (row, start) {where[:4]} have no -100 "
                         "prefix over a prompt, so every query there would attend every earlier key (dense "
                         "attention, no window). Put -100 over each document's prompt in labels")
    return prompt_end - 1


def _boundary(state, args, kwargs, cache, prompt_lengths, labels) -> torch.Tensor | None:
    """``[B]`` (or ``[1]``) stream index of each row's first fully attending query, recorded
    in an SWACache; None when this forward does not say (the layouts then take the default).
    A boundary taken from ``labels`` must leave each row at least one windowed real token: one at
    the row's first real token would train the row densely."""
    if cache is not None and not isinstance(cache, SWACache):
        raise ValueError(f"decode={state['settings'].decode!r} needs a cache that keeps every key of its "
                         f"layers and records the prompt boundary; got {type(cache).__name__}. Use "
                         "swa_patch.make_cache(model) or the default cache of generate()")
    tokens = _tokens(args, kwargs)
    batch, n = tokens.shape[:2]
    start = 0 if cache is None else cache.get_seq_length()
    call = _generate_call(state) if isinstance(cache, SWACache) and cache.full_from is None else None
    if prompt_lengths is not None:
        ends = prompt_ends(prompt_lengths, batch, None if cache is not None else n)
    elif labels is not None:
        ends = start + label_prompt_ends(labels)
        if start == 0:
            refuse_dense_rows(ends - 1, kwargs.get("attention_mask"), n, "labels (no -100 prefix over the prompt)")
    elif call is not None and call.prompt_ends is not None:
        ends = rows_of(call.prompt_ends, batch)        # a one-token prompt runs: its answer attends fully
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


def refuse_dense_rows(full_from: torch.Tensor, attention_mask, n: int, source: str) -> None:
    """decode="full": raise when a row's boundary falls at (or before) its first real token, so
    every query of the row would attend every earlier key: dense attention, not the window (a row
    with a single real token has nothing to window)."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        real = attention_mask.bool()
    else:
        real = torch.ones(max(full_from.numel(), 1), n, dtype=torch.bool)
    dense = (full_from.cpu() <= first_real_index(real).cpu()) & (real.sum(1).cpu() > 1)
    if bool(dense.any()):
        rows = dense.nonzero().flatten().tolist()
        raise ValueError(f"decode='full': the prompt boundary from {source} falls at the first real token of "
                         f"row(s) {rows}, so every query there would attend every earlier key (dense attention, "
                         "no window). Give each row's prompt: a -100 prefix over it in labels, or "
                         "prompt_lengths= (tokens of prompt per row, left pads included; passing prompt_lengths "
                         "explicitly also runs a one-token prompt on purpose)")


def _announce_step(args, kwargs, cache: SWACache) -> dict:
    """Tell an SWACache which tokens come (and which are pads); in shift mode replace
    ``position_ids`` with the cache's frame positions."""
    tokens = _tokens(args, kwargs)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, MaskInfo):       # generate() builds masks ahead for compileable caches
        mask = mask.padding
        kwargs = {**kwargs, "attention_mask": mask}
    if isinstance(mask, torch.Tensor) and mask.dim() != 2:
        raise ValueError("SWACache needs a 2-D attention_mask [batch, tokens] (or none)")
    positions = cache.begin(tokens.shape[1], mask, tokens.shape[0], tokens.device)
    if mask is not None and cache.step_is_unpadded():
        # the cache hands every layer its own layout: the mask builder needs no padding mask (it would
        # cost a host sync to learn there is none).  Kept where new tokens are pads (models warn without).
        kwargs = {**kwargs, "attention_mask": None}
    return kwargs if positions is None else {**kwargs, "position_ids": positions}


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
    rollback slots).  That note is a :class:`GenerateCall` in a context variable, set for this
    call and reset after it: a nested call (self-speculation) restores the outer one's, and other
    threads never see it.  It holds the model it belongs to as plain state, so ``copy.deepcopy``
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
        ends = None
        if prompt_lengths is not None:
            _require_decode_full(state["settings"])
            ends = prompt_ends(prompt_lengths, tokens.shape[0], tokens.shape[1])
        elif tokens is not None:
            ends = torch.tensor([tokens.shape[1]])
        call = GenerateCall(state, ends, _check_rollback(kwargs, draft_length(model, kwargs)))
        token = _GENERATE_CALLS.set(_GENERATE_CALLS.get() + (call,))
        try:
            return type(model).generate(model, *args, **kwargs)
        finally:
            _GENERATE_CALLS.reset(token)


def draft_length(model, kwargs: dict) -> int:
    """The most drafted tokens one verification step of this ``generate()`` call may reject:
    ``num_assistant_tokens`` of the draft's generation config (with ``assistant_model``, for the
    draft itself, or the model's own with ``assistant_early_exit``), ``prompt_lookup_num_tokens``,
    else 0."""
    config = kwargs.get("generation_config") or model.generation_config
    assistant = kwargs.get("assistant_model")
    lookup = kwargs.get("prompt_lookup_num_tokens", getattr(config, "prompt_lookup_num_tokens", None))
    early_exit = kwargs.get("assistant_early_exit", getattr(config, "assistant_early_exit", None))
    if getattr(config, "is_assistant", False):
        draft_config = config
    elif assistant is not None:
        draft_config = assistant.generation_config
    elif early_exit:                        # the model's first layers draft, with its own settings
        draft_config = model.generation_config
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


_MODULE_HOOKS = ("_hand_labels_down", "_begin_forward", "_end_forward", "_pending_layout")


def install_generation_hooks(model) -> None:
    """Hooks that make a patched model (and its ``generate()``) use an SWACache, and the
    ``generate`` wrapper.  Every hook is a module-level function that finds its state through
    the module it runs on: nothing captures ``model``.  The backbone holds the model's state
    under :data:`~swa_patch.state.BACKBONE_ATTR` (one object, shared, so copies keep sharing it)."""
    backbone = model.base_model
    setattr(backbone, BACKBONE_ATTR, patch_state(model))
    model.register_forward_pre_hook(_hand_labels_down, with_kwargs=True)
    backbone.register_forward_pre_hook(_begin_forward, with_kwargs=True)
    backbone.register_forward_hook(_end_forward, with_kwargs=True)
    for _, module in compat.attention_modules(model):
        if not compat.cache_update_gets_kwargs(module):
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
        module.__dict__.pop(BACKBONE_ATTR, None)
    model.__dict__.pop("generate", None)
