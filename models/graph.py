"""The graph file of a bundle: a ``ScoreModel`` (or a process bundle's ``StepModel``) written by
torch.onnx, optionally ORT-fused (encoders).

``export_onnx`` tries the dynamo exporter (dynamic batch and sequence axes) and falls back on the
TorchScript one; weights over ``EXTERNAL_DATA_BYTES`` go to ``model.onnx.data``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from rmserve.bundle import MODEL_FILE
from rmserve.models.heads import ModelMeta

DATA_FILE = MODEL_FILE + ".data"
# Protobuf cannot hold a model over 2 GiB; above this the weights go to model.onnx.data.
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2


class ExportError(Exception):
    """The checkpoint cannot be exported, or the exported graph failed parity; nothing was written."""


def input_names(meta: ModelMeta) -> list[str]:
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if meta.uses_token_type_ids else [])


def export_onnx(
    model: torch.nn.Module, meta: ModelMeta, directory: Path, *, opset: int, external_data_bytes: int
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
            export_legacy(model, args, names, path, opset, external)
            return "torch.onnx.export(dynamo=False)"
        except Exception as exc:
            raise ExportError(
                f"torch.onnx could not export {meta.architecture}: dynamo exporter: {first[:500]}; "
                f"legacy exporter: {type(exc).__name__}: {str(exc)[:500]}"
            ) from exc


def export_legacy(
    model: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    names: list[str],
    path: Path,
    opset: int,
    external: bool,
) -> None:
    import onnx

    # A StepModel's output has a sequence axis too (a value per token).
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {
        "scores": getattr(model, "output_axes", {0: "batch"})
    }
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


def save_onnx(model: Any, dest: Path, external_data_bytes: int) -> None:
    """Write ``model`` to ``dest``; its weights go to ``<dest>.data`` when over ``external_data_bytes``."""
    import onnx

    dest.parent.mkdir(parents=True, exist_ok=True)
    data = dest.with_name(dest.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    external = sum(t.ByteSize() for t in model.graph.initializer) > external_data_bytes
    onnx.save_model(
        model,
        str(dest),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )


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
