"""``rmserve export``: a Hugging Face reward-model checkpoint -> a verified serving bundle.

The bundle is built in a staging directory next to the destination and moved into place only
after parity holds (see models/parity.py), so a failed export leaves nothing behind. Steps:
load the checkpoint as a ``ScoreModel`` (decoders with SDPA attention, so each layer's attention
exports as one fused op: models/attention.py) -> torch.onnx (dynamo) export with dynamic batch
and sequence axes -> tokenizer files -> parity through the server's own formatter and engine ->
optional fusions (kept only if parity still holds) -> optional fp16 (models/fp16.py: converted,
measured against fp32 PyTorch, gated) -> the manifest with its digest, computed once over the
final files -> publish.

With ``step`` (``--step-token``) the checkpoint is a process reward model (models/process_heads.py):
the graph emits a value per token, the manifest says ``kind: process`` with its step token and rule,
and parity and the fp16 measurement compare the values at the step tokens.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rmserve.bundle import (
    CALIBRATION_FILE,
    MODEL_FILE,
    Manifest,
    ProcessSettings,
    unsealed_bundle,
    write_manifest,
)
from rmserve.engines.base import EngineError
from rmserve.models import attention, fp16
from rmserve.models import parity as parity_mod
from rmserve.models.attention import AttentionPlan
from rmserve.models.data import recorded_path
from rmserve.models.formats import format_settings, save_tokenizer
from rmserve.models.graph import EXTERNAL_DATA_BYTES, ExportError, export_onnx, fuse_encoder, input_names
from rmserve.models.heads import ModelMeta, checkpoint_family, load_score_model
from rmserve.models.parity import Pair, ParityReport, TorchModel, check_parity
from rmserve.models.process_heads import StepExport, load_step_model

DEFAULT_OPSET = 18
MAX_CALIBRATION_PAIRS = 64


def export_bundle(
    checkpoint_dir: str | Path,
    bundle_dir: str | Path,
    *,
    name: str | None = None,
    max_length: int | None = None,
    input_format: str | None = None,
    optimize: bool = False,
    precision: str = "fp32",
    calibration_pairs: Sequence[Pair | Mapping[str, str]] | str | Path | None = None,
    training: dict[str, Any] | None = None,
    opset: int | None = None,
    fuse_attention: bool = True,
    base_model: str | None = None,
    overwrite: bool = False,
    tolerance: float = 1e-4,
    invariance_tolerance: float = 1e-5,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
    step: StepExport | None = None,
) -> Manifest:
    """Export ``checkpoint_dir`` to a bundle at ``bundle_dir``; raises ExportError with the reason.

    ``opset`` defaults to 23 for a decoder with fused attention, else 18 (models/attention.py).
    ``step``: export a process reward model (a value per step token) instead of one score per item.
    """
    checkpoint, dest = Path(checkpoint_dir), Path(bundle_dir)
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"precision {precision!r} is not exported; choose fp32 or fp16")
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise ExportError(f"{dest} exists and is not empty (pass overwrite=True / --force to replace it)")
    try:
        family = checkpoint_family(checkpoint)
        chosen = attention.plan(family, fuse=fuse_attention, opset=opset, default_opset=DEFAULT_OPSET)
        model, tokenizer, meta, process, chosen = _load(checkpoint, chosen, step)
    except (OSError, ValueError) as exc:
        what = "a process reward model" if step else "a reward model"
        raise ExportError(f"cannot load {checkpoint} as {what}: {exc}") from exc
    settings = format_settings(tokenizer, meta, max_length=max_length, input_format=input_format)
    texts, source = parity_mod.reference_pairs(32)
    calibration = calibration_set(calibration_pairs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{dest.name}.export-", dir=dest.parent))
    try:
        staging = staging_root / "bundle"
        staging.mkdir()
        model, chosen, exporter, fused_ops = _export_graph(
            checkpoint, model, meta, chosen, staging, external_data_bytes, step
        )
        save_tokenizer(tokenizer, staging)
        write_calibration(staging, calibration)
        fields: dict[str, Any] = {
            "name": name or checkpoint.resolve().name,
            "architecture": meta.architecture,
            "model_type": meta.model_type,
            "family": meta.family,
            "kind": "process" if process else "outcome",
            "process": process,
            "base_model": recorded_path(base_model) if base_model else meta.base_model,
            "format": settings,
            "opset": chosen.opset,
            "inputs": input_names(meta),
            "calibration_file": CALIBRATION_FILE,
            "training": training,
            "attention": chosen.label,
            "attention_reason": chosen.reason,
            "exporter": {
                "path": exporter,
                "torch": torch.__version__,
                "attn_implementation": chosen.implementation,
                "fused_ops": fused_ops,
            },
        }
        report = _parity(staging, fields, model, texts, source, tolerance, invariance_tolerance)
        if optimize:
            report = _try_optimize(
                staging,
                staging_root / "optimized",
                model,
                meta,
                fields,
                report,
                texts,
                source,
                tolerance,
                invariance_tolerance,
            )
        if precision == "fp16":
            fields["precision"] = "fp16"
            report = _to_fp16(staging, model, fields, report, texts, source, external_data_bytes)
        # The one digest: every file is final here and hashed once.
        manifest = write_manifest(staging, **fields, parity=report.as_manifest())
        _publish(staging, dest, staging_root / "previous")
        return manifest
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)


def _load_model(
    checkpoint: Path, attn: str | None, step: StepExport | None
) -> tuple[TorchModel, Any, ModelMeta, ProcessSettings | None]:
    """The torch model to export: one score per item, or (``step``) a value per token."""
    if step is None:
        return (*load_score_model(checkpoint, attn_implementation=attn), None)
    return load_step_model(
        checkpoint,
        step_token=step.step_token,
        rule=step.rule,
        label_tokens=step.label_tokens,
        attn_implementation=attn,
    )


def _load(
    checkpoint: Path, chosen: AttentionPlan, step: StepExport | None
) -> tuple[TorchModel, Any, ModelMeta, ProcessSettings | None, AttentionPlan]:
    """The model with the attention the plan asks for; without an SDPA path, unfused and why."""
    try:
        return (*_load_model(checkpoint, chosen.implementation, step), chosen)
    except ValueError as exc:
        if not chosen.fused or "scaled_dot_product_attention" not in str(exc):
            raise
    fallback = attention.unfused(DEFAULT_OPSET, "the model has no PyTorch SDPA attention path to fuse")
    return (*_load_model(checkpoint, fallback.implementation, step), fallback)


def _export_graph(
    checkpoint: Path,
    model: TorchModel,
    meta: ModelMeta,
    chosen: AttentionPlan,
    staging: Path,
    external_data_bytes: int,
    step: StepExport | None,
) -> tuple[TorchModel, AttentionPlan, str, dict[str, int]]:
    """Write the graph as planned; a graph that did not come out fused is redone unfused.

    Returns the model it was traced from, the plan it follows, the exporter and its fused ops.
    """
    exporter = export_onnx(model, meta, staging, opset=chosen.opset, external_data_bytes=external_data_bytes)
    if not chosen.fused:
        return model, chosen, exporter, {}
    ops = attention.op_counts(staging / MODEL_FILE)
    problem = attention.check_fused(ops, meta.num_layers)
    if problem is None:
        return model, chosen, exporter, attention.fused_ops_summary(ops)
    for stale in staging.glob(MODEL_FILE + "*"):
        stale.unlink()
    fallback = attention.unfused(DEFAULT_OPSET, f"not fused: {problem}")
    model = _load_model(checkpoint, fallback.implementation, step)[0]
    exporter = export_onnx(
        model, meta, staging, opset=fallback.opset, external_data_bytes=external_data_bytes
    )
    return model, fallback, exporter, {}


def calibration_set(value: Sequence[Pair | Mapping[str, str]] | str | Path | None) -> list[Pair]:
    """Up to 64 prompt/response pairs: given, read from a JSONL file, or the parity text source."""
    if value is None:
        pairs, _ = parity_mod.reference_pairs(MAX_CALIBRATION_PAIRS)
        return pairs
    if isinstance(value, str | Path):
        if str(value) == "builtin":
            return parity_mod.builtin_pairs()[:MAX_CALIBRATION_PAIRS]
        lines = Path(value).read_text(encoding="utf-8").splitlines()
        value = [json.loads(line) for line in lines if line.strip()]
    pairs = [p if isinstance(p, Pair) else Pair(str(p["prompt"]), str(p["response"])) for p in value]
    return pairs[:MAX_CALIBRATION_PAIRS]


def write_calibration(directory: Path, pairs: Sequence[Pair]) -> None:
    with (directory / CALIBRATION_FILE).open("w", encoding="utf-8") as fh:
        for p in pairs:
            fh.write(json.dumps({"prompt": p.prompt, "response": p.response}, ensure_ascii=False) + "\n")


def _parity(
    bundle_dir: Path,
    fields: dict[str, Any],
    model: TorchModel,
    texts: Sequence[Pair],
    source: str,
    tolerance: float,
    invariance: float,
) -> ParityReport:
    report = check_parity(
        unsealed_bundle(bundle_dir, **fields),
        model,
        texts,
        text_source=source,
        tolerance=tolerance,
        invariance_tolerance=invariance,
    )
    if not report.ok:
        raise ExportError(
            "parity failed, nothing was written: "
            + "; ".join(report.problems)
            + f" (max_abs_diff={report.max_abs_diff:.3g}, max_rel_diff={report.max_rel_diff:.3g}, "
            f"batch_invariance_max={report.batch_invariance_max:.3g}, n_texts={report.n_texts})"
        )
    return report


def _try_optimize(
    staging: Path,
    candidate: Path,
    model: TorchModel,
    meta: ModelMeta,
    fields: dict[str, Any],
    report: ParityReport,
    texts: Sequence[Pair],
    source: str,
    tolerance: float,
    invariance: float,
) -> ParityReport:
    """ORT transformer fusions on a copy of the bundle; adopted only if parity still holds."""
    if meta.family != "encoder":
        # ORT's optimizer has no fusion patterns for Llama-family graphs exported by dynamo;
        # the server's ORT_ENABLE_ALL session still applies the generic fusions at load.
        report.extra["optimized"] = False
        report.extra["optimize_skipped"] = f"no onnxruntime fusion model_type for {meta.model_type}"
        return report
    shutil.copytree(staging, candidate)
    fusions = fuse_encoder(candidate / MODEL_FILE)
    try:
        fused = _parity(candidate, fields, model, texts, source, tolerance, invariance)
    except ExportError as exc:
        report.extra |= {"optimized": False, "optimize_rejected": str(exc)}
        return report
    shutil.rmtree(staging)
    candidate.rename(staging)
    fused.extra |= {"optimized": True, "fusions": fusions, "unfused": _summary(report)}
    return fused


def _to_fp16(
    staging: Path,
    model: TorchModel,
    fields: dict[str, Any],
    report: ParityReport,
    texts: Sequence[Pair],
    source: str,
    external_data_bytes: int,
) -> ParityReport:
    """Convert the parity-checked fp32 graph to fp16 (models/fp16.py); ship it only if its drift passes."""
    path = staging / MODEL_FILE
    try:
        conversion = fp16.convert_model_fp16(path, path, external_data_bytes=external_data_bytes)
        # No tolerance: fp16 deviates by design; what it deviates by is measured and recorded.
        drift = fp16.check_fp16(unsealed_bundle(staging, **fields), model, texts, text_source=source)
    except fp16.Fp16Error as exc:
        raise ExportError(str(exc)) from exc
    except EngineError as exc:
        raise ExportError(f"onnxruntime (CPU) cannot run the fp16 graph, so it is unchecked: {exc}") from exc
    if drift.problems:
        raise ExportError("fp16 check failed, nothing was written: " + "; ".join(drift.problems))
    report.extra["fp16"] = fp16.manifest_record(drift, conversion)
    return report


def _summary(report: ParityReport) -> dict[str, float]:
    return {
        "max_abs_diff": report.max_abs_diff,
        "max_rel_diff": report.max_rel_diff,
        "batch_invariance_max": report.batch_invariance_max,
    }


def _publish(staging: Path, dest: Path, previous: Path) -> None:
    """Move the verified bundle into place (a rename on the same filesystem)."""
    if dest.exists():
        dest.rename(previous)
    staging.rename(dest)
