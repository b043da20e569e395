"""``rmserve export``: a Hugging Face reward-model checkpoint -> a verified serving bundle.

The bundle is built in a staging directory next to the destination and moved into place only
after parity holds (see models/parity.py), so a failed export leaves nothing behind. Steps:
load the checkpoint as a ``ScoreModel`` (or, with ``step``, a process reward model's ``StepModel``:
models/process_heads.py) -> the graph: for Llama, Qwen2, Qwen3 and Mistral decoders the lean graph,
written from the weights (models/lean: no padding mask, so the bundle requires right padding), else
torch.onnx (dynamo) of the model loaded with SDPA attention, so each layer's attention exports as
one fused op (models/attention.py) -> tokenizer files -> parity through the server's own formatter
and engine -> optional fusions (kept only if parity still holds) -> optional fp16 or bf16
(models/reduced.py: by measured headroom, measured against fp32 PyTorch, gated) -> the manifest with
its digest, computed once over the final files -> publish.

A process bundle's graph emits a value per token, its manifest says ``kind: process`` with its step
token and rule, and parity and the reduced-precision measurement compare the values at the step
tokens.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmserve.bundle import (
    CALIBRATION_FILE,
    MODEL_FILE,
    Manifest,
    ProcessSettings,
    unsealed_bundle,
    write_manifest,
)
from rmserve.engines.base import TokenBatch
from rmserve.models import attention, authors, lean
from rmserve.models import parity as parity_mod
from rmserve.models.attention import AttentionPlan
from rmserve.models.authors import AuthorsReference
from rmserve.models.data import recorded_path
from rmserve.models.families import FamilyError, ModelFamily, checkpoint_names, identify, read_config
from rmserve.models.families.process import refused_process_family
from rmserve.models.formats import default_max_length, format_settings, save_tokenizer
from rmserve.models.graph import EXTERNAL_DATA_BYTES, ExportError, export_onnx, fuse_encoder, input_names
from rmserve.models.heads import ModelMeta, checkpoint_family, load_score_model
from rmserve.models.layerwise import own_names, return_freed_buffers
from rmserve.models.lean.eligibility import graph_reason
from rmserve.models.lean.source import SafetensorsSource
from rmserve.models.named_heads import HeadRequest
from rmserve.models.parity import Pair, ParityReport, TorchModel, check_parity, torch_scores
from rmserve.models.process_heads import StepExport, load_step_model, process_format
from rmserve.models.reduced import REDUCED, reduce_precision

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
    graph: str = "auto",
    past_graph: bool = True,
    base_model: str | None = None,
    overwrite: bool = False,
    tolerance: float = 1e-4,
    invariance_tolerance: float = 1e-5,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
    step: StepExport | None = None,
    head: HeadRequest | None = None,
    family: str | None = None,
    trust_remote_code: bool = False,
    bos_tokens: int | None = None,
    template_date: str | None = None,
) -> Manifest:
    """Export ``checkpoint_dir`` to a bundle at ``bundle_dir``; raises ExportError with the reason.

    ``opset`` defaults to 23 for a decoder with fused attention, else 18 (models/attention.py).
    ``graph``: ``auto`` writes the lean graph where the checkpoint takes it (models/lean), ``lean``
    fails where it does not, ``traced`` always traces. ``past_graph``: a lean bundle also carries the
    prefix-reuse variant (``model_past.onnx``: docs/prefix-reuse.md).
    ``step``: export a process reward model (a value per step token) instead of one score per item.
    An outcome model is exported as its family (``rmserve.models.families``: ``family`` names one, else
    config.json decides) and held to that family's reference usage (models/authors.py): ``bos_tokens``
    overrides the BOS count the reference implies, ``template_date`` (ISO) the date templates see
    (default: the day of the export), ``trust_remote_code`` lets a checkpoint's own code run.
    ``head``: a head other than ``score`` (a value head by name, a causal LM's logit) and OpenRLHF's
    normalisation (models/named_heads.py).
    A process model skips the registry: its step layout decides the input format and BOS policy
    (``process_format``: under ``separate``, one BOS before the prompt where the tokenizer has one, as
    TRL's ``tokenize_row`` does), ``bos_tokens`` overriding it.
    """
    checkpoint, dest = Path(checkpoint_dir), Path(bundle_dir)
    if precision not in ("fp32", *REDUCED):
        raise ExportError(f"precision {precision!r} is not exported; choose fp32, {' or '.join(REDUCED)}")
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise ExportError(f"{dest} exists and is not empty (pass overwrite=True / --force to replace it)")
    if step is not None and head is not None and head != HeadRequest():
        raise ExportError("--value-head, --lm-logit and --normalize are for outcome models, not --step-token")
    # A decoder saved as safetensors: its reference forward reads one layer at a time
    # (models/layerwise.py) and the lean graph streams its weights (models/lean/source.py).
    weights = None
    return_freed_buffers()
    try:
        if SafetensorsSource.present(checkpoint):
            weights = SafetensorsSource(checkpoint)
        if step is not None:
            refuse_process_family(checkpoint)
        entry = None if step else outcome_family(checkpoint, family, trust_remote_code)
        if entry is not None and entry.head == "lm_logit" and (head is None or head.lm_logit is None):
            flags = " ".join(entry.flags)
            raise ValueError(f"{entry.title} is read at one token of its LM head: pass {flags}")
        layout = checkpoint_family(checkpoint)
        chosen = attention.plan(layout, fuse=fuse_attention, opset=opset, default_opset=DEFAULT_OPSET)
        # Remote code, named heads (models/named_heads.py) and renamed weights load whole.
        layerwise = (
            layout == "decoder"
            and step is None
            and weights is not None
            and own_names(weights)
            and not trust_remote_code
        )
        model, tokenizer, meta, process, chosen = _load(
            checkpoint, chosen, step, trust_remote_code, head, layerwise
        )
        layerwise = layerwise and getattr(model, "named_head", None) is None
    except (OSError, ValueError) as exc:
        what = "a process reward model" if step else "a reward model"
        raise ExportError(f"cannot load {checkpoint} as {what}: {exc}") from exc
    length = max_length or default_max_length(tokenizer, meta)
    try:
        date = authors.template_date(tokenizer, template_date)
    except ValueError as exc:
        raise ExportError(f"--template-date {template_date!r} is not an ISO date (YYYY-MM-DD)") from exc
    reference = None
    # A family whose authors' code cannot run in an export (models/families/heads.py) has no reference.
    if entry is not None and entry.reference is not None:
        reference = authors.run_reference(
            checkpoint,
            entry,
            tokenizer,
            max_length=length,
            trust_remote_code=trust_remote_code,
            date=date,
            bos_override=bos_tokens,
        )
    try:
        input_format, bos_tokens = process_format(step, tokenizer, input_format, bos_tokens)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    settings = format_settings(
        tokenizer,
        meta,
        max_length=length,
        input_format=input_format,
        bos_tokens=reference.bos_tokens if reference else bos_tokens,
        template_date=date,
    )
    named = getattr(model, "named_head", None)
    if named is not None and named.gate_pattern:
        settings = settings.model_copy(update={"gate_pattern": named.gate_pattern})
    try:
        why_traced = graph_reason(
            graph,
            meta.family,
            model.body.config,
            settings.max_length,
            chosen.reason,
        )
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    if why_traced is not None and layerwise:  # tracing needs the whole model in memory
        model, tokenizer, meta, process, chosen = _load(checkpoint, chosen, step, trust_remote_code, head)
        layerwise = False
    streamed = why_traced is None and weights is not None
    threshold = min(external_data_bytes, lean.STREAM_BYTES)
    direct = streamed and precision in REDUCED and lean.weights_size(weights, "fp32") > threshold
    texts, source = parity_mod.reference_pairs(32)
    calibration = calibration_set(calibration_pairs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{dest.name}.export-", dir=dest.parent))
    try:
        staging = staging_root / "bundle"
        staging.mkdir()
        if why_traced is None:
            written = lean.write_lean_graph(
                model,
                settings.max_length,
                staging,
                precision=precision if direct else "fp32",
                external_data_bytes=external_data_bytes,
                source=weights if streamed else None,
                past=past_graph,
            )
            chosen, exporter = AttentionPlan("sdpa", lean.LEAN_OPSET, True), lean.EXPORTER
            fused_ops = attention.fused_ops_summary(attention.op_counts(staging / MODEL_FILE))
        else:
            model, chosen, exporter, fused_ops = _export_graph(
                checkpoint, model, meta, chosen, staging, external_data_bytes, step, trust_remote_code, head
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
            "head": named.as_manifest() if named is not None else None,
            "base_model": recorded_path(base_model) if base_model else meta.base_model,
            "model_family": reference.as_manifest() if reference else None,
            "format": settings,
            "opset": chosen.opset,
            "inputs": input_names(meta),
            "calibration_file": CALIBRATION_FILE,
            "training": training,
            "attention": chosen.label,
            "attention_reason": chosen.reason,
            "graph": "lean" if why_traced is None else "traced",
            "graph_reason": why_traced if meta.family == "decoder" else None,
            "padding": "right" if why_traced is None else "any",
            "past_graph": written.past_graph if why_traced is None else None,
            "exporter": {
                "path": exporter,
                "torch": torch.__version__,
                "attn_implementation": chosen.implementation,
                "fused_ops": fused_ops,
                **({"lean": written.as_manifest()} if why_traced is None else {}),
                "weights": "streamed from the checkpoint's safetensors"
                if streamed
                else "from the loaded model",
                "reference_forward": "float32, layer by layer" if layerwise else "float32, whole model",
            },
        }
        report = (
            None
            if direct
            else _parity(staging, fields, model, texts, source, tolerance, invariance_tolerance, reference)
        )
        held = _authors_without_fp32_graph(staging, fields, model, reference, tolerance) if direct else None
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
                reference,
            )
        if precision in REDUCED:
            report = reduce_precision(
                staging,
                model,
                fields,
                report,
                texts,
                source,
                calibration,
                precision=precision,
                external_data_bytes=external_data_bytes,
                weights=weights if streamed else None,
            )
        assert report is not None, "a streamed reduced-precision export is measured by reduce_precision"
        if held is not None:
            report.extra["reference"] = held
        # The one digest: every file is final here and hashed once.
        manifest = write_manifest(staging, **fields, parity=report.as_manifest())
        _publish(staging, dest, staging_root / "previous")
        return manifest
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)


def refuse_process_family(checkpoint: Path) -> None:
    """FamilyError when the checkpoint's names match a process family rmserve refuses (an implicit PRM)."""
    refused = refused_process_family(checkpoint_names(checkpoint, read_config(checkpoint)))
    if refused is not None:
        raise FamilyError(f"{refused.title} is not supported: {refused.refusal}")


def outcome_family(checkpoint: Path, requested: str | None, trust_remote_code: bool) -> ModelFamily:
    """The checkpoint's family (``rmserve.models.families.identify``); a checkpoint shipping its own
    code (``auto_map``) is refused without ``trust_remote_code``, naming the classes it would run."""
    remote = read_config(checkpoint).get("auto_map")
    if remote and not trust_remote_code:
        named = ", ".join(f"{k} -> {v}" for k, v in dict(remote).items())
        raise FamilyError(f"config.json names remote code ({named}); pass --trust-remote-code to run it")
    return identify(checkpoint, requested)


def _load_model(
    checkpoint: Path,
    attn: str | None,
    step: StepExport | None,
    trust_remote_code: bool = False,
    head: HeadRequest | None = None,
    layerwise: bool = False,
) -> tuple[TorchModel, Any, ModelMeta, ProcessSettings | None]:
    """The torch model to export: one score per item, or (``step``) a value per token."""
    if step is None:
        loaded = load_score_model(
            checkpoint,
            attn_implementation=attn,
            trust_remote_code=trust_remote_code,
            head=head,
            layerwise=layerwise,
        )
        return (*loaded, None)
    return load_step_model(
        checkpoint,
        step_token=step.step_token,
        rule=step.rule,
        label_tokens=step.label_tokens,
        layout=step.layout,
        prompt_suffix=step.prompt_suffix,
        before_token=step.before_token,
        between_steps=step.between_steps,
        attn_implementation=attn,
    )


def _load(
    checkpoint: Path,
    chosen: AttentionPlan,
    step: StepExport | None,
    trust_remote_code: bool,
    head: HeadRequest | None = None,
    layerwise: bool = False,
) -> tuple[TorchModel, Any, ModelMeta, ProcessSettings | None, AttentionPlan]:
    """The model with the attention the plan asks for; without an SDPA path, unfused and why."""
    try:
        return (
            *_load_model(checkpoint, chosen.implementation, step, trust_remote_code, head, layerwise),
            chosen,
        )
    except ValueError as exc:
        if not chosen.fused or "scaled_dot_product_attention" not in str(exc):
            raise
    fallback = attention.unfused(DEFAULT_OPSET, "the model has no PyTorch SDPA attention path to fuse")
    args = (checkpoint, fallback.implementation, step, trust_remote_code, head, layerwise)
    return (*_load_model(*args), fallback)


def _export_graph(
    checkpoint: Path,
    model: TorchModel,
    meta: ModelMeta,
    chosen: AttentionPlan,
    staging: Path,
    external_data_bytes: int,
    step: StepExport | None,
    trust_remote_code: bool,
    head: HeadRequest | None,
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
    model = _load_model(checkpoint, fallback.implementation, step, trust_remote_code, head)[0]
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
    reference: AuthorsReference | None = None,
) -> ParityReport:
    report = check_parity(
        unsealed_bundle(bundle_dir, **fields),
        model,
        texts,
        text_source=source,
        tolerance=tolerance,
        invariance_tolerance=invariance,
        authors=reference,
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


def _authors_without_fp32_graph(
    staging: Path,
    fields: dict[str, Any],
    model: TorchModel,
    reference: AuthorsReference | None,
    tolerance: float,
) -> dict[str, Any] | None:
    """With no fp32 graph to run (weights streamed straight to a reduced precision), the served token
    ids and the float32 reference forward's scores are held to the authors' usage; the reduced graph is
    then held to that forward by its own drift check (models/reduced.py)."""
    if reference is None:
        return None
    measured, problems = authors.compare(
        unsealed_bundle(staging, **fields), _TorchScorer(model), reference, tolerance
    )
    if problems:
        raise ExportError("parity failed, nothing was written: " + "; ".join(problems))
    return measured | {"scored_by": "the float32 reference forward (no fp32 graph is written)"}


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
    reference: AuthorsReference | None,
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
        fused = _parity(candidate, fields, model, texts, source, tolerance, invariance, reference)
    except ExportError as exc:
        report.extra |= {"optimized": False, "optimize_rejected": str(exc)}
        return report
    shutil.rmtree(staging)
    candidate.rename(staging)
    fused.extra |= {"optimized": True, "fusions": fusions, "unfused": _summary(report)}
    return fused


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
