"""What a family's decoder layer does beyond Llama's, read from its config, and its rotary tables.

Gemma-2 and Gemma-3 (``gemma3_text``) norms scale by ``1 + weight``; each layer has a norm after
attention and one on each side of the MLP (sandwich norms); the MLP is GELU-tanh; the embeddings are
scaled by sqrt(hidden); attention logits are soft-capped where ``attn_logit_softcapping`` is set
(Gemma-2; None in Gemma-3's configs); ``layer_types`` marks the sliding-window layers. Gemma-3 adds
an RMSNorm over each head's query and key (``q_norm``/``k_norm``, in the same ``1 + weight`` form)
and a second pair of rotary tables: its sliding layers rotate by ``rope_local_base_freq`` and its
global layers by ``rope_theta`` with ``rope_scaling`` (linear, factor 8, in the 4B and larger
configs). transformers 5.25 keeps them as ``config.rope_parameters[layer_type]`` and its
``Gemma3RotaryEmbedding`` takes the layer type (models/gemma3/modeling_gemma3.py).

The tables come from the model's own rotary module at positions ``0 .. max_length - 1``, so every rope
type it supports with static frequencies (models/lean/eligibility.py) gives PyTorch's values exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rmserve.models.lean.eligibility import ACTIVATIONS, activation, layer_windows

# model_types whose layer is Gemma's (the module docstring).
GEMMA_LAYERS = frozenset({"gemma2", "gemma3_text"})
# The model_type whose rotary module keeps one table per layer type.
TWO_ROPE_TABLES = frozenset({"gemma3_text"})
GLOBAL, LOCAL = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Layout:
    """What a family's decoder layer does beyond Llama's (the module docstring)."""

    norm_offset: float = 0.0  # Gemma: a norm scales by (1 + weight)
    sandwich_norms: bool = False  # Gemma: post-attention, pre- and post-feed-forward norms
    activation: str = "silu"  # or "gelu_tanh"
    attn_softcap: float | None = None
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden)
    windows: tuple[int | None, ...] = ()  # per layer; empty: no layer has a window
    # Gemma-3: per layer, whether it reads the sliding layers' rotary tables; empty: one pair for all.
    local_rope: tuple[bool, ...] = ()


def layout_of(config: Any) -> Layout:
    windows = layer_windows(config)
    common = {"activation": ACTIVATIONS[activation(config)], "windows": windows if any(windows) else ()}
    if config.model_type not in GEMMA_LAYERS:
        return Layout(**common)
    softcap = getattr(config, "attn_logit_softcapping", None)
    local: tuple[bool, ...] = ()
    if config.model_type in TWO_ROPE_TABLES:
        local = tuple(t == LOCAL for t in config.layer_types[: config.num_hidden_layers])
    return Layout(
        norm_offset=1.0,
        sandwich_norms=True,
        attn_softcap=float(softcap) if softcap else None,
        embed_scale=float(config.hidden_size) ** 0.5,
        local_rope=local if any(local) and not all(local) else (),
        **common,
    )


def rotary_tables(
    base: Any, max_length: int, head_dim: int, layer_type: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``[max_length, head_dim / 2]`` from the model's rotary module (rotate-half layout);
    ``layer_type``: the table of that layer type, for a module that keeps one per type (Gemma-3)."""
    positions = torch.arange(max_length).unsqueeze(0)
    probe = torch.zeros(1, dtype=torch.float32)
    by_type = () if layer_type is None else (layer_type,)
    with torch.inference_mode():
        cos, sin = base.rotary_emb(probe, positions, *by_type)
    half = head_dim // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def all_rotary_tables(
    base: Any, max_length: int, head_dim: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """The global layers' tables (every layer's, for a model with one pair) and, for Gemma-3 with
    layers of both types, the sliding layers' own."""
    config = base.config
    if config.model_type not in TWO_ROPE_TABLES:
        return rotary_tables(base, max_length, head_dim), None
    types = set(config.layer_types[: config.num_hidden_layers])
    if len(types) == 1:  # one layer type: its table is every layer's
        return rotary_tables(base, max_length, head_dim, types.pop()), None
    return (
        rotary_tables(base, max_length, head_dim, GLOBAL),
        rotary_tables(base, max_length, head_dim, LOCAL),
    )
