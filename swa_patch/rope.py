"""Re-rotation of cached RoPE keys for position mode ``shift``.

RoPE turns a vector ``x`` at position ``p`` into ``R(p) x`` (a rotation of each pair of
rotary channels by ``p * inv_freq``, times the model's ``attention_scaling``).  Rotations
compose, ``R(a) R(b) = R(a + b)``, so a cached key can be moved from position ``p`` to
``p + delta`` without its pre-RoPE value: :func:`rotate` applies ``R(delta)``.  The scaling
factor (YaRN, llama3) is left untouched, which is what a re-encoding at ``p + delta`` gives.

Only the first ``rotary_dim`` channels rotate (partial rotary: GPT-NeoX, Phi); the pairing is
transformers' ``rotate_half`` layout (channel ``c`` pairs with ``c + rotary_dim / 2``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope_static")
REFUSED_ROPE_TYPES = ("dynamic", "longrope")   # inv_freq depends on the sequence length


@dataclass(frozen=True)
class LayerRope:
    """RoPE of one attention layer: ``inv_freq`` ``[rotary_dim / 2]`` (float32)."""
    inv_freq: torch.Tensor

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.shape[0]


def rotate(x: torch.Tensor, delta, rope: LayerRope) -> torch.Tensor:
    """Rotate rotary-embedded vectors by ``delta`` positions.

    x ``[..., n, D]``; delta an int or a tensor broadcastable to ``[..., n]`` (per vector).
    Returns a new tensor ``[..., n, D]``.
    """
    if not torch.is_tensor(delta):
        delta = torch.tensor(float(delta), device=x.device)
    angle = delta.to(x.device, torch.float32)[..., None] * rope.inv_freq.to(x.device)   # [..., n, r/2]
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    r = rope.rotary_dim
    half = r // 2
    x1, x2, rest = x[..., :half], x[..., half:r], x[..., r:]
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    return torch.cat([out1, out2, rest], dim=-1)


def rotation_tables(delta: torch.Tensor, rope: LayerRope, dim: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` ``[..., n, dim]`` of a rotation by ``delta`` (``[..., n]``), laid out over
    all ``dim`` channels (1 and 0 past ``rotary_dim``), for :func:`rotate_with`.  The angles are
    computed exactly as :func:`rotate` computes them.  Worth it when one rotation applies to many
    tensors: a cache rotates every layer's sinks by the same offsets in a decode step."""
    angle = delta.to(torch.float32)[..., None] * rope.inv_freq.to(delta.device)
    cos, sin = torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)
    rest = dim - rope.rotary_dim
    if not rest:
        return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    return (torch.cat([cos, cos, cos.new_ones(*cos.shape[:-1], rest)], -1),
            torch.cat([sin, sin, sin.new_zeros(*sin.shape[:-1], rest)], -1))


def rotate_half(x: torch.Tensor, rope: LayerRope) -> torch.Tensor:
    """``[-x2, x1, 0]``: what :func:`rotate_with` multiplies by ``sin`` (worth keeping for vectors
    rotated again and again, such as a cache's sinks)."""
    r, half = rope.rotary_dim, rope.rotary_dim // 2
    parts = [-x[..., half:r], x[..., :half]]
    if r < x.shape[-1]:
        parts.append(torch.zeros_like(x[..., r:]))
    return torch.cat(parts, dim=-1)


def rotate_with(x: torch.Tensor, x_half: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`rotate` from precomputed parts: ``x * cos + rotate_half(x) * sin``, bit for bit the
    products and sums :func:`rotate` forms on the rotary channels (no fused multiply-add: addcmul
    would round once and differ by an ulp), written into ``out`` when given (a cache's own slots:
    no allocation).  Three kernel calls instead of about fifteen."""
    out = torch.mul(x, cos, out=out)
    return out.add_(x_half * sin)


def model_ropes(model, n_layers: int) -> list[LayerRope]:
    """One :class:`LayerRope` per layer, read from the model's rotary-embedding module.

    Raises ``ValueError`` for models without RoPE (absolute position embeddings) and for
    RoPE variants whose frequencies change with the sequence length (dynamic NTK, longrope).
    """
    config = model.config.get_text_config(decoder=True)
    emb = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if emb is None:
        raise ValueError(f"positions='shift' needs rotary position embeddings; {config.model_type} "
                         "has none (absolute positions): use positions='original'")
    layer_types = getattr(config, "layer_types", None) or [None] * n_layers
    ropes = []
    for i in range(n_layers):
        prefix = "" if layer_types[i] is None or not hasattr(emb, f"{layer_types[i]}_inv_freq") \
            else f"{layer_types[i]}_"
        rope_type = emb.rope_type if isinstance(emb.rope_type, str) else emb.rope_type[layer_types[i]]
        if rope_type in REFUSED_ROPE_TYPES:
            raise ValueError(f"positions='shift' cannot re-rotate keys exactly with rope_type="
                             f"{rope_type!r} (its frequencies change with the sequence length): "
                             "use positions='original'")
        ropes.append(LayerRope(getattr(emb, f"{prefix}inv_freq").detach().float().clone()))
    return ropes
