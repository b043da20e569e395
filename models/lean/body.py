"""The lean decoder body: token ids -> the residual stream after the last layer, ``[batch, seq, hidden]``.

One layer, node by node (16 for Llama and Mistral, 17 for Qwen2, 22 for Qwen3, 17 for Gemma-2, 23 for
Gemma-3):

  RMSNormalization -> MatMul (packed q/k/v) [-> Add (Qwen2's q/k/v biases)] -> Split
  [Qwen3: Reshape -> RMSNormalization -> Reshape, for q and for k]
  -> RotaryEmbedding (q) , RotaryEmbedding (k)       3D inputs, ``num_heads`` as attributes
  -> Attention                                         3D, is_causal=1, grouped K/V, no mask
  -> MatMul (o_proj) -> Add (residual)
  -> RMSNormalization -> MatMul (packed gate/up) -> Split -> Sigmoid -> Mul (SiLU) -> Mul (up)
  -> MatMul (down) -> Add (residual)

Gemma-2's layer (models/lean/layout.py ``Layout``) is the same pieces with its options: an
RMSNormalization on attention's output and on the MLP's output before each residual Add, ``Gelu``
(tanh) in place of SiLU, ``softcap`` on Attention, and on its sliding-window layers an ``attn_mask``
(a position attends only to the last ``window`` positions), made once from the positions and read by
every such layer. Its embeddings are scaled by sqrt(hidden), in the graph's float type as Gemma-2
rounds it. Gemma-3's layer is Gemma-2's with Qwen3's per-head q and k norms (``1 + weight``), and its
sliding layers' RotaryEmbedding nodes read a second pair of tables (``rope_local_cos``/``_sin``).

No mask, no transposes, no repeated K/V: ``Attention`` takes ``[batch, seq, heads * head_dim]`` query
and ``[batch, seq, kv_heads * head_dim]`` key and value as the projections give them. Positions are
``0 .. seq - 1`` for every row, which is each real token's position under right padding; a padding
token's value is never read by a real one (causal), and pooling reads the real lengths
(models/lean/heads.py).

The past variant (``decoder_inputs(..., past_layers=n)``, the prefix-reuse graph) continues rows
whose first tokens were computed before: each layer's key and value are the past's (``past_key.i``,
``past_value.i``, ``[batch, past, kv_heads * head_dim]``, after rotary) followed by the new tokens',
and are emitted as ``present_key.i`` / ``present_value.i``. ``Attention``'s ``is_causal`` aligns its
mask to the upper left, which is wrong for queries after a past, so this variant passes an explicit
boolean mask instead: key ``j`` is seen by new token ``i`` when it is real (``past_mask``, then
``attention_mask``) and ``j <= past + i``. Each row's past is left-aligned and may be shorter than the
batch's (``past_mask`` marks it); its new tokens start at position ``sum(past_mask)``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto

from rmserve.models.lean.builder import GraphBuilder
from rmserve.models.lean.weights import DecoderWeights, LayerWeights, Linear

INPUTS = "inputs"
# The rotary tables, one pair that every layer reads (Gemma-3: its global layers), and Gemma-3's
# sliding layers' own pair.
ROPE_COS, ROPE_SIN = "rope_cos", "rope_sin"
LOCAL_COS, LOCAL_SIN = "rope_local_cos", "rope_local_sin"


PAST_MASK = "past_mask"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key.{layer}", f"past_value.{layer}"


def present_names(layer: int) -> tuple[str, str]:
    return f"present_key.{layer}", f"present_value.{layer}"


@dataclass(frozen=True)
class DecoderInputs:
    """Graph values every part of a decoder graph reads: the inputs and their dimensions."""

    input_ids: str
    attention_mask: str  # [batch, seq]: the new tokens' (right padding)
    batch: str  # scalar int64
    seq: str  # scalar int64
    positions: str  # [batch, seq] int64: 0 .. seq - 1 on every row, after the row's past if any
    # The past variant only: [batch, 1, seq, past + seq] bool, which keys each new token sees.
    past_attention: str | None = None


def decoder_inputs(
    g: GraphBuilder, input_ids: str, attention_mask: str, *, past: bool = False
) -> DecoderInputs:
    """The graph's common values; ``past``: the rows continue a past (``past_mask`` and each layer's
    ``past_key.i`` / ``past_value.i`` are graph inputs), masked explicitly (see the module docstring)."""
    with g.scope(INPUTS):
        shape = g.one("Shape", [input_ids])
        batch = g.one("Gather", [shape, g.ints("axis0", 0)])
        seq = g.one("Gather", [shape, g.ints("axis1", 1)])
        steps = g.one("Range", [g.ints("zero", 0), seq, g.ints("one", 1)])
        positions = g.one("Expand", [steps, shape])
        if not past:
            return DecoderInputs(input_ids, attention_mask, batch, seq, positions)
        lengths = g.one("ReduceSum", [PAST_MASK, g.ints("axis1s", [1])], keepdims=1)  # [batch, 1]
        positions = g.one("Add", [positions, lengths])
        width = g.one("Gather", [g.one("Shape", [PAST_MASK]), g.ints("axis1", 1)])  # the padded past
        keys = g.one("Range", [g.ints("zero", 0), g.one("Add", [width, seq]), g.ints("one", 1)])
        last_seen = g.one("Unsqueeze", [g.one("Add", [steps, width]), g.ints("col", [1])])  # [seq, 1]
        causal = g.one("LessOrEqual", [keys, last_seen])  # [seq, past + seq]
        real = g.one("Cast", [g.one("Concat", [PAST_MASK, attention_mask], axis=1)], to=TensorProto.BOOL)
        real = g.one("Unsqueeze", [real, g.ints("rows_heads", [1, 2])])  # [batch, 1, 1, past + seq]
        seen = g.one("And", [real, causal])
    return DecoderInputs(input_ids, attention_mask, batch, seq, positions, seen)


def linear(g: GraphBuilder, x: str, layer: Linear, label: str) -> str:
    y = g.one("MatMul", [x, g.weight(label, layer.weight)])
    return y if layer.bias is None else g.one("Add", [y, g.weight(label + "_bias", layer.bias)])


def rms_norm(g: GraphBuilder, x: str, weight: str, eps: float) -> str:
    return g.one("RMSNormalization", [x, weight], axis=-1, epsilon=eps)


def _head_norm(g: GraphBuilder, x: str, weight: str, w: DecoderWeights, heads: int) -> str:
    """RMSNorm over each head of a ``[batch, seq, heads * head_dim]`` value (Qwen3's q and k)."""
    split = g.one("Reshape", [x, g.ints("heads_shape", [0, 0, heads, w.head_dim])])
    normed = rms_norm(g, split, weight, w.eps)
    return g.one("Reshape", [normed, g.ints("flat_shape", [0, 0, heads * w.head_dim])])


def window_masks_needed(w: DecoderWeights) -> bool:
    """Whether some layer's window is shorter than ``max_length`` (the length of the rotary tables)."""
    return any(win is not None and win < int(w.cos.shape[0]) for win in w.layout.windows)


def window_masks(g: GraphBuilder, w: DecoderWeights, inputs: DecoderInputs) -> dict[int, str]:
    """window -> a boolean ``[seq, seq]`` mask, true where key ``j`` is within ``window`` of query ``i``
    (``i - j < window``; causality is Attention's own), for each window shorter than ``max_length``."""
    max_length = int(w.cos.shape[0])
    windows = sorted({win for win in w.layout.windows if win is not None and win < max_length})
    masks: dict[int, str] = {}
    with g.scope(INPUTS):
        for window in windows:
            steps = g.one("Range", [g.ints("zero", 0), inputs.seq, g.ints("one", 1)])
            rows = g.one("Unsqueeze", [steps, g.ints("axis1", [1])])
            gap = g.one("Sub", [rows, steps])
            masks[window] = g.one("Less", [gap, g.ints("window", window)])
    return masks


def _attention(
    g: GraphBuilder,
    x: str,
    w: DecoderWeights,
    layer: LayerWeights,
    inputs: DecoderInputs,
    masks: dict[int, str],
    index: int,
) -> str:
    qkv = linear(g, x, layer.qkv, "qkv")
    sizes = [w.heads * w.head_dim, w.kv_heads * w.head_dim, w.kv_heads * w.head_dim]
    q, k, v = g.op("Split", [qkv, g.ints("qkv_sizes", sizes)], outputs=3, axis=-1)
    if layer.q_norm is not None and layer.k_norm is not None:
        q = _head_norm(g, q, g.weight("q_norm", layer.q_norm), w, w.heads)
        k = _head_norm(g, k, g.weight("k_norm", layer.k_norm), w, w.kv_heads)
    cos, sin = (LOCAL_COS, LOCAL_SIN) if layer.local_rope else (ROPE_COS, ROPE_SIN)
    q = g.one("RotaryEmbedding", [q, cos, sin, inputs.positions], num_heads=w.heads)
    k = g.one("RotaryEmbedding", [k, cos, sin, inputs.positions], num_heads=w.kv_heads)
    mask = [masks[layer.window]] if layer.window in masks else []
    softcap = {"softcap": w.layout.attn_softcap} if w.layout.attn_softcap else {}
    heads = {"q_num_heads": w.heads, "kv_num_heads": w.kv_heads, "scale": w.scale, **softcap}
    if inputs.past_attention is None:
        # softmax_precision is left unset: ONNX Runtime's CUDA kernel refuses the attribute.
        out = g.one("Attention", [q, k, v, *mask], is_causal=1, **heads)
    else:
        if mask:
            raise ValueError("a sliding-window layer shorter than max_length has no prefix-reuse variant")
        (past_k, past_v), (present_k, present_v) = past_names(index), present_names(index)
        k, v = g.one("Concat", [past_k, k], axis=1), g.one("Concat", [past_v, v], axis=1)
        g.rename(k, present_k)
        g.rename(v, present_v)
        out = g.one("Attention", [q, present_k, present_v, inputs.past_attention], **heads)
    return linear(g, out, layer.o_proj, "o_proj")


def _mlp(g: GraphBuilder, x: str, layer: LayerWeights, activation: str) -> str:
    gate_up = linear(g, x, layer.gate_up, "gate_up")
    inner = layer.down.weight.shape[0]
    gate, up = g.op("Split", [gate_up, g.ints("gate_up_sizes", [inner, inner])], outputs=2, axis=-1)
    if activation == "gelu_tanh":
        act = g.one("Gelu", [gate], approximate="tanh")
    else:
        act = g.one("Mul", [gate, g.one("Sigmoid", [gate])])
    return linear(g, g.one("Mul", [act, up]), layer.down, "down")


def _normed(g: GraphBuilder, x: str, weight: torch.Tensor | None, label: str, eps: float) -> str:
    return x if weight is None else rms_norm(g, x, g.weight(label, weight), eps)


def decoder_body(g: GraphBuilder, w: DecoderWeights, inputs: DecoderInputs) -> str:
    """The residual stream after the last layer (before the final norm: each head applies it).

    Layers are read from ``w``'s source one at a time and written before the next is read."""
    g.weight("rope_cos", w.cos, name=ROPE_COS)
    g.weight("rope_sin", w.sin, name=ROPE_SIN)
    if w.local_cos is not None and w.local_sin is not None:
        g.weight("rope_local_cos", w.local_cos, name=LOCAL_COS)
        g.weight("rope_local_sin", w.local_sin, name=LOCAL_SIN)
    masks = window_masks(g, w, inputs)
    with g.scope("embed"):
        hidden = g.one("Gather", [g.weight("tokens", w.embed()), inputs.input_ids])
        if w.layout.embed_scale is not None:
            scale = np.array(w.layout.embed_scale, dtype=np.float32)
            hidden = g.one("Mul", [hidden, g.weight("embed_scale", scale)])
    for i in range(w.n_layers):
        layer = w.layer(i, g.torch_type)
        with g.scope(f"layer{i}"):
            x = rms_norm(g, hidden, g.weight("input_norm", layer.input_norm), w.eps)
            attended = _attention(g, x, w, layer, inputs, masks, i)
            hidden = g.one("Add", [hidden, _normed(g, attended, layer.attn_out_norm, "attn_out_norm", w.eps)])
            x = rms_norm(g, hidden, g.weight("mlp_norm", layer.mlp_norm), w.eps)
            mlp = _mlp(g, x, layer, w.layout.activation)
            hidden = g.one("Add", [hidden, _normed(g, mlp, layer.mlp_out_norm, "mlp_out_norm", w.eps)])
        del layer
    return hidden


def layer_node_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes per scope of a lean graph: ``layer0``, ``layer1``, ..., ``inputs``, ``embed``, ``head``."""
    return dict(Counter(node.name.split("/", 1)[0] for node in model.graph.node))
