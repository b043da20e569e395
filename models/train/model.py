"""The model to train: a base checkpoint with a fresh scalar head, as the exporter's ``ScoreModel``."""

from __future__ import annotations

from typing import Any

import torch

from rmserve.models.heads import ScoreModel, family_of
from rmserve.models.train.config import TrainConfig


def init_model(cfg: TrainConfig) -> ScoreModel:
    """The base checkpoint with a fresh scalar head (seeded), set up for cfg.pooling."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, set_seed

    set_seed(cfg.seed)
    config = AutoConfig.from_pretrained(cfg.base_model, num_labels=1)
    family = family_of(config)
    if family == "encoder":
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
    return ScoreModel(hf_model, cfg.pooling if family == "encoder" else "last_token", family)  # type: ignore[arg-type]


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
