"""Tiny random models of every supported family, and the dense reference.

The reference runs the *unpatched* model with transformers' own eager attention and, in every
attention layer, an explicit additive mask built by :func:`swa_patch.masks.reference_mask`
from that layer's spec.  It shares nothing with swa_patch but the mask predicate.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from swa_patch.masks import LayerSpec, reference_mask

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            attention_dropout=0.0, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)

FAMILY_CONFIGS = {
    "llama": {},
    "mistral": dict(sliding_window=4096),
    "qwen2": dict(use_sliding_window=True, sliding_window=4096, max_window_layers=1),
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=4096, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, query_pre_attn_scalar=16),
    "gemma3_text": dict(head_dim=16, sliding_window=4096, num_hidden_layers=3,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        query_pre_attn_scalar=16),
    "phi3": dict(num_key_value_heads=4),
    "starcoder2": dict(sliding_window=4096),
    "olmo2": {},
    "granite": {},
    "gpt_oss": dict(head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=4096,
                    layer_types=["sliding_attention", "full_attention"]),
    "smollm3": {},
    "gpt_neox": dict(num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=True),
    "phi": dict(partial_rotary_factor=0.5),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=4096),
}


def tiny_model(model_type: str = "llama", dtype=torch.float32, seed: int = 0, **overrides):
    config = AutoConfig.for_model(model_type, **{**BASE, **FAMILY_CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)   # sdpa where supported
    return model.eval()


def attention_layers(model):
    return [m for m in model.modules()
            if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)]


def per_head(mask: torch.Tensor) -> torch.Tensor:
    """A reference mask as ``[B, H or 1, q, k]`` (per-head dilations give one per head)."""
    return mask[:, None] if mask.dim() == 3 else mask


@contextlib.contextmanager
def reference_attention(model, specs, n: int, attention_mask=None, full_from=None, documents=None):
    """Inside the block the unpatched ``model`` runs eager attention with, in layer i, the
    explicit mask of ``specs[i]`` over ``n`` tokens (``full_from``: the prompt boundary of
    decode_full layers; ``documents``: a document id per token of packed rows; see
    ``reference_mask``)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    dtype = next(model.parameters()).dtype
    heads = model.config.get_text_config(decoder=True).num_attention_heads
    hooks = []
    for module in attention_layers(model):
        mask = per_head(reference_mask(specs[module.layer_idx], n, attention_mask, full_from=full_from,
                                       documents=documents, heads=heads))
        additive = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        hooks.append(module.register_forward_pre_hook(
            lambda mod, args, kwargs, m=additive: (args, {**kwargs, "attention_mask": m}), with_kwargs=True))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
        model.set_attn_implementation(previous)


def wrong_specs(specs) -> dict:
    """The ways a patch could be wrong by one: every window one key shorter or longer, every
    dilation one larger, one sink more or fewer, no window at all (the unpatched model)."""
    def edit(**change):
        return [s if s.window is None else dataclasses.replace(
            s, **{k: max(1, f(s)) for k, f in change.items()}) for s in specs]
    variants = {"unpatched": [LayerSpec(None)] * len(specs),
                "W-1": edit(window=lambda s: s.window - 1), "W+1": edit(window=lambda s: s.window + 1),
                "sinks+1": [s if s.window is None else dataclasses.replace(s, sinks=s.sinks + 1) for s in specs]}
    if any(s.window is not None and s.sinks for s in specs):
        variants["sinks-1"] = [s if s.window is None else dataclasses.replace(s, sinks=max(0, s.sinks - 1))
                               for s in specs]
    if any(s.window is not None and s.dilation > 1 and s.head_dilations is None for s in specs):
        variants["dilation+1"] = edit(dilation=lambda s: s.dilation + 1 if s.head_dilations is None else s.dilation)
    if any(s.kv_windows is not None for s in specs):       # per-KV-head windows: one head off
        for name, change in (("head W-1", lambda kv, h: kv[h] - 1), ("head W+1", lambda kv, h: kv[h] + 1),
                             ("head full", lambda kv, h: None)):
            variants[name] = [_edit_first_windowed_head(s, change) for s in specs]
        variants["heads rolled"] = [s if s.kv_windows is None else dataclasses.replace(
            s, window=s.kv_windows[1:] + s.kv_windows[:1], kv_windows=None) for s in specs]
    if any(s.kv_decode_full is not None for s in specs):   # per-KV-head decode: on the wrong heads, or on none
        variants["decode heads rolled"] = [s if s.kv_decode_full is None else dataclasses.replace(
            s, kv_decode_full=s.kv_decode_full[1:] + s.kv_decode_full[:1]) for s in specs]
        variants["no head decodes"] = [dataclasses.replace(s, kv_decode_full=None) for s in specs]
        variants["every head decodes"] = [s if s.kv_decode_full is None else dataclasses.replace(
            s, kv_decode_full=None, decode_full=True) for s in specs]
    return variants


def _edit_first_windowed_head(spec, change):
    """``spec`` with its first windowed KV head's window changed (per-KV-head specs only)."""
    if spec.kv_windows is None:
        return spec
    kv = list(spec.kv_windows)
    head = next(h for h, w in enumerate(kv) if w is not None)
    kv[head] = change(kv, head)
    kv[head] = None if kv[head] is None else max(1, kv[head])
    return dataclasses.replace(spec, window=tuple(kv), kv_windows=None)


def reference_logits(model, specs, ids, attention_mask=None, full_from=None) -> torch.Tensor:
    """Logits of the unpatched ``model`` under the dense reference of ``specs``."""
    with torch.no_grad(), reference_attention(model, specs, ids.shape[1], attention_mask, full_from):
        return model(ids, attention_mask=attention_mask).logits


def assert_matches_reference_only(model, out, specs, ids, attention_mask=None, full_from=None,
                                  atol=1e-5, rtol=1e-5):
    """``out`` (a patched model's logits) equals the dense reference of ``specs`` within the
    tolerance, and the same tolerance rejects the reference of every wrong spec
    (:func:`wrong_specs`) whose mask differs on this input.  ``model`` is unpatched."""
    n = ids.shape[1]
    real = torch.ones(ids.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    ref = reference_logits(model, specs, ids, attention_mask, full_from)[real].to(out.dtype)
    torch.testing.assert_close(out[real], ref, atol=atol, rtol=rtol)
    heads = model.config.get_text_config(decoder=True).num_attention_heads
    masks = lambda ss: [reference_mask(s, n, attention_mask, full_from=full_from, heads=heads) for s in ss]
    for name, wrong in wrong_specs(specs).items():
        if all(torch.equal(a, b) for a, b in zip(masks(wrong), masks(specs))):
            continue                                    # the same mask on this input: not a wrong answer
        other = reference_logits(model, wrong, ids, attention_mask, full_from)[real].to(out.dtype)
        excess = ((out[real] - other).abs() - (atol + rtol * other.abs())).max()
        assert excess > 0, f"the tolerance atol={atol}, rtol={rtol} accepts the {name} model"
