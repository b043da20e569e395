"""The lean decoder graph: rmserve's own ONNX graph of a Llama-layout reward model, for right padding.

Written from the checkpoint's weights node by node (no tracing), in standard ONNX opset 23 ops that
ONNX Runtime (CPU and CUDA) and OpenVINO run: ``RMSNormalization``, ``RotaryEmbedding`` and
``Attention`` with no mask, causal, grouped K/V and 3D inputs, so ONNX Runtime's CUDA provider can
take flash attention (docs/gpu.md). The graph is right only for right-padded batches; the manifest
says so (``padding: right``) and the engine refuses anything else (rmserve.engines.base).

Pieces: ``eligibility`` (which checkpoints), ``weights`` (the checkpoint as packed arrays),
``builder`` (named nodes, one float type), ``body`` (ids -> residual stream), ``heads`` (residual
stream -> an outcome model's score per row, or a process model's step value per token). The same
builder writes the graph in float32, float16 or bfloat16.

Streaming: given the checkpoint's tensors (``source``: models/lean/source.py), the body and the score
head read their weights from it by name, layer by layer, in the checkpoint's dtype; when the weights
go to ``model.onnx.data`` they are written there as each is added (``WeightFile``), so the export holds
one layer's weights and never the graph's initializers.

The prefix-reuse graph (``model_past.onnx``) is built after the scoring graph with the same weights under
the same names, and refers to the scoring graph's bytes in ``model.onnx.data`` (``SharedWeights``): a
bundle carries, and an export writes, each weight once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from rmserve.bundle import MODEL_FILE, PAST_FILE
from rmserve.models.graph import save_onnx
from rmserve.models.heads import ScoreModel
from rmserve.models.lean.body import (
    PAST_MASK,
    decoder_body,
    decoder_inputs,
    layer_node_counts,
    past_names,
    present_names,
    window_masks_needed,
)
from rmserve.models.lean.builder import TORCH_TYPES, GraphBuilder, SharedWeights, WeightFile
from rmserve.models.lean.eligibility import LAYER_NODE_BUDGET, why_not_lean
from rmserve.models.lean.heads import head_output
from rmserve.models.lean.source import TensorSource, body_prefix, within
from rmserve.models.lean.weights import (
    DecoderWeights,
    GatingHeadWeights,
    ScoreHeadWeights,
    StepHeadWeights,
    decoder_weights,
    head_weights,
)
from rmserve.models.process_heads import StepModel

LEAN_OPSET = 23
# A lean graph whose weights (read from the checkpoint) are larger than this streams them into
# model.onnx.data even below the external-data threshold: built in memory, onnx would hold them three
# times over (initializers, make_graph's copy, make_model's copy).
STREAM_BYTES = 256 * 1024**2
EXPORTER = "rmserve lean graph builder (models/lean)"

__all__ = [
    "LAYER_NODE_BUDGET",
    "LEAN_OPSET",
    "LeanGraph",
    "build_lean_graph",
    "why_not_lean",
    "write_lean_graph",
]


@dataclass(frozen=True)
class LeanGraph:
    """What was written: the nodes of each layer and of the parts around the layers."""

    precision: str
    nodes: dict[str, int]
    past_graph: str | None = None  # the prefix-reuse variant's file, when written

    @property
    def nodes_per_layer(self) -> int:
        return max(n for scope, n in self.nodes.items() if scope.startswith("layer"))

    def as_manifest(self) -> dict[str, Any]:
        layers = {s: n for s, n in self.nodes.items() if s.startswith("layer")}
        outside = {s: n for s, n in self.nodes.items() if not s.startswith("layer")}
        return {
            "nodes_per_layer": self.nodes_per_layer,
            "layers": len(layers),
            "nodes_outside_layers": outside,
        }


def build_lean_graph(
    w: DecoderWeights,
    head: ScoreHeadWeights | GatingHeadWeights | StepHeadWeights,
    precision: str,
    data: WeightFile | None = None,
    *,
    past: bool = False,
    shared: SharedWeights | None = None,
) -> Any:
    """The ONNX model: ``input_ids``, ``attention_mask`` (int64 ``[batch, seq]``) -> ``scores``, float32
    ``[batch]`` for a score layer, ``[batch, sequence]`` for a step head (the new tokens' only), and a
    gating head's ``components``, ``[batch, objectives]``. With ``data``, weights are written there as
    they are added (models/lean/builder.py); with ``shared``, the weights it holds are referred to where
    they already are.

    ``past``: the prefix-reuse variant (models/lean/body.py), which also takes ``past_mask`` (int64
    ``[batch, past]``) and each layer's ``past_key.i`` / ``past_value.i``, and emits each layer's
    ``present_key.i`` / ``present_value.i`` (``[batch, past + sequence, kv_heads * head_dim]``)."""
    g = GraphBuilder(precision, data, shared)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    inputs = decoder_inputs(g, ids.name, mask.name, past=past)
    outs = []
    for value, name, dims in head_output(g, decoder_body(g, w, inputs), inputs, w, head):
        g.rename(value, name)
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    feeds = [ids, mask]
    if past:
        feeds.append(helper.make_tensor_value_info(PAST_MASK, TensorProto.INT64, ["batch", "past"]))
        width = w.kv_heads * w.head_dim
        for i in range(w.n_layers):
            for name in past_names(i):
                feeds.append(helper.make_tensor_value_info(name, g.float_type, ["batch", "past", width]))
            for name in present_names(i):
                outs.append(helper.make_tensor_value_info(name, g.float_type, ["batch", "total", width]))
    return g.model(feeds, outs, LEAN_OPSET)


def weights_size(source: TensorSource, precision: str) -> int:
    """What ``source``'s tensors take at ``precision``: about what the bundle's weights take."""
    return TORCH_TYPES[precision].itemsize * sum(math.prod(source.shape(n)) for n in source.names())


def write_lean_graph(
    model: ScoreModel | StepModel,
    max_length: int,
    directory: Path,
    *,
    precision: str,
    external_data_bytes: int,
    source: TensorSource | None = None,
    past: bool = False,
) -> LeanGraph:
    """Write ``model.onnx`` (+ ``model.onnx.data`` when large) for ``model`` (an outcome or a process
    model) at ``precision``; its weights are read from ``source`` (the checkpoint's tensors) when given,
    else from the model's own parameters. Weights read from ``source`` over ``external_data_bytes``
    or ``STREAM_BYTES`` are written to the data file as they are read. With ``past``, also the
    prefix-reuse variant as ``model_past.onnx``, except for a model with a sliding window shorter than
    ``max_length`` (whose window the variant's mask does not carry); its weights are those of
    ``model.onnx.data``, referred to there, never written twice."""
    body = within(source, body_prefix(source)) if source is not None else None
    weights = decoder_weights(model.body, max_length, body)
    head = head_weights(model, source)
    # A gating head reads the prompt's end, which a suffix after a reused prefix may not hold.
    past = past and not window_masks_needed(weights) and not isinstance(head, GatingHeadWeights)
    stream = source is not None and weights_size(source, precision) > min(external_data_bytes, STREAM_BYTES)
    proto = _write(weights, head, precision, directory / MODEL_FILE, external_data_bytes, stream)
    past_path = directory / PAST_FILE
    past_path.with_name(PAST_FILE + ".data").unlink(missing_ok=True)  # an older export's own copy
    if past:
        shared = SharedWeights.of(directory / MODEL_FILE)
        onnx.save_model(build_lean_graph(weights, head, precision, past=True, shared=shared), str(past_path))
    return LeanGraph(precision, layer_node_counts(proto), PAST_FILE if past else None)


def _write(
    w: DecoderWeights,
    head: ScoreHeadWeights | GatingHeadWeights | StepHeadWeights,
    precision: str,
    path: Path,
    external_data_bytes: int,
    stream: bool,
) -> Any:
    data_path = path.with_name(path.name + ".data")
    data_path.unlink(missing_ok=True)
    if not stream:
        proto = build_lean_graph(w, head, precision)
        save_onnx(proto, path, external_data_bytes)
        return proto
    data = WeightFile(data_path)
    try:
        proto = build_lean_graph(w, head, precision, data)
    finally:
        data.close()
    onnx.save_model(proto, str(path))  # the weights are in the data file already
    return proto
