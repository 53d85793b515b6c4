"""Checkpoints: save a patched model (or its LoRA adapter) and load it back patched.

A patched model's text config carries the settings as a namespaced block
(``config.swa_patch``, with our version), so ``model.save_pretrained`` already writes them
into ``config.json``.  :func:`save_pretrained` adds what a plain ``save_pretrained`` cannot:

- for families with a native sliding window (Mistral, Qwen2, Gemma 2/3, ...) it writes the
  native fields (``sliding_window``, ``layer_types``, ...) so that plain transformers, without
  this package, gives the same logits; only where it then does exactly (no sinks, dilation,
  per-layer sizes or decode="full", no Gemma 3 layer retyped: its type picks its RoPE base);
  otherwise config.json keeps the model's own fields;
  the in-memory model is not changed, and the original values are kept beside the block
  (``swa_patch_native``) so :func:`from_pretrained` rebuilds exactly the model that was saved;
- a model loaded from a GGUF file (dequantised weights, but marked "quantized with gguf")
  is saved as a plain checkpoint;
- a ``peft`` model saves its adapter plus ``swa_patch.json`` (the block, and how to load
  the base), which :func:`from_pretrained` reads.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os

from . import compat
from .config import SWAConfig
from .patch import CONFIG_KEY, patch_model, patch_settings

logger = logging.getLogger("swa_patch")

NATIVE_KEY = "swa_patch_native"        # original values of the native fields we overwrote
ABSENT = "swa_patch:absent"            # ... or this, for a field the original config did not have
ADAPTER_FILE = "swa_patch.json"        # the block beside a peft adapter
_DELETE = object()                     # _temporarily: attribute absent


def native_window_fields(model) -> dict:
    """The native config fields that make plain transformers, loading the checkpoint unpatched,
    give exactly this model's logits (the transformers row of ``export_for_serving``), or ``{}``
    when the family has no native window or no native field expresses the patch (sinks,
    dilation, per-layer sizes, decode="full", a retyped Gemma 3 layer, ...): config.json then
    keeps the model's own fields and only :func:`from_pretrained` restores the patch."""
    from .export import RULES, serving_fields

    config = compat.text_config(model)
    rule = RULES.get(("transformers", getattr(config, "model_type", None)))
    if patch_settings(model) is None or rule is None or rule.kind == "ignored":
        return {}
    try:
        return serving_fields(model, "transformers")
    except ValueError as e:
        logger.warning("swa_patch: no native %s config fields express this patch, so config.json keeps the "
                       "model's own window fields (reload with swa_patch.from_pretrained): %s",
                       config.model_type, str(e).split(": it cannot express ", 1)[-1])
        return {}


@contextlib.contextmanager
def _temporarily(obj, values: dict):
    """Set attributes on ``obj`` inside the block (a missing value: attribute deleted)."""
    old = {k: getattr(obj, k, _DELETE) for k in values}
    try:
        _assign(obj, values)
        yield
    finally:
        _assign(obj, old)


def _assign(obj, values: dict) -> None:
    for k, v in values.items():
        if v is not _DELETE:
            setattr(obj, k, v)
        elif hasattr(obj, k):
            delattr(obj, k)


def _is_gguf(model) -> bool:
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    return quantizer is not None and getattr(method, "value", method) == "gguf"


def save_pretrained(model, save_directory, base_load_kwargs: dict | None = None, native_fields: dict | None = None,
                    **kwargs) -> None:
    """Save a (patched) model, a ``peft`` model's adapter, or a GGUF-loaded model.

    ``base_load_kwargs`` (adapters only): keyword arguments needed to load the base again,
    e.g. ``{"gguf_file": "model.gguf"}``.  ``native_fields``: the standard config fields to
    write instead of :func:`native_window_fields` (what ``export_for_serving`` computes per
    engine).  ``kwargs`` go to ``save_pretrained`` (``is_main_process``, ``safe_serialization``,
    ...).  Reload with :func:`swa_patch.from_pretrained` (patched) or plain transformers / peft
    (unpatched)."""
    save_directory = os.fspath(save_directory)
    if _is_peft(model):
        _save_adapter(model, save_directory, base_load_kwargs or {}, **kwargs)
        return
    if base_load_kwargs:
        raise TypeError("save_pretrained: base_load_kwargs applies to peft models only")
    if native_fields is not None and patch_settings(model) is None:
        raise ValueError("save_pretrained: native_fields needs a patched model")
    config = compat.text_config(model)
    fields = dict(native_window_fields(model) if native_fields is None else native_fields)
    if fields:
        fields[NATIVE_KEY] = {k: getattr(config, k, ABSENT) for k in fields}
    gguf = _is_gguf(model)
    if gguf:   # weights are dequantised: save them as a plain checkpoint
        logger.info("swa_patch: saving a GGUF-loaded model as a plain %s checkpoint", model.dtype)
    with _temporarily(config, fields), \
            _temporarily(model.config, {"quantization_config": _DELETE} if gguf else {}), \
            _temporarily(model, {"hf_quantizer": None} if gguf else {}):
        model.save_pretrained(save_directory, **kwargs)


