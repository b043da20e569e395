"""fp16 graphs for large models, with a residual-stream overflow guard, and their measurement.

``convert_model_fp16`` turns an fp32 ONNX graph into float16 with ONNX Runtime's converter;
inputs and the ``scores`` output keep their types. It works on graphs over protobuf's 2 GB
limit (shape inference by path, weights in ``model.onnx.data``), which a 1.5B+ parameter fp32
export always is; loadtests/gpu_check.py uses it for its 0.5B and 1.5B bundles.
``rmserve export --precision fp16`` has its own mixed-precision rewrite in models/export.py
(residual stream in fp16, mask constants clamped); the two are to be merged (docs/gpu.md).

Overflow guard (float16 saturates at 65504; Gemma-style residual streams and attention masks get
there): these stay in float32:

* normalization and softmax, whatever their form (LayerNormalization, or RMSNorm decomposed into
  Pow/ReduceMean/Sqrt/Reciprocal as torch.onnx writes it), plus exp/log/reductions;
* every ``Add`` whose result feeds a normalization or a softmax: in a transformer that is each
  residual add (the residual stream itself stays float32 from layer to layer), each norm's
  epsilon add and the attention mask add (a float32 mask minimum added in float16 is -inf, and a
  fully masked padding row would turn NaN).

Matrix products, the MLP and rotary embeddings run in float16 (they carry the FLOPs). Constants
are clipped into float16's range by the converter, so an fp32 ``finfo.min`` mask becomes -65504.
``measure_fp16`` compares an engine's scores with fp32 PyTorch scores on padded batches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from models.heads import ScoreModel
from models.parity import PADDING_SIDES, ParityReport, chunks, pad_rows, scaled_diff
from service.bundle import MODEL_FILE
from service.engines.base import TokenBatch
from service.engines.gate import MIN_AGREEMENT, MIN_SPEARMAN, pairwise_agreement, spearman
from service.formatting import Encoded

DATA_FILE = MODEL_FILE + ".data"
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
    }
)
# Ops that a value feeding a guarded op passes through a guarded op passes through unchanged in type.
_TRANSPARENT = frozenset({"Cast", "Identity"})
FP16_BATCH_SIZES = (1, 7, 32)


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
            if (
                node.op_type in _TRANSPARENT
                and depth < 3
                and any(feeds_guarded(o, depth + 1) for o in node.output)
            ):
                return True
        return False

    return [
        n.name for n in model.graph.node if n.op_type == "Add" and any(feeds_guarded(o) for o in n.output)
    ]


def _name_nodes(model: onnx.ModelProto) -> None:
    """The converter blocks nodes by name; give unnamed nodes one."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"rmserve_node_{i}"


def convert_model_fp16(source: Path, dest: Path, *, external_data_bytes: int) -> dict[str, Any]:
    """Write the float16 version of the ONNX model at ``source`` to ``dest``; returns what was kept fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # Types of every intermediate value tell the converter where casts go; the path form of shape
    # inference also works for models over protobuf's 2 GB limit.
    inferred = source.with_name(source.name + ".inferred")
    try:
        onnx.shape_inference.infer_shapes_path(str(source), str(inferred))
        model = onnx.load(str(inferred))  # external data too, when the fp32 model has it
    finally:
        inferred.unlink(missing_ok=True)
    _name_nodes(model)
    keep = guarded_nodes(model)
    ops = sorted(set(DEFAULT_OP_BLOCK_LIST) | FP32_OPS)
    fp16 = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=ops, node_block_list=keep, disable_shape_infer=True
    )
    size = sum(int(np.prod(t.dims)) * 2 for t in fp16.graph.initializer)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if size > external_data_bytes:
        onnx.save_model(
            fp16,
            str(dest),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,
            size_threshold=1024,
        )
    else:
        onnx.save_model(fp16, str(dest))
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        if node.op_type in FP32_OPS:
            counts[node.op_type] += 1
    return {
        "fp32_ops": dict(sorted(counts.items())),
        "fp32_residual_and_mask_adds": len(keep),
        "rule": "norms, softmax, exp/log/reductions and every Add feeding them stay float32; "
        "inputs and scores keep their types",
    }


def torch_scores_on(model: ScoreModel, batch: TokenBatch) -> np.ndarray:
    """The fp32 PyTorch reference on exactly the engine's arrays, on the model's own device."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        types = (
            torch.from_numpy(batch.token_type_ids).to(device) if batch.token_type_ids is not None else None
        )
        out = model(
            torch.from_numpy(batch.input_ids).to(device),
            torch.from_numpy(batch.attention_mask).to(device),
            types,
        )
    return out.detach().to(torch.float32).cpu().numpy().reshape(-1)


def measure_fp16(
    bundle: Any,
    engine: Any,
    encoded: Sequence[Encoded],
    reference: np.ndarray,
    *,
    text_source: str,
    batch_sizes: Sequence[int] = FP16_BATCH_SIZES,
) -> ParityReport:
    """Score ``encoded`` items through ``engine`` and compare with ``reference`` (fp32 scores, one per item).

    Records max |fp16 - fp32| (absolute and scaled as in parity.py), the ranking agreement of the
    fp16 scores with fp32 (pairwise and Spearman, over all items) and the batch drift (an item
    alone vs inside padded batches, both padding sides for decoders). Problems: non-finite
    scores, pairwise agreement under the quality gate's minimum, Spearman under its minimum.
    """
    pad_id = bundle.manifest.format.pad_token_id
    sides = PADDING_SIDES if bundle.manifest.kind == "decoder" else ("right",)
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
            scores = np.concatenate(
                [engine.infer(pad_rows(rows, pad_id, side)) for rows in chunks(encoded, size)]
            )
            if not np.isfinite(scores).all():
                report.problems.append(f"non-finite fp16 scores ({side} padding, batch size {size})")
                scores = np.nan_to_num(scores)
            served.append(scores)
            report.max_abs_diff = max(report.max_abs_diff, float(np.abs(scores - reference).max()))
            report.max_rel_diff = max(report.max_rel_diff, float(scaled_diff(scores, reference).max()))
    alone = served[0]
    report.batch_invariance_max = max(float(scaled_diff(s, alone).max()) for s in served)
    report.left_padding_invariant = bundle.manifest.kind == "decoder"
    report.score_range = [float(reference.min()), float(reference.max())]
    agreement, rho = pairwise_agreement(alone, reference), spearman(alone, reference)
    report.extra |= {
        "precision": "fp16",
        "ranking_agreement": round(agreement, 6),
        "spearman": round(rho, 6),
        "reference": "fp32 PyTorch",
        "engine": engine.info.provider,
        "rule": "max |fp16 - fp32| as measured; ranking agreement >= the quality gate's minimum",
    }
    if agreement < MIN_AGREEMENT:
        report.problems.append(
            f"fp16 ranks pairs differently from fp32: agreement {agreement:.4f} < {MIN_AGREEMENT}"
        )
    if rho < MIN_SPEARMAN:
        report.problems.append(f"fp16 Spearman vs fp32 {rho:.4f} < {MIN_SPEARMAN}")
    return report


def reference_scores(
    model: ScoreModel, encoded: Sequence[Encoded], pad_id: int, batch: int = 32
) -> np.ndarray:
    """fp32 PyTorch scores of ``encoded``, one per item (right padding leaves a score unchanged)."""
    return np.concatenate(
        [torch_scores_on(model, pad_rows(rows, pad_id, "right")) for rows in chunks(encoded, batch)]
    )
