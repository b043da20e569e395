"""Which decoders take the lean graph, and why the others keep the traced one.

The lean graph has no padding mask: each layer's ``Attention`` is causal and nothing else, which is
right for a right-padded row scored at its last real token (a real token attends only to earlier
positions, which are real). That holds for a causal decoder whose attention a row's own length
cannot change. A sliding window shorter than the bundle's ``max_length`` is a mask made from the
positions alone (models/lean/body.py), which right padding leaves right too. Gemma-2's layer (soft-capped
attention, sandwich norms, GELU-tanh, scaled embeddings) and Gemma-3's (``gemma3_text``: the same with
per-head q/k norms and a second pair of rotary tables for its sliding layers) are Llama's with options
(models/lean/layout.py). Not for: rotary embeddings that depend on the sequence length (dynamic NTK,
LongRoPE), an activation other than SiLU or GELU-tanh, attention that is not causal (a Gemma-3 config's
``use_bidirectional_attention``), or any other family whose layer is not Llama's.

Both kinds of bundle take it: an outcome model scores each row's last real token, a process model each
step token (models/lean/heads.py), and under right padding every real token sees only real tokens.
"""

from __future__ import annotations

from typing import Any

from rmserve.models.attention import NO_FUSE

# model_type -> the per-layer node budget of its fp32 lean graph (tests/test_lean_graph.py holds each
# family to it): Llama's layer, plus a bias Add for Qwen2, plus a reshape-norm-reshape for each of
# Qwen3's per-head q and k norms, plus Gemma-2's two extra norms (its GELU is one node where SiLU is two);
# Gemma-3's is Gemma-2's plus Qwen3's q and k norms.
LAYER_NODE_BUDGET = {"llama": 20, "mistral": 20, "qwen2": 20, "qwen3": 24, "gemma2": 20, "gemma3_text": 24}
# config.json's activation names -> the lean graph's.
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# Rotary embeddings whose cos/sin depend on the position alone, so they are computed once at export.
STATIC_ROPE = frozenset({"default", "linear", "llama3", "yarn"})


def sliding_window(config: Any) -> int | None:
    """The window a layer of this model attends within, if any layer has one."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if config.model_type == "mistral" or (layer_types and "sliding_attention" in layer_types):
        return int(window)
    return None  # Qwen2/Qwen3 carry a sliding_window that no layer uses unless use_sliding_window


def rope_types(config: Any) -> tuple[str, ...]:
    """The rope type of each rotary table: one, or one per layer type where ``rope_parameters`` is kept
    by layer type (Gemma-3's ``full_attention`` and ``sliding_attention``)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    tables = [p for p in params.values() if isinstance(p, dict)] or [params]
    return tuple(str(p.get("rope_type") or p.get("type") or "default") for p in tables)


def layer_windows(config: Any) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), from ``layer_types`` (Mistral: every layer)."""
    window = sliding_window(config)
    n = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * n
    return tuple(window if window is not None and t == "sliding_attention" else None for t in types)


def activation(config: Any) -> str:
    return str(getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu"))


def why_not_lean(config: Any, max_length: int) -> str | None:
    """None when a checkpoint of ``config`` exports the lean graph at ``max_length``; else why not."""
    model_type = getattr(config, "model_type", "")
    if model_type not in LAYER_NODE_BUDGET:
        return f"{model_type} has no lean graph (only {', '.join(sorted(LAYER_NODE_BUDGET))})"
    if activation(config) not in ACTIVATIONS:
        return f"its activation {activation(config)!r} is not one of {', '.join(ACTIVATIONS)}"
    for kind in rope_types(config):
        if kind not in STATIC_ROPE:
            return f"rope_type {kind!r} depends on the sequence length"
    if getattr(config, "use_bidirectional_attention", False):
        return "use_bidirectional_attention: its attention is not causal"
    partial = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    if float(partial) != 1.0:
        return f"partial_rotary_factor {partial} is not 1"
    return None


def graph_reason(
    option: str,
    family: str,
    config: Any,
    max_length: int,
    attention_reason: str | None,
) -> str | None:
    """None when the export writes the lean graph; else why it writes the traced one.

    ``option`` is ``rmserve export --graph``: auto (lean where it applies), lean (or fail), traced.
    ``attention_reason`` is why the traced graph's attention would be unfused, if it would; the lean
    graph writes its own fused Attention, so a model's reason (Gemma-2's soft-capping) does not decide,
    but the user's ``--no-fuse-attention`` does: the lean graph has no unfused form.
    """
    if family != "decoder":
        return "encoders keep the traced graph"
    if option == "traced":
        return "--graph traced"
    asked = attention_reason if attention_reason == NO_FUSE else None
    reason = why_not_lean(config, max_length) or asked
    if reason is not None and option == "lean":
        raise ValueError(f"--graph lean: {reason}")
    return reason
