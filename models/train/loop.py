"""The training loop: the transformers ``Trainer`` with the Bradley-Terry loss, one run or a soup of them."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from rmserve.formatting import Formatter
from rmserve.models.data import load_many
from rmserve.models.heads import ScoreModel
from rmserve.models.train.batches import PairCollator, PairDataset, training_formatter
from rmserve.models.train.config import Member, TrainConfig, TrainResult, default_base_model
from rmserve.models.train.model import head_module, init_model
from rmserve.models.train.ship import TRAINING_RECORD, export_trained, save_checkpoint, ship, training_record


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
