"""fp16 bundles: the one mixed-precision converter, and how far its scores drift from fp32.

``convert_model_fp16`` rewrites an fp32 ONNX graph of any size (shape inference runs on the
file path, which works past protobuf's 2 GB limit; weights over the threshold go to
``model.onnx.data``) so that matrix products and the activations between them run in float16.
Whatever overflows or loses meaning there (float16 saturates at 65504 and holds integers
exactly only up to 2048) stays float32:

* normalization and softmax in any form (LayerNormalization, or RMSNorm as torch.onnx writes
  it: Pow/ReduceMean/Sqrt/Reciprocal), exp/log/reductions and trig (rotary phases reach
  thousands of radians): ``FP32_OPS``;
* every ``Add`` whose result feeds one of those (``guarded_nodes``): each residual add, so the
  residual stream stays float32 from layer to layer (Gemma-style streams overflow float16),
  each norm's epsilon add and the attention-mask add;
* values computed from integer inputs and constants alone (positions, rotary phases and
  cos/sin, masks): float32, and clamped to +-32768 where a float16 node reads them, as every
  float16 constant is, so a float32 ``finfo.min`` mask stays finite when added to and a fully
  masked padding row never turns NaN.

A float32 value stays float32 until a matrix product reads it, so casts sit only where the
precision changes (never fp32 -> fp16 -> fp32 between two guarded nodes). Inputs stay int64
and ``scores`` float32.

``measure_fp16`` compares an engine's scores (or a process bundle's step values) with fp32 PyTorch's
on padded batches; ``rmserve export --precision fp16`` gates on it (models/reduced.py).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rmserve.bundle import Bundle
from rmserve.engines.base import EngineInfo
from rmserve.engines.batches import Read, engine_rows
from rmserve.engines.gate import MIN_AGREEMENT, MIN_SPEARMAN, pairwise_agreement, spearman
from rmserve.formatting import Encoded
from rmserve.models.graph import save_onnx
from rmserve.models.parity import (
    BATCH_SIZES,
    ParityReport,
    invariance_sides,
    scaled_diff,
)
from rmserve.models.piecewise import how_run

FP32_OPS = frozenset(
    {
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "RMSNormalization",
        "Pow",
        "ReduceMean",
        "Sqrt",
        "Reciprocal",
        "Softmax",
        "LogSoftmax",
        "Exp",
        "Log",
        "ReduceSum",
        "ReduceMax",
        "ReduceL2",
        "Cos",
        "Sin",
        "CumSum",
        "Range",
    }
)
LINEAR_OPS = frozenset({"MatMul", "Gemm"})
# Values a guarded op reads through unchanged in type, as they are or moved: the lean graph reshapes
# the residual stream and gathers each row's last token before its final norm (models/lean/heads.py).
_TRANSPARENT = frozenset({"Cast", "Identity", "Reshape", "Gather"})
# 2**15 is still "minus infinity" after softmax, and stays finite when a second mask is added.
FP16_CLAMP = 32768.0
# fp16 must order at least this share of item pairs as fp32 PyTorch does for export to ship it
# (ties that fp16 creates flip some); the serving-time quality gate asks for MIN_AGREEMENT.
MIN_EXPORT_AGREEMENT = 0.98


class Fp16Error(ValueError):
    """The graph cannot be converted to fp16."""


def guarded_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the ``Add`` nodes that must stay float32 (see the module docstring)."""
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)

    def feeds_guarded(value: str, depth: int = 0) -> bool:
        for node in consumers.get(value, []):
            if node.op_type in FP32_OPS:
                return True
            # A Gather passes its data through, not its indices.
            moved = node.op_type != "Gather" or node.input[0] == value
            through = node.op_type in _TRANSPARENT and moved and depth < 3
            if through and any(feeds_guarded(o, depth + 1) for o in node.output):
                return True
        return False

    adds = (n for n in model.graph.node if n.op_type == "Add")
    return [n.name for n in adds if any(feeds_guarded(o) for o in n.output)]


def convert_model_fp16(source: Path, dest: Path, *, external_data_bytes: int) -> dict[str, Any]:
    """Write the mixed fp16 version of the fp32 graph at ``source`` to ``dest`` (may be ``source``).

    Returns what was kept float32 and how many nodes run at each precision.
    """
    model = _load_typed(source)
    graph = model.graph
    _hoist_constants(graph)
    for i, node in enumerate(graph.node):
        node.name = node.name or f"rmserve_node_{i}"
    keep = set(guarded_nodes(model))
    rewrite = _Rewrite(graph)
    for node in list(graph.node):
        rewrite.convert(node, keep)
    rewrite.finish()
    save_onnx(model, dest, external_data_bytes)
    fp32_ops = Counter(n.op_type for n in rewrite.nodes if n.op_type in FP32_OPS)
    return {
        "fp16_nodes": rewrite.counts[16],
        "fp32_nodes": rewrite.counts[32],
        "fp32_ops": dict(sorted(fp32_ops.items())),
        "fp32_residual_and_mask_adds": len(keep),
        "rule": "norms, softmax, exp/log/trig/reductions, every Add feeding them and values computed "
        "from integers or constants stay float32; constants clamped to +-32768; int64 inputs, float32 scores",
    }


