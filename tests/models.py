"""Tiny random models of every supported family, and the dense reference.

The reference runs the *unpatched* model with transformers' own eager attention and, in every
attention layer, an explicit additive mask built by :func:`swa_patch.masks.reference_mask`
from that layer's spec.  It shares nothing with swa_patch but the mask predicate.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from swa_patch.masks import reference_mask

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
def reference_attention(model, specs, n: int, attention_mask=None, full_from=None):
    """Inside the block the unpatched ``model`` runs eager attention with, in layer i, the
    explicit mask of ``specs[i]`` over ``n`` tokens (``full_from``: the prompt boundary of
    decode_full layers, see ``reference_mask``)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    dtype = next(model.parameters()).dtype
    hooks = []
    for module in attention_layers(model):
        mask = per_head(reference_mask(specs[module.layer_idx], n, attention_mask, full_from=full_from))
        additive = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        hooks.append(module.register_forward_pre_hook(
            lambda mod, args, kwargs, m=additive: (args, {**kwargs, "attention_mask": m}), with_kwargs=True))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
        model.set_attn_implementation(previous)
