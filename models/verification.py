"""The export's checks on a staged bundle, in order: parity against the float32 PyTorch reference
(models/parity.py), or, where no fp32 graph is written, the family's reference usage held to that
reference's scores -> optional ORT fusions, adopted only if parity still holds -> optional fp16/bf16,
measured and gated (models/reduced.py). The result is the report the manifest records; any failed
check is an ExportError and nothing is published."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rmserve.bundle import MODEL_FILE, unsealed_bundle
from rmserve.engines.base import TokenBatch
from rmserve.models import authors
from rmserve.models.authors import AuthorsReference
from rmserve.models.graph import ExportError, fuse_encoder
from rmserve.models.heads import ModelMeta
from rmserve.models.lean.source import TensorSource
from rmserve.models.parity import Pair, ParityReport, TorchModel, check_parity, torch_scores
from rmserve.models.reduced import REDUCED, reduce_precision


@dataclass(frozen=True)
class ParityPlan:
    """What a bundle is held to: the texts (and where they came from), the tolerances, and the family's
    reference usage where it has one."""

    texts: Sequence[Pair]
    source: str
    tolerance: float
    invariance: float
    reference: AuthorsReference | None = None


@dataclass(frozen=True)
class Staged:
    """A bundle in its staging directory: its files, the manifest fields so far, and the float32
    PyTorch model it is checked against."""

    directory: Path
    fields: dict[str, Any]
    model: TorchModel
    meta: ModelMeta


def verify_bundle(
    staged: Staged,
    plan: ParityPlan,
    *,
    scratch: Path,
    optimize: bool,
    precision: str,
    calibration: Sequence[Pair],
    external_data_bytes: int,
    weights: TensorSource | None,
    streamed: bool,
    direct: bool,
) -> ParityReport:
    """Run the checks (the module docstring) on ``staged``; ``streamed``: the weights were streamed
    into the bundle, so ONNX Runtime runs it a piece at a time (models/piecewise.py); ``direct``:
    straight to ``precision``, so there is no fp32 graph to hold to parity. ``scratch``: an empty
    directory's path for the fused candidate."""
    report = None
    if not direct:
        report = parity_or_fail(staged.directory, staged.fields, staged.model, plan, piecewise=streamed)
    held = authors_without_fp32_graph(staged, plan) if direct else None
    if optimize and report is not None:
        report = try_optimize(staged, scratch, report, plan)
    if precision in REDUCED:
        report = reduce_precision(
            staged.directory,
            staged.model,
            staged.fields,
            report,
            plan.texts,
            plan.source,
            calibration,
            precision=precision,
            external_data_bytes=external_data_bytes,
            weights=weights,
            piecewise=streamed,
        )
    assert report is not None, "a streamed reduced-precision export is measured by reduce_precision"
    if held is not None:
        report.extra["reference"] = held
    if optimize and direct:
        report.extra |= {"optimized": False, "optimize_skipped": "no fp32 graph to fuse (weights streamed)"}
    return report


def parity_or_fail(
    bundle_dir: Path, fields: dict[str, Any], model: TorchModel, plan: ParityPlan, *, piecewise: bool = False
) -> ParityReport:
    """Parity of the bundle in ``bundle_dir`` against ``model``; ExportError with the numbers if not."""
    report = check_parity(
        unsealed_bundle(bundle_dir, **fields),
        model,
        plan.texts,
        text_source=plan.source,
        tolerance=plan.tolerance,
        invariance_tolerance=plan.invariance,
        authors=plan.reference,
        piecewise=piecewise,
    )
    if not report.ok:
        raise ExportError(
            "parity failed, nothing was written: "
            + "; ".join(report.problems)
            + f" (max_abs_diff={report.max_abs_diff:.3g}, max_rel_diff={report.max_rel_diff:.3g}, "
            f"batch_invariance_max={report.batch_invariance_max:.3g}, n_texts={report.n_texts})"
        )
    return report


@dataclass(frozen=True)
class _TorchScorer:
    model: TorchModel

    def infer(self, batch: TokenBatch) -> np.ndarray:
        return torch_scores(self.model, batch)


def authors_without_fp32_graph(staged: Staged, plan: ParityPlan) -> dict[str, Any] | None:
    """With no fp32 graph to run (weights streamed straight to a reduced precision), the served token
    ids and the float32 reference forward's scores are held to the authors' usage; the reduced graph is
    then held to that forward by its own drift check (models/reduced.py)."""
    if plan.reference is None:
        return None
    bundle = unsealed_bundle(staged.directory, **staged.fields)
    measured, problems = authors.compare(bundle, _TorchScorer(staged.model), plan.reference, plan.tolerance)
    if problems:
        raise ExportError("parity failed, nothing was written: " + "; ".join(problems))
    return measured | {"scored_by": "the float32 reference forward (no fp32 graph is written)"}


def try_optimize(staged: Staged, candidate: Path, report: ParityReport, plan: ParityPlan) -> ParityReport:
    """ORT transformer fusions on a copy of the bundle; adopted only if parity still holds."""
    meta = staged.meta
    if meta.family != "encoder":
        # ORT's optimizer has no fusion patterns for Llama-family graphs exported by dynamo;
        # the server's ORT_ENABLE_ALL session still applies the generic fusions at load.
        report.extra["optimized"] = False
        report.extra["optimize_skipped"] = f"no onnxruntime fusion model_type for {meta.model_type}"
        return report
    shutil.copytree(staged.directory, candidate)
    fusions = fuse_encoder(candidate / MODEL_FILE)
    try:
        fused = parity_or_fail(candidate, staged.fields, staged.model, plan)
    except ExportError as exc:
        report.extra |= {"optimized": False, "optimize_rejected": str(exc)}
        return report
    shutil.rmtree(staged.directory)
    candidate.rename(staged.directory)
    fused.extra |= {"optimized": True, "fusions": fusions, "unfused": _summary(report)}
    return fused


def _summary(report: ParityReport) -> dict[str, float]:
    return {
        "max_abs_diff": report.max_abs_diff,
        "max_rel_diff": report.max_rel_diff,
        "batch_invariance_max": report.batch_invariance_max,
    }
