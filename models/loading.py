"""The export's load step: a checkpoint -> the float32 PyTorch model its bundle is written from and
checked against.

An outcome model is loaded as its family (``rmserve.models.families``) as a ``ScoreModel``
(models/heads.py); a process model (``step``) as a ``StepModel`` (models/process_load.py), after the
process families rmserve refuses are ruled out. A decoder saved as safetensors is loaded layer by
layer (models/layerwise.py: its reference forward holds one layer at a time), except under remote code
and with a named head (models/named_heads.py), which load whole. The model is loaded with the
attention the plan asks for (models/attention.py); a model with no SDPA path falls back to unfused
attention, saying why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rmserve.bundle import ProcessSettings
from rmserve.models import attention
from rmserve.models.attention import AttentionPlan
from rmserve.models.families import FamilyError, ModelFamily, checkpoint_names, identify, read_config
from rmserve.models.families.process import refused_process_family
from rmserve.models.graph import ExportError
from rmserve.models.heads import ModelMeta, checkpoint_family, load_score_model
from rmserve.models.layerwise import own_names
from rmserve.models.lean.source import SafetensorsSource
from rmserve.models.named_heads import HeadRequest
from rmserve.models.parity import TorchModel
from rmserve.models.process_heads import StepExport
from rmserve.models.process_load import load_step_model

DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ModelRequest:
    """What the export asks to load: the checkpoint, a process model's step (None: an outcome model),
    a named head, and whether the checkpoint's own code may run."""

    checkpoint: Path
    step: StepExport | None = None
    head: HeadRequest | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Loaded:
    """The loaded model and what came with it: its tokenizer, meta, process settings (a process model's),
    the attention it was loaded with, its outcome family, the checkpoint's safetensors (None where it
    has none) and whether its reference forward runs layer by layer."""

    model: TorchModel
    tokenizer: Any
    meta: ModelMeta
    process: ProcessSettings | None
    attention: AttentionPlan
    family: ModelFamily | None
    weights: SafetensorsSource | None
    layerwise: bool


def load_checkpoint(
    request: ModelRequest, *, family: str | None, fuse_attention: bool, opset: int | None
) -> Loaded:
    """The model ``request`` asks for (the module docstring); ExportError saying why it cannot load."""
    checkpoint, step = request.checkpoint, request.step
    try:
        weights = SafetensorsSource(checkpoint) if SafetensorsSource.present(checkpoint) else None
        if step is not None:
            refuse_process_family(checkpoint)
        entry = None if step else outcome_family(checkpoint, family, request.trust_remote_code)
        head = request.head
        if entry is not None and entry.head == "lm_logit" and (head is None or head.lm_logit is None):
            flags = " ".join(entry.flags)
            raise ValueError(f"{entry.title} is read at one token of its LM head: pass {flags}")
        layout = checkpoint_family(checkpoint)
        chosen = attention.plan(layout, fuse=fuse_attention, opset=opset, default_opset=DEFAULT_OPSET)
        # Remote code, named heads (models/named_heads.py) and renamed weights load whole.
        layerwise = (
            layout == "decoder"
            and weights is not None
            and own_names(weights)
            and not request.trust_remote_code
        )
        model, tokenizer, meta, process, chosen = _load(request, chosen, layerwise)
    except (OSError, ValueError) as exc:
        what = "a process reward model" if step else "a reward model"
        raise ExportError(f"cannot load {checkpoint} as {what}: {exc}") from exc
    # A named head loads whole.
    layerwise = layerwise and getattr(model, "named_head", None) is None
    return Loaded(model, tokenizer, meta, process, chosen, entry, weights, layerwise)


def load_whole(request: ModelRequest, loaded: Loaded) -> Loaded:
    """``loaded`` again with the whole model in memory (tracing needs it); as it was if it is whole."""
    if not loaded.layerwise:
        return loaded
    model, tokenizer, meta, process, chosen = _load(request, loaded.attention, layerwise=False)
    return replace(
        loaded,
        model=model,
        tokenizer=tokenizer,
        meta=meta,
        process=process,
        attention=chosen,
        layerwise=False,
    )


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


def load_model(
    request: ModelRequest, attn: str | None, layerwise: bool = False
) -> tuple[TorchModel, Any, ModelMeta, ProcessSettings | None]:
    """The torch model to export: one score per item, or (``step``) a value per token."""
    step = request.step
    if step is None:
        loaded = load_score_model(
            request.checkpoint,
            attn_implementation=attn,
            trust_remote_code=request.trust_remote_code,
            head=request.head,
            layerwise=layerwise,
        )
        return (*loaded, None)
    return load_step_model(
        request.checkpoint,
        layerwise=layerwise,
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
    request: ModelRequest, chosen: AttentionPlan, layerwise: bool
) -> tuple[TorchModel, Any, ModelMeta, ProcessSettings | None, AttentionPlan]:
    """The model with the attention the plan asks for; without an SDPA path, unfused and why."""
    try:
        return (*load_model(request, chosen.implementation, layerwise), chosen)
    except ValueError as exc:
        if not chosen.fused or "scaled_dot_product_attention" not in str(exc):
            raise
    fallback = attention.unfused(DEFAULT_OPSET, "the model has no PyTorch SDPA attention path to fuse")
    return (*load_model(request, fallback.implementation, layerwise), fallback)