def from_pretrained(path, **kwargs):
    """Load a checkpoint written from a patched model and patch it again.

    ``path``: a folder with ``config.json`` carrying the ``swa_patch`` block, or a peft
    adapter folder (``adapter_config.json``) saved by :func:`save_pretrained`; then the base
    named there is loaded, patched with the saved settings, and the adapter attached.
    ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``, ...);
    ``is_trainable=True`` makes the adapter trainable."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"from_pretrained(path={path!r}): not a folder; give a checkpoint folder "
                         "written by swa_patch.save_pretrained or model.save_pretrained")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return _load_adapter(path, **kwargs)
    is_trainable = kwargs.pop("is_trainable", None)
    if is_trainable is not None:
        raise TypeError("from_pretrained: is_trainable applies to adapter folders only; "
                        f"{path} holds a full checkpoint")
    config_kwargs = {k: kwargs[k] for k in ("trust_remote_code", "revision", "gguf_file") if k in kwargs}
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    text = config.get_text_config(decoder=True)
    block = getattr(text, CONFIG_KEY, None)
    if block is None:
        raise ValueError(f"{path}/config.json has no {CONFIG_KEY!r} block: it was not saved from a "
                         "patched model. Load it with transformers and call swa_patch.patch_model")
    settings = SWAConfig.from_dict(block)
    native = getattr(text, NATIVE_KEY, None) or {}
    for k in (CONFIG_KEY, NATIVE_KEY):
        if hasattr(text, k):
            delattr(text, k)
    if text is config and any(v == ABSENT for v in native.values()):
        # a field the model did not have may have changed the config class (transformers loads a
        # Mistral config with layer_types as Ministral): rebuild the config from the saved type
        with open(os.path.join(path, "config.json")) as f:
            model_type = json.load(f)["model_type"]
        data = {k: v for k, v in config.to_dict().items() if native.get(k) != ABSENT and k != "model_type"}
        config = text = AutoConfig.for_model(model_type, **data)
    for k, v in native.items():
        _assign(text, {k: _DELETE if v == ABSENT else v})    # the model as it was before saving
    model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    return patch_model(model, settings=settings)


# ---- peft adapters --------------------------------------------------------------------
def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _save_adapter(model, save_directory: str, base_load_kwargs: dict, **kwargs) -> None:
    base = model.get_base_model()
    settings = patch_settings(base)
    if settings is None:
        raise ValueError("save_pretrained: the peft model's base is not patched; patch the base with "
                         "swa_patch.patch_model before attaching adapters")
    model.save_pretrained(save_directory, **kwargs)
    if not kwargs.get("is_main_process", True):
        return
    info = {CONFIG_KEY: settings.to_dict(),
            "base_model_name_or_path": base.config.name_or_path,
            "base_load_kwargs": base_load_kwargs}
    with open(os.path.join(save_directory, ADAPTER_FILE), "w") as f:
        json.dump(info, f, indent=2)


def _load_adapter(path: str, is_trainable: bool = False, base_model=None, **kwargs):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    info_file = os.path.join(path, ADAPTER_FILE)
    if not os.path.isfile(info_file):
        raise ValueError(f"{path} holds a peft adapter but no {ADAPTER_FILE}: it was not saved with "
                         "swa_patch.save_pretrained from a patched model")
    with open(info_file) as f:
        info = json.load(f)
    settings = SWAConfig.from_dict(info[CONFIG_KEY])
    if base_model is None:
        base_path = info.get("base_model_name_or_path") or PeftConfig.from_pretrained(path).base_model_name_or_path
        load_kwargs = {**info.get("base_load_kwargs", {}), **kwargs}
        base_model = AutoModelForCausalLM.from_pretrained(base_path, **load_kwargs)
    block = getattr(compat.text_config(base_model), CONFIG_KEY, None)
    if block is not None and patch_settings(base_model) is None:
        delattr(compat.text_config(base_model), CONFIG_KEY)   # a base saved patched: re-patch below
    patch_model(base_model, settings=settings)
    return PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable)