class _Rewrite:
    """One pass over the nodes in graph order, choosing each node's precision (module docstring).

    An *activation* is a float value computed from a weight (embedding lookups and everything
    after them); other float values (from integer inputs and constants) stay float32.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        values = [*graph.input, *graph.output, *graph.value_info]
        types = {v.name: v.type.tensor_type.elem_type for v in values}
        types |= {name: t.data_type for name, t in self.inits.items()}
        self.floats = {n for n, t in types.items() if t == TensorProto.FLOAT}
        self.weights = {
            n
            for n, t in self.inits.items()
            if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2 and int(np.prod(t.dims)) >= 256
        }
        self.bits: dict[str, int] = {}  # activation -> 16 or 32
        self.copies: dict[tuple[str, int], str] = {}  # (value, bits) -> its cast or converted copy
        self.nodes: list[onnx.NodeProto] = []
        self.counts = {16: 0, 32: 0}

    def precision(self, node: onnx.NodeProto, keep: set[str]) -> tuple[int, bool]:
        """(bits the node runs at, whether its float outputs are activations)."""
        captured = _captured(node)
        floats = [i for i in [*node.input, *captured] if i in self.floats]
        acts = [i for i in floats if i in self.bits]
        if node.op_type in FP32_OPS or node.op_type == "Cast" or node.name in keep or captured:
            return 32, bool(acts)
        if any(i in self.weights for i in floats):
            return 16, True
        if not acts:
            return 32, False
        return (16 if node.op_type in LINEAR_OPS or all(self.bits[i] == 16 for i in acts) else 32), True

    def convert(self, node: onnx.NodeProto, keep: set[str]) -> None:
        bits, activation = self.precision(node, keep)
        if node.op_type != "Cast":  # a Cast reads any precision and writes its declared type
            node.input[:] = [self.read(i, bits) if i in self.floats else i for i in node.input]
        # Control flow (If/Loop) runs float32 with its branches untouched: what they read from
        # outside is handed to them in float32.
        outer = {i: self.read(i, 32) for i in _captured(node) if i in self.floats}
        for graph in _subgraphs(node):
            _rename_inputs(graph, outer)
        outputs = [o for o in node.output if o in self.floats]
        if activation:
            self.bits |= {o: bits for o in outputs}
        if outputs or any(i in self.floats for i in node.input):
            self.counts[bits] += 1
        self.nodes.append(node)

    def read(self, name: str, bits: int) -> str:
        """``name`` as a node running at ``bits`` reads it; each cast or copy is made once."""
        if self.bits.get(name, 32) == bits:
            return name
        key = (name, bits)
        if key not in self.copies:
            copy = self.copies[key] = f"{name}__fp{bits}"
            if name in self.inits:
                arr = numpy_helper.to_array(self.inits[name]).astype(np.float32)
                half = np.clip(arr, -FP16_CLAMP, FP16_CLAMP).astype(np.float16)
                self.graph.initializer.append(numpy_helper.from_array(half, copy))
            elif name not in self.bits:  # from integers/constants: may hold float32's extremes
                low, high = self._clamp_bounds()
                self.nodes.append(helper.make_node("Clip", [name, low, high], [copy + "_clamped"]))
                cast = helper.make_node("Cast", [copy + "_clamped"], [copy], to=TensorProto.FLOAT16)
                self.nodes.append(cast)
            else:
                to = TensorProto.FLOAT16 if bits == 16 else TensorProto.FLOAT
                self.nodes.append(helper.make_node("Cast", [name], [copy], to=to))
        return self.copies[key]

    def _clamp_bounds(self) -> tuple[str, str]:
        names = ("rmserve_fp16_clamp_low", "rmserve_fp16_clamp_high")
        if names[0] not in self.inits:
            for name, value in zip(names, (-FP16_CLAMP, FP16_CLAMP), strict=True):
                self.inits[name] = numpy_helper.from_array(np.array(value, dtype=np.float32), name)
                self.graph.initializer.append(self.inits[name])
        return names

    def finish(self) -> None:
        """Cast an fp16 output back to float32, drop unused initializers, retype value_info."""
        graph = self.graph
        out = graph.output[0].name
        if self.bits.get(out) == 16:
            for node in self.nodes:
                node.output[:] = [o + "__fp16" if o == out else o for o in node.output]
            self.nodes.append(helper.make_node("Cast", [out + "__fp16"], [out], to=TensorProto.FLOAT))
        graph.ClearField("node")
        graph.node.extend(self.nodes)
        used = {i for n in graph.node for i in n.input}
        kept = [t for t in graph.initializer if t.name in used]
        graph.ClearField("initializer")
        graph.initializer.extend(kept)
        for value in graph.value_info:
            if self.bits.get(value.name) == 16:
                value.type.tensor_type.elem_type = TensorProto.FLOAT16


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def _captured(node: onnx.NodeProto) -> set[str]:
    """Names that ``node``'s branches or loop body read from the enclosing graph."""
    used: set[str] = set()
    for graph in _subgraphs(node):
        defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
        defined |= {o for n in graph.node for o in n.output}
        for inner in graph.node:
            used |= ({*inner.input} | _captured(inner)) - defined
    return used - {""}


