"""``rmserve export``: a Hugging Face reward-model checkpoint -> a verified serving bundle.

The bundle is built in a staging directory next to the destination and moved into place only
after its checks hold, so a failed export leaves nothing behind. Steps, in file order:
load the checkpoint (models/loading.py: a ``ScoreModel``, or with ``step`` a process reward model's
``StepModel``; a decoder saved as safetensors layer by layer) -> the family's reference usage
(models/authors.py) and the format settings -> the graph: for Llama, Qwen2, Qwen3, Mistral and
Gemma-2 decoders the lean graph, written from the weights (models/lean: no padding mask, so the bundle
requires right padding), else torch.onnx (dynamo) of the whole model loaded with SDPA attention, so
each layer's attention exports as one fused op (models/attention.py) -> tokenizer and calibration
files -> the checks (models/verification.py: parity through the server's own formatter and engine,
optional fusions, optional fp16 or bf16 by measured headroom, gated) -> the manifest with its digest,
computed once over the final files -> publish.

A process bundle's graph emits a value per token, its manifest says ``kind: process`` with its step
token and rule, and parity and the reduced-precision measurement compare the values at the step
tokens.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rmserve.bundle import CALIBRATION_FILE, MODEL_FILE, Manifest, write_manifest
from rmserve.models import attention, authors, lean
from rmserve.models import parity as parity_mod
from rmserve.models.attention import AttentionPlan
from rmserve.models.calibration import calibration_set, write_calibration
from rmserve.models.data import recorded_path
from rmserve.models.formats import default_max_length, format_settings, save_tokenizer
from rmserve.models.graph import EXTERNAL_DATA_BYTES, ExportError, export_onnx, input_names
from rmserve.models.heads import ModelMeta
from rmserve.models.layerwise import return_freed_buffers
from rmserve.models.lean.eligibility import graph_reason
from rmserve.models.loading import DEFAULT_OPSET, ModelRequest, load_checkpoint, load_model, load_whole
from rmserve.models.named_heads import HeadRequest
from rmserve.models.parity import Pair, TorchModel
from rmserve.models.process_heads import StepExport, process_format
from rmserve.models.reduced import REDUCED
from rmserve.models.verification import ParityPlan, Staged, verify_bundle

# Other modules (the trainer, loadtests/gpu_check.py) take these from here.
__all__ = [
    "DEFAULT_OPSET",
    "EXTERNAL_DATA_BYTES",
    "ExportError",
    "calibration_set",
    "export_bundle",
    "export_onnx",
    "format_settings",
    "input_names",
    "save_tokenizer",
    "write_calibration",
    "write_manifest",
]


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
    return_freed_buffers()  # so each layer the reference forward drops goes back to the system
    request = ModelRequest(checkpoint, step, head, trust_remote_code)
    loaded = load_checkpoint(request, family=family, fuse_attention=fuse_attention, opset=opset)
    tokenizer, meta, entry = loaded.tokenizer, loaded.meta, loaded.family
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
            layerwise=loaded.layerwise,
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
    named = getattr(loaded.model, "named_head", None)
    if named is not None and named.gate_pattern:
        settings = settings.model_copy(update={"gate_pattern": named.gate_pattern})
    try:
        why_traced = graph_reason(
            graph, meta.family, loaded.model.body.config, settings.max_length, loaded.attention.reason
        )
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    if why_traced is not None:
        loaded = load_whole(request, loaded)  # tracing needs the whole model in memory
    weights = loaded.weights if why_traced is None else None  # the lean graph streams them
    threshold = min(external_data_bytes, lean.STREAM_BYTES)
    streamed = weights is not None and lean.weights_size(weights, "fp32") > threshold
    direct = streamed and precision in REDUCED
    texts, text_source = parity_mod.reference_pairs(32)
    plan = ParityPlan(texts, text_source, tolerance, invariance_tolerance, reference)
    calibration = calibration_set(calibration_pairs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{dest.name}.export-", dir=dest.parent))
    try:
        staging = staging_root / "bundle"
        staging.mkdir()
        model, written = loaded.model, None
        if why_traced is None:
            written = lean.write_lean_graph(
                model,
                settings.max_length,
                staging,
                precision=precision if direct else "fp32",
                external_data_bytes=external_data_bytes,
                source=weights,
                past=past_graph,
            )
            chosen, exporter = AttentionPlan("sdpa", lean.LEAN_OPSET, True), lean.EXPORTER
            fused_ops = attention.fused_ops_summary(attention.op_counts(staging / MODEL_FILE))
        else:
            model, chosen, exporter, fused_ops = _export_graph(
                request, model, meta, loaded.attention, staging, external_data_bytes
            )
        save_tokenizer(tokenizer, staging)
        write_calibration(staging, calibration)
        fields: dict[str, Any] = {
            "name": name or checkpoint.resolve().name,
            "architecture": meta.architecture,
            "model_type": meta.model_type,
            "family": meta.family,
            "kind": "process" if loaded.process else "outcome",
            "process": loaded.process,
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
            "graph": "lean" if written is not None else "traced",
            "graph_reason": why_traced if meta.family == "decoder" else None,
            "padding": "right" if written is not None else "any",
            "past_graph": written.past_graph if written is not None else None,
            "exporter": {
                "path": exporter,
                "torch": torch.__version__,
                "attn_implementation": chosen.implementation,
                "fused_ops": fused_ops,
                **({"lean": written.as_manifest()} if written is not None else {}),
                "weights": "streamed from the checkpoint's safetensors"
                if weights is not None
                else "from the loaded model",
                "reference_forward": "float32, layer by layer"
                if loaded.layerwise
                else "float32, whole model",
            },
        }
        report = verify_bundle(
            Staged(staging, fields, model, meta),
            plan,
            scratch=staging_root / "optimized",
            optimize=optimize,
            precision=precision,
            calibration=calibration,
            external_data_bytes=external_data_bytes,
            weights=weights,
            streamed=streamed,
            direct=direct,
        )
        # The one digest: every file is final here and hashed once.
        manifest = write_manifest(staging, **fields, parity=report.as_manifest())
        _publish(staging, dest, staging_root / "previous")
        return manifest
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)


def _export_graph(
    request: ModelRequest,
    model: TorchModel,
    meta: ModelMeta,
    chosen: AttentionPlan,
    staging: Path,
    external_data_bytes: int,
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
    model = load_model(request, fallback.implementation)[0]
    exporter = export_onnx(
        model, meta, staging, opset=fallback.opset, external_data_bytes=external_data_bytes
    )
    return model, fallback, exporter, {}


def _publish(staging: Path, dest: Path, previous: Path) -> None:
    """Move the verified bundle into place (a rename on the same filesystem)."""
    if dest.exists():
        dest.rename(previous)
    staging.rename(dest)
