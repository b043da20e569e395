"""Reduced-precision bundles (fp16, bf16), made from the fp32 bundle once it passed parity.

fp16, by measured headroom (models/headroom.py, on the calibration set):

* a lean graph whose residual stream fits float16 with the margin is written again by the lean
  builder in float16: every node of every layer in fp16, as PyTorch runs the model in fp16;
* otherwise (the stream does not fit, or the graph is traced) the fp32 graph goes through the
  guarded converter (models/fp16.py), which keeps the residual stream and norms in fp32.

bf16 (lean graphs; for ONNX Runtime's CUDA provider): written by the lean builder in bfloat16, with no
guard (bfloat16 has float32's range). ONNX Runtime's CPU provider has no bfloat16 kernels, so here the
bf16 file is run by OpenVINO's CPU plugin (in bf16 where the CPU has bf16 units, else with its
bf16 weights computed in f32); ONNX Runtime on CUDA runs it in loadtests/gpu_check.py.

A streamed lean export (weights over the external-data threshold, read from the checkpoint's
safetensors) writes no fp32 graph first: the headroom is measured on the PyTorch model, the graph is
written straight in the reduced precision from the checkpoint's tensors, and the measurement below is
its parity record (there is no fp32 ONNX Runtime run to compare, and its memory is not spent). Only
fp16 over the headroom limit still writes the fp32 graph, for the guarded converter.

Either way the reduced graph is measured against the fp32 PyTorch model on padded batches and
gated on ranking agreement (models/fp16.py's ``measure_fp16``); the manifest's ``parity.<precision>``
records the measurement, the headroom and the decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rmserve.bundle import MODEL_FILE, Bundle, unsealed_bundle
from rmserve.engines.base import EngineError, available_cpus
from rmserve.models import fp16
from rmserve.models.graph import ExportError
from rmserve.models.headroom import FP16_MAX, MARGIN, Headroom, measure_headroom
from rmserve.models.lean import write_lean_graph
from rmserve.models.lean.source import TensorSource
from rmserve.models.parity import Pair, ParityReport, TorchModel, reference_items, reference_scores
from rmserve.models.piecewise import PiecewiseEngine, openvino_loader, ort_loader

REDUCED = ("fp16", "bf16")
# Ops the bf16 lean graph computes bfloat16 with, each registered for BFloat16 by ONNX Runtime's CUDA
# provider in its source (microsoft/onnxruntime, read 2026-12): MatMul-13, Add-14, Mul-14, Sigmoid-13
# in onnxruntime/core/providers/cuda/cuda_execution_provider.cc; RMSNormalization-23 in
# .../cuda/nn/rms_norm.cc; RotaryEmbedding-23 in .../cuda/llm/rotary_embedding.cc; Attention-23 in
# .../cuda/llm/attention.cc (bf16 tested since microsoft/onnxruntime#27892); Relu-14 (the
# Qwen2.5-Math-PRM step head) in .../cuda/activation/activations.cc; Gelu-20 (Gemma-2's MLP, tanh
# approximation) in .../cuda/tensor/gelu.cc. Unsqueeze and Less build a sliding window's mask from int64
# positions. Gather, Split, Reshape and Cast
# move data of any type (their registrations were not re-read). The rest see int64 shapes, positions
# and lengths only, or (a step head's rule: Sub, Sigmoid) float32 after the head's Cast.
# loadtests/gpu_check.py counts what ONNX Runtime leaves off the GPU.
BF16_CUDA_OPS = frozenset(
    {"MatMul", "Add", "Mul", "Sigmoid", "Relu", "RMSNormalization", "RotaryEmbedding", "Attention"}
    | {"Gather", "Split", "Reshape", "Cast"}
    | {"Gelu"}
    | {"Shape", "Range", "Expand", "ReduceSum", "Sub", "Max", "Unsqueeze", "Less"}
)


def reduce_precision(
    staging: Path,
    model: TorchModel,
    fields: dict[str, Any],
    report: ParityReport | None,
    texts: Sequence[Pair],
    source: str,
    calibration: Sequence[Pair],
    *,
    precision: str,
    external_data_bytes: int,
    weights: TensorSource | None = None,
    piecewise: bool = False,
) -> ParityReport:
    """Rewrite the staged fp32 graph at ``precision``, or (``report`` None: a streamed export with no fp32
    graph) write it; record and gate its drift (module docstring). ``weights``: the checkpoint's tensors.
    ``piecewise`` (a streamed export): the graph is run a piece at a time (models/piecewise.py)."""
    fields["precision"] = precision
    lean = fields.get("graph") == "lean"
    if precision == "bf16" and not lean:
        why = fields.get("graph_reason")
        raise ExportError(f"bf16 bundles are written by the lean graph builder; this one is traced: {why}")
    bundle = unsealed_bundle(staging, **fields)
    room = measure_headroom(model, *_calibration(bundle, calibration))
    max_length = bundle.manifest.format.max_length
    try:
        if precision == "bf16" or (lean and room.fits_fp16):
            graph = write_lean_graph(
                model,
                max_length,
                staging,
                precision=precision,
                external_data_bytes=external_data_bytes,
                source=weights,
                past=fields.get("past_graph") is not None,
            )
            conversion = {
                "rule": f"the lean graph built in {precision}: every node of every layer {precision}"
            }
            conversion |= graph.as_manifest()
            guard = False
            if precision == "bf16":
                _check_bf16_ops(staging / MODEL_FILE)
        else:
            path = staging / MODEL_FILE
            if not path.is_file():  # streamed: the guarded converter starts from the fp32 graph
                write_lean_graph(
                    model,
                    max_length,
                    staging,
                    precision="fp32",
                    external_data_bytes=external_data_bytes,
                    source=weights,
                )
            conversion = fp16.convert_model_fp16(path, path, external_data_bytes=external_data_bytes)
            # The guarded fp16 graph has no prefix-reuse twin: such a bundle scores every item whole.
            _drop_past_graph(staging, fields)
            guard = True
        drift = _measure(unsealed_bundle(staging, **fields), model, texts, source, precision, piecewise)
    except fp16.Fp16Error as exc:
        raise ExportError(str(exc)) from exc
    except EngineError as exc:
        raise ExportError(f"the {precision} graph could not be run here, so it is unchecked: {exc}") from exc
    if drift.problems:
        raise ExportError(f"{precision} check failed, nothing was written: " + "; ".join(drift.problems))
    if precision == "bf16":  # what the check above could not cover, said where it is read
        conversion["not_verified_here"] = "ONNX Runtime's CUDA provider: loadtests/gpu_check.py runs it"
    record = fp16.manifest_record(drift, conversion) | {
        "headroom": room.as_manifest(),
        "residual_guard": guard,
        "residual_guard_reason": _guard_reason(precision, lean, room, guard),
    }
    if report is None:
        report = drift
        report.extra = {"fp32_graph": f"not written: weights streamed straight to {precision}"}
    report.extra[precision] = record
    return report


def _check_bf16_ops(path: Path) -> None:
    import onnx

    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    if ops - BF16_CUDA_OPS:
        unknown = ", ".join(sorted(ops - BF16_CUDA_OPS))
        raise ExportError(f"no bf16 CUDA kernel is known for {unknown}; export fp16 instead")


def _guard_reason(precision: str, lean: bool, room: Headroom, guard: bool) -> str:
    if precision == "bf16":
        return "none needed: bfloat16 has float32's range"
    measured = f"residual stream max |x| {room.residual_max_abs:.4g}"
    if not guard:
        return f"{measured} <= {room.limit:g} (float16's {FP16_MAX:g} / {MARGIN:g}): every layer runs in fp16"
    if not lean:
        return f"{measured}; a traced graph keeps the guard"
    return (
        f"{measured} > {room.limit:g} (float16's {FP16_MAX:g} / {MARGIN:g}): the residual stream stays fp32"
    )


def _calibration(bundle: Bundle, pairs: Sequence[Pair]) -> tuple[Any, int, Any]:
    """The calibration pairs as the bundle's kind encodes them, its pad id, and how a row is read."""
    encoded, read = reference_items(bundle, pairs)
    return encoded, bundle.manifest.format.pad_token_id, read


