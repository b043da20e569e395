"""``rmserve export``: a Hugging Face reward-model checkpoint -> a verified serving bundle.

The bundle is built in a staging directory next to the destination and moved into place only
after parity holds (see models/parity.py), so a failed export leaves nothing behind. Steps:
load the checkpoint as a ``ScoreModel`` -> torch.onnx (dynamo) export with dynamic batch and
sequence axes -> tokenizer files -> manifest -> parity through the server's own formatter and
engine -> optional fusions (kept only if parity still holds) -> optional fp16 (models/fp16.py:
converted, measured against fp32 PyTorch, gated) -> publish.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rmserve.bundle import CALIBRATION_FILE, MODEL_FILE, FormatSettings, Manifest, load_bundle, write_manifest
from rmserve.engines.base import EngineError
from rmserve.models import fp16
from rmserve.models import parity as parity_mod
from rmserve.models.data import recorded_path
from rmserve.models.heads import ModelMeta, ScoreModel, load_score_model
from rmserve.models.parity import Pair, ParityReport, check_parity

DEFAULT_OPSET = 18
DATA_FILE = MODEL_FILE + ".data"
MAX_CALIBRATION_PAIRS = 64
# Protobuf cannot hold a model over 2 GiB; above this the weights go to model.onnx.data.
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2
DEFAULT_MAX_LENGTH = {"encoder": 512, "decoder": 4096}
# Used when a decoder's tokenizer has no chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
)


class ExportError(Exception):
    """The checkpoint cannot be exported, or the exported graph failed parity; nothing was written."""


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
    opset: int = DEFAULT_OPSET,
    base_model: str | None = None,
    overwrite: bool = False,
    tolerance: float = 1e-4,
    invariance_tolerance: float = 1e-5,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
) -> Manifest:
    """Export ``checkpoint_dir`` to a bundle at ``bundle_dir``; raises ExportError with the reason."""
    checkpoint, dest = Path(checkpoint_dir), Path(bundle_dir)
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"precision {precision!r} is not exported; choose fp32 or fp16")
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise ExportError(f"{dest} exists and is not empty (pass overwrite=True / --force to replace it)")
    try:
        model, tokenizer, meta = load_score_model(checkpoint)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load {checkpoint} as a reward model: {exc}") from exc
    settings = format_settings(tokenizer, meta, max_length=max_length, input_format=input_format)
    texts, source = parity_mod.reference_pairs(32)
    calibration = calibration_set(calibration_pairs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{dest.name}.export-", dir=dest.parent))
    try:
        staging = staging_root / "bundle"
        staging.mkdir()
        exporter = export_onnx(model, meta, staging, opset=opset, external_data_bytes=external_data_bytes)
        save_tokenizer(tokenizer, staging)
        write_calibration(staging, calibration)
        fields: dict[str, Any] = {
            "name": name or checkpoint.resolve().name,
            "architecture": meta.architecture,
            "model_type": meta.model_type,
            "kind": meta.kind,
            "base_model": recorded_path(base_model) if base_model else meta.base_model,
            "format": settings,
            "opset": opset,
            "inputs": input_names(meta),
            "calibration_file": CALIBRATION_FILE,
            "training": training,
            "exporter": {"path": exporter, "torch": torch.__version__},
        }
        write_manifest(staging, **fields)
        report = _parity(staging, model, texts, source, tolerance, invariance_tolerance)
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
        manifest = write_manifest(staging, **fields, parity=report.as_manifest())
        load_bundle(staging)  # the digest we wrote must verify, exactly as the server will check it
        _publish(staging, dest, staging_root / "previous")
        return manifest
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)


def input_names(meta: ModelMeta) -> list[str]:
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if meta.uses_token_type_ids else [])


def default_max_length(tokenizer: Any, meta: ModelMeta) -> int:
    limits = [DEFAULT_MAX_LENGTH[meta.kind], int(min(tokenizer.model_max_length, 1 << 30))]
    if meta.max_position_embeddings:
        limits.append(int(meta.max_position_embeddings))
    return min(limits)


def format_settings(
    tokenizer: Any, meta: ModelMeta, *, max_length: int | None, input_format: str | None
) -> FormatSettings:
    """How the server must turn items into token ids for this checkpoint."""
    fmt = input_format or ("text_pair" if meta.kind == "encoder" else "chat_template")
    if fmt == "text_pair" and meta.kind == "decoder":
        raise ExportError("text_pair is an encoder format; a decoder reads chat_template or plain text")
    template = None
    if fmt == "chat_template":
        template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        if not isinstance(template, str):
            raise ExportError("the tokenizer has several named chat templates; pass one as plain text")
    return FormatSettings(
        input_format=fmt,  # type: ignore[arg-type]
        max_length=max_length or default_max_length(tokenizer, meta),
        pooling=meta.pooling,
        pad_token_id=meta.pad_token_id,
        # Decoder text arrives rendered, special tokens included (the template writes BOS/EOS).
        add_special_tokens=meta.kind == "encoder",
        chat_template=template,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
    )


def export_onnx(
    model: ScoreModel, meta: ModelMeta, directory: Path, *, opset: int, external_data_bytes: int
) -> str:
    """Write ``model.onnx`` (+ ``model.onnx.data`` when large); returns which exporter worked."""
    names = input_names(meta)
    ids = torch.full((2, 8), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a padded row, so no padding-dependent branch is specialized away
    args = (ids, mask) + ((torch.zeros_like(ids),) if meta.uses_token_type_ids else ())
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > external_data_bytes
    path = directory / MODEL_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            program = torch.onnx.export(
                model,
                args,
                input_names=names,
                output_names=["scores"],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes={n: {0: batch, 1: seq} for n in names},
                verbose=False,
            )
            assert program is not None
            import onnx_ir

            onnx_ir.save(program.model, path, external_data=DATA_FILE if external else None)
            return "torch.onnx.export(dynamo=True)"
        except Exception as dynamo_error:  # the dynamo exporter raises many kinds; the legacy one may work
            first = f"{type(dynamo_error).__name__}: {dynamo_error}"
        try:
            _export_legacy(model, args, names, path, opset, external)
            return "torch.onnx.export(dynamo=False)"
        except Exception as exc:
            raise ExportError(
                f"torch.onnx could not export {meta.architecture}: dynamo exporter: {first[:500]}; "
                f"legacy exporter: {type(exc).__name__}: {str(exc)[:500]}"
            ) from exc


def _export_legacy(
    model: ScoreModel,
    args: tuple[torch.Tensor, ...],
    names: list[str],
    path: Path,
    opset: int,
    external: bool,
) -> None:
    import onnx

    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"scores": {0: "batch"}}
    torch.onnx.export(
        model,
        args,
        str(path),
        input_names=names,
        output_names=["scores"],
        opset_version=opset,
        dynamo=False,
        dynamic_axes=axes,
    )
    if external:
        proto = onnx.load(str(path))
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,
            size_threshold=1024,
        )


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json, nothing else.

    transformers 5 also writes chat_template.jinja and may skip special_tokens_map.json; the
    template lives in the manifest (it is digested there), and the map is written here.
    """
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            source = Path(scratch) / file
            if not source.is_file():
                raise ExportError(f"the tokenizer did not save {file}; a fast tokenizer is needed")
            shutil.copyfile(source, directory / file)
    specials = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")


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
    model: ScoreModel,
    texts: Sequence[Pair],
    source: str,
    tolerance: float,
    invariance: float,
) -> ParityReport:
    report = check_parity(
        load_bundle(bundle_dir),
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
    model: ScoreModel,
    meta: ModelMeta,
    fields: dict[str, Any],
    report: ParityReport,
    texts: Sequence[Pair],
    source: str,
    tolerance: float,
    invariance: float,
) -> ParityReport:
    """ORT transformer fusions on a copy of the bundle; adopted only if parity still holds."""
    if meta.kind != "encoder":
        # ORT's optimizer has no fusion patterns for Llama-family graphs exported by dynamo;
        # the server's ORT_ENABLE_ALL session still applies the generic fusions at load.
        report.extra["optimized"] = False
        report.extra["optimize_skipped"] = f"no onnxruntime fusion model_type for {meta.model_type}"
        return report
    shutil.copytree(staging, candidate)
    fusions = fuse_encoder(candidate / MODEL_FILE)
    write_manifest(candidate, **fields)
    try:
        fused = _parity(candidate, model, texts, source, tolerance, invariance)
    except ExportError as exc:
        report.extra |= {"optimized": False, "optimize_rejected": str(exc)}
        return report
    shutil.rmtree(staging)
    candidate.rename(staging)
    fused.extra |= {"optimized": True, "fusions": fusions, "unfused": _summary(report)}
    return fused


def fuse_encoder(path: Path) -> dict[str, int]:
    """Attention/LayerNorm/GELU fusions in place; returns the fused operator counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    # opt_level=1: only provider-independent ORT rewrites before the Python fusions, so the
    # fused file still runs on CPU, CUDA and OpenVINO alike (level 2+ bakes in CPU-only ops).
    fused = optimize_model(str(path), model_type="bert", num_heads=0, hidden_size=0, opt_level=1)
    external = (path.parent / DATA_FILE).is_file()
    fused.save_model_to_file(str(path), use_external_data_format=external, all_tensors_to_one_file=True)
    stats = fused.get_fused_operator_statistics()
    return {op: int(n) for op, n in stats.items() if n}


def _to_fp16(
    staging: Path,
    model: ScoreModel,
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
        write_manifest(staging, **fields)
        # No tolerance: fp16 deviates by design; what it deviates by is measured and recorded.
        drift = fp16.check_fp16(load_bundle(staging), model, texts, text_source=source)
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
