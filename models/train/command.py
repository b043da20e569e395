"""``rmserve train``, the command: flags -> ``TrainConfig`` -> a run. Torch is imported only to run.

``python -m rmserve.models.train`` runs it too.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from rmserve.bundle import ENCODER_POOLINGS
from rmserve.cli import DefaultsHelpFormatter
from rmserve.models.train.config import TrainConfig


def _eval_set(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--eval takes NAME=PATH, not {text!r}")
    return name, path


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig(train=())
    a = parser.add_argument
    a(
        "--train",
        nargs="+",
        required=True,
        help="training pairs: JSONL(.gz)/JSON/Parquet files or saved HF datasets",
    )
    a(
        "--dev",
        nargs="*",
        default=[],
        help="dev pairs: pairwise accuracy each epoch and on the exported bundle",
    )
    a(
        "--eval",
        dest="evals",
        action="append",
        type=_eval_set,
        default=[],
        metavar="NAME=PATH",
        help="extra sets scored on the exported bundle only (never trained on); repeatable",
    )
    a(
        "--base-model",
        default="",
        help="local HF checkpoint to start from (default: all-MiniLM-L6-v2 package)",
    )
    a("--output-dir", default=d.output_dir, help="where the checkpoint and trainer state go")
    a(
        "--bundle-dir",
        default=None,
        help="export the trained model as a bundle here (default: none, the checkpoint only)",
    )
    a("--name", default=d.name, help="bundle name in its manifest")
    a(
        "--pooling",
        choices=list(ENCODER_POOLINGS),
        default=d.pooling,
        help="encoder pooling: cls, mean over all tokens, or mean over the response's tokens "
        "(decoders: last token)",
    )
    a(
        "--max-length",
        type=int,
        default=d.max_length,
        help="tokens per (prompt, response), cut like the server",
    )
    a("--epochs", type=float, default=d.epochs, help="passes over the training pairs")
    a("--lr", dest="learning_rate", type=float, default=d.learning_rate, help="peak learning rate")
    a("--batch-size", type=int, default=d.batch_size, help="pairs per optimizer step (per device)")
    a("--grad-accum", type=int, default=d.grad_accum, help="batches per optimizer step")
    a("--warmup-ratio", type=float, default=d.warmup_ratio, help="share of the steps spent warming up")
    a(
        "--scheduler",
        default=d.scheduler,
        help="transformers lr schedule: linear, cosine, constant_with_warmup",
    )
    a("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    a("--dropout", type=float, default=d.dropout, help="dropout during training (0 disables it)")
    a("--center-coef", type=float, default=d.center_coef, help="reward-centering coefficient (0: off)")
    a(
        "--label-smoothing",
        type=float,
        default=d.label_smoothing,
        help="target P(chosen wins) = 1 - eps in the Bradley-Terry loss (0: off)",
    )
    a("--head-lr-mult", type=float, default=d.head_lr_mult, help="learning rate of the fresh head / body's")
    a("--freeze-embeddings", action="store_true", help="keep the token embeddings fixed")
    a(
        "--freeze-layers",
        type=int,
        default=d.freeze_layers,
        help="also keep all embeddings and the N lowest layers fixed (faster steps, less overfitting)",
    )
    a(
        "--seed",
        type=int,
        default=d.seed,
        help="initial weights; soup member i also uses seed + i for its data order",
    )
    a(
        "--soup",
        type=int,
        default=d.soup,
        help="train N members from the same initial weights (data order and dropout seeded seed..seed+N-1) "
        "and ship the uniform average of their weights",
    )
    a("--bf16", action="store_true", help="bf16 autocast (CPU with AMX, or GPU)")
    a(
        "--max-train-pairs",
        type=int,
        default=None,
        help="train on a seeded random subset of this many pairs (pilots; default: all)",
    )
    a("--eval-batch-size", type=int, default=d.eval_batch_size, help="pairs per forward pass when scoring")
    a("--calibration-pairs", type=int, default=d.calibration_pairs, help="dev pairs stored in the bundle")
    a(
        "--calibration",
        choices=("dev", "builtin"),
        default=d.calibration,
        help="calibration pairs for the quality gate: from the dev data, or the exporter's own sentences",
    )
    a("--optimize", action="store_true", help="export with ONNX Runtime transformer fusions")
    a(
        "--export-only",
        action="store_true",
        help="no training: export and measure the checkpoint that an earlier run wrote in --output-dir "
        "(its recorded recipe goes into the manifest)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["train"] = tuple(args.train)
    values["dev"] = tuple(args.dev)
    values["evals"] = tuple(args.evals)
    return TrainConfig(**values)


def run_train(args: argparse.Namespace) -> int:
    from rmserve.models.train.loop import train

    result = train(config_from_args(args))
    summary = {
        "checkpoint": str(result.checkpoint),
        "bundle": str(result.bundle) if result.bundle else None,
        "wall_s": round(result.wall_s, 1),
        "metrics": {k: {"accuracy": v["accuracy"], "pairs": v["pairs"]} for k, v in result.metrics.items()},
    }
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmserve train",
        description="Train a Bradley-Terry reward model from preference pairs and export it as a bundle.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_train_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_train(build_parser().parse_args(argv))