def _measure(
    bundle: Bundle,
    model: TorchModel,
    pairs: Sequence[Pair],
    source: str,
    precision: str,
    piecewise: bool,
) -> ParityReport:
    """The reduced graph as an engine here runs it, against the fp32 ``model`` on ``pairs`` (a
    process bundle's step values at its step tokens); ``piecewise``: a piece at a time."""
    encoded, read = reference_items(bundle, pairs)
    reference = reference_scores(model, encoded, bundle.manifest.format.pad_token_id, read=read)
    engine = _engine(bundle, precision, piecewise)
    try:
        return fp16.measure_fp16(
            bundle,
            engine,
            encoded,
            reference,
            text_source=source,
            min_agreement=fp16.MIN_EXPORT_AGREEMENT,
            min_spearman=None,
            precision=precision,
            read=read,
        )
    finally:
        engine.close()


def _engine(bundle: Bundle, precision: str, piecewise: bool) -> Any:
    """fp16 on ONNX Runtime's CPU provider, bf16 on OpenVINO's CPU plugin; ``piecewise`` (a streamed
    export): a piece of the graph at a time (models/piecewise.py), since a whole-graph session holds
    float32 copies of an fp16 graph's weights."""
    threads = available_cpus()
    if precision == "fp16":
        if piecewise:
            return PiecewiseEngine(
                bundle.model_path, ort_loader, provider="cpu", precision="fp16", threads=threads
            )
        from rmserve.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(bundle.model_path, provider="cpu", threads=threads, precision="fp16")
    try:
        from rmserve.engines.openvino import OpenVinoEngine, cpu_supports_bf16
    except ImportError as exc:
        raise EngineError("bf16 bundles are checked on OpenVINO here: pip install openvino") from exc
    hint = "bf16" if cpu_supports_bf16() else "fp32"
    if piecewise:
        load = openvino_loader(hint)
        return PiecewiseEngine(bundle.model_path, load, provider="openvino", precision=hint, threads=threads)
    return OpenVinoEngine(bundle.model_path, threads=threads, precision=hint)


def _drop_past_graph(staging: Path, fields: dict[str, Any]) -> None:
    past = fields.pop("past_graph", None)
    if past is not None:
        (staging / past).unlink(missing_ok=True)
        (staging / (past + ".data")).unlink(missing_ok=True)
    fields["past_graph"] = None
