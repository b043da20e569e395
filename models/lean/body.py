"""The lean decoder body: token ids -> the residual stream after the last layer, ``[batch, seq, hidden]``.

One layer, node by node (16 for Llama and Mistral, 17 for Qwen2, 22 for Qwen3):

  RMSNormalization -> MatMul (packed q/k/v) [-> Add (Qwen2's q/k/v biases)] -> Split
  [Qwen3: Reshape -> RMSNormalization -> Reshape, for q and for k]
  -> RotaryEmbedding (q) , RotaryEmbedding (k)       3D inputs, ``num_heads`` as attributes
  -> Attention                                         3D, is_causal=1, grouped K/V, no mask
  -> MatMul (o_proj) -> Add (residual)
  -> RMSNormalization -> MatMul (packed gate/up) -> Split -> Sigmoid -> Mul (SiLU) -> Mul (up)
  -> MatMul (down) -> Add (residual)

No mask, no transposes, no repeated K/V: ``Attention`` takes ``[batch, seq, heads * head_dim]`` query
and ``[batch, seq, kv_heads * head_dim]`` key and value as the projections give them. Positions are
``0 .. seq - 1`` for every row, which is each real token's position under right padding; a padding
token's value is never read by a real one (causal), and pooling reads the real lengths
(models/lean/heads.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx

from rmserve.models.lean.builder import GraphBuilder
from rmserve.models.lean.weights import DecoderWeights, LayerWeights, Linear

INPUTS = "inputs"
# The rotary tables, one pair that every layer reads.
ROPE_COS, ROPE_SIN = "rope_cos", "rope_sin"


@dataclass(frozen=True)
class DecoderInputs:
    """Graph values every part of a decoder graph reads: the inputs and their dimensions."""

    input_ids: str
    attention_mask: str
    batch: str  # scalar int64
    seq: str  # scalar int64
    positions: str  # [batch, seq] int64: 0 .. seq - 1 on every row


def decoder_inputs(g: GraphBuilder, input_ids: str, attention_mask: str) -> DecoderInputs:
    with g.scope(INPUTS):
        shape = g.one("Shape", [input_ids])
        batch = g.one("Gather", [shape, g.ints("axis0", 0)])
        seq = g.one("Gather", [shape, g.ints("axis1", 1)])
        steps = g.one("Range", [g.ints("zero", 0), seq, g.ints("one", 1)])
        positions = g.one("Expand", [steps, shape])
    return DecoderInputs(input_ids, attention_mask, batch, seq, positions)


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


def _attention(g: GraphBuilder, x: str, w: DecoderWeights, layer: LayerWeights, inputs: DecoderInputs) -> str:
    qkv = linear(g, x, layer.qkv, "qkv")
    sizes = [w.heads * w.head_dim, w.kv_heads * w.head_dim, w.kv_heads * w.head_dim]
    q, k, v = g.op("Split", [qkv, g.ints("qkv_sizes", sizes)], outputs=3, axis=-1)
    if layer.q_norm is not None and layer.k_norm is not None:
        q = _head_norm(g, q, g.weight("q_norm", layer.q_norm), w, w.heads)
        k = _head_norm(g, k, g.weight("k_norm", layer.k_norm), w, w.kv_heads)
    q = g.one("RotaryEmbedding", [q, ROPE_COS, ROPE_SIN, inputs.positions], num_heads=w.heads)
    k = g.one("RotaryEmbedding", [k, ROPE_COS, ROPE_SIN, inputs.positions], num_heads=w.kv_heads)
    # softmax_precision is left unset: ONNX Runtime's CUDA kernel refuses the attribute.
    out = g.one(
        "Attention", [q, k, v], is_causal=1, q_num_heads=w.heads, kv_num_heads=w.kv_heads, scale=w.scale
    )
    return linear(g, out, layer.o_proj, "o_proj")


def _mlp(g: GraphBuilder, x: str, layer: LayerWeights) -> str:
    gate_up = linear(g, x, layer.gate_up, "gate_up")
    inner = layer.down.weight.shape[0]
    gate, up = g.op("Split", [gate_up, g.ints("gate_up_sizes", [inner, inner])], outputs=2, axis=-1)
    silu = g.one("Mul", [gate, g.one("Sigmoid", [gate])])
    return linear(g, g.one("Mul", [silu, up]), layer.down, "down")


def decoder_body(g: GraphBuilder, w: DecoderWeights, inputs: DecoderInputs) -> str:
    """The residual stream after the last layer (before the final norm: each head applies it)."""
    g.weight("rope_cos", w.cos, name=ROPE_COS)
    g.weight("rope_sin", w.sin, name=ROPE_SIN)
    with g.scope("embed"):
        hidden = g.one("Gather", [g.weight("tokens", w.embed), inputs.input_ids])
    for i, layer in enumerate(w.layers):
        with g.scope(f"layer{i}"):
            x = rms_norm(g, hidden, g.weight("input_norm", layer.input_norm), w.eps)
            hidden = g.one("Add", [hidden, _attention(g, x, w, layer, inputs)])
            x = rms_norm(g, hidden, g.weight("post_norm", layer.post_norm), w.eps)
            hidden = g.one("Add", [hidden, _mlp(g, x, layer)])
    return hidden


def layer_node_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes per scope of a lean graph: ``layer0``, ``layer1``, ..., ``inputs``, ``embed``, ``head``."""
    return dict(Counter(node.name.split("/", 1)[0] for node in model.graph.node))