def _rename_inputs(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [names.get(i, i) for i in node.input]
        for inner in _subgraphs(node):
            _rename_inputs(inner, names)


def _load_typed(source: Path) -> onnx.ModelProto:
    """The model with every value's type, its external data loaded (works for graphs over 2 GB)."""
    inferred = source.with_name(source.name + ".inferred")
    try:
        onnx.shape_inference.infer_shapes_path(str(source), str(inferred))
        return onnx.load(str(inferred))
    finally:
        inferred.unlink(missing_ok=True)


def _hoist_constants(graph: onnx.GraphProto) -> None:
    """Float Constant nodes become initializers, so they are converted (and clamped) like weights."""
    kept = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and value.data_type == TensorProto.FLOAT:
            value.name = node.output[0]
            graph.initializer.append(value)
        else:
            kept.append(node)
    graph.ClearField("node")
    graph.node.extend(kept)


# -- measurement --------------------------------------------------------------------------------


def measure_fp16(
    bundle: Bundle,
    engine: Any,
    encoded: Sequence[Encoded],
    reference: np.ndarray,
    *,
    text_source: str,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    min_agreement: float = MIN_AGREEMENT,
    min_spearman: float | None = MIN_SPEARMAN,
    precision: str = "fp16",
    read: Read | None = None,
) -> ParityReport:
    """Score ``encoded`` items through ``engine`` and compare with ``reference`` (fp32 scores, one per
    item; or with ``read``, a process bundle's step values, all steps of all items in turn).

    Records max |fp16 - fp32| (absolute and scaled as in parity.py), the ranking agreement of the
    fp16 scores with fp32 (pairwise and Spearman, over all items) and the batch drift (an item
    alone vs inside padded batches, on the padding sides the bundle is held to: models/parity.py).
    ``precision`` names the reduced precision (fp16, or bf16 on the same rule). Problems: non-finite
    scores, pairwise agreement under ``min_agreement``, Spearman under ``min_spearman`` (if set).
    """
    pad_id = bundle.manifest.format.pad_token_id
    sides = invariance_sides(bundle.manifest)
    report = ParityReport(
        text_source=text_source,
        n_texts=len(encoded),
        batch_sizes=list(batch_sizes),
        padding_sides=list(sides),
        tolerance=float("nan"),
        invariance_tolerance=float("nan"),
        truncated_texts=sum(e.truncated for e in encoded),
    )
    served: list[np.ndarray] = []
    for side in sides:
        for size in sorted(batch_sizes):
            scores = engine_rows(encoded, engine, pad_id, batch_items=size, side=side, sort=False, read=read)
            if not np.isfinite(scores).all():
                report.problems.append(f"non-finite {precision} scores ({side} padding, batch size {size})")
                scores = np.nan_to_num(scores)
            served.append(scores)
            report.max_abs_diff = max(report.max_abs_diff, float(np.abs(scores - reference).max()))
            report.max_rel_diff = max(report.max_rel_diff, float(scaled_diff(scores, reference).max()))
    alone = served[0]
    report.batch_invariance_max = max(float(scaled_diff(s, alone).max()) for s in served)
    report.left_padding_invariant = "left" in sides
    report.score_range = [float(reference.min()), float(reference.max())]
    agreement, rho = pairwise_agreement(alone, reference), spearman(alone, reference)
    report.extra |= {
        "precision": precision,
        "ranking_agreement": round(agreement, 6),
        "spearman": round(rho, 6),
        "reference": "fp32 PyTorch",
        "engine": _engine_label(engine.info),
        "rule": f"max |{precision} - fp32| as measured; pairwise ranking agreement >= {min_agreement}",
    }
    if agreement < min_agreement:
        report.problems.append(
            f"{precision} ranks pairs differently from fp32: agreement {agreement:.4f} < {min_agreement}"
        )
    if min_spearman is not None and rho < min_spearman:
        report.problems.append(f"{precision} Spearman vs fp32 {rho:.4f} < {min_spearman}")
    return report


def _engine_label(info: EngineInfo) -> str:
    pieces = info.detail.get("pieces")
    label = f"{info.provider}/{info.precision}"
    return f"{label}, {how_run(pieces)}" if pieces else label


def manifest_record(report: ParityReport, conversion: dict[str, Any]) -> dict[str, Any]:
    """What an fp16 bundle's ``manifest.parity.fp16`` records: the measured drift, the conversion."""
    return {
        "max_abs_diff": report.max_abs_diff,
        "max_rel_diff": report.max_rel_diff,
        "batch_drift_max": report.batch_invariance_max,
        "pairwise_ranking_agreement": report.extra["ranking_agreement"],
        "spearman": report.extra["spearman"],
        "n_texts": report.n_texts,
        "reference": "fp32 PyTorch",
        "engine": report.extra["engine"],
        **conversion,
    }
