"""Outcome heads that are not transformers' ``score`` layer, read from the checkpoint's own weights.

Each form puts a head on a decoder body's last real token, as its authors' code reads it:

* ``value_head``: one linear layer to one output under another name, with or without a bias. OpenRLHF's
  ``train_rm`` saves ``architectures: ["RewardModel"]`` and names the layer in ``value_head_prefix``
  (OpenRLHF/OpenRLHF ``openrlhf/models/model.py``, ``_get_reward_model``: ``nn.Linear(hidden, 1,
  bias=False)`` read at the last position whose attention mask is 1); other checkpoints name theirs
  ``v_head``, ``value_head`` or ``regression_layer`` (``rmserve export --value-head NAME``);
* ``mlp_score``: ``score = Sequential(Linear(h, h), ReLU(), Linear(h, 1))``, the head of
  ``INFORMForSequenceClassification`` (INF-ORM-Llama3.1-70B's card defines the class);
* ``lm_logit``: a causal LM scored by the logit of one token at the next position (the
  Llama-3.1-Nemotron-70B-Reward-HF card: ``generate(max_new_tokens=1, output_scores=True)``,
  ``scores[0][0][0]``, the logit of token id 0); only that row of the LM head is kept, so no
  ``[.., vocab]`` tensor is ever built.

The body loads as transformers' own model for the checkpoint's ``model_type`` with its loading
info: a weight of the body that is missing, or a weight that is neither the body's nor the head's
(nor a causal LM's ``lm_head``, which the reward does not read), fails the load naming it, so no
layer is ever randomly initialised. OpenRLHF's ``mean``/``std``
(config.json) normalise the reward as its ``--reward.normalize_enable`` does, ``(r - mean) / std``,
only when asked (``rmserve export --normalize``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

NamedHeadForm = Literal["value_head", "mlp_score", "lm_logit", "gating"]
OPENRLHF_RM = "RewardModel"
MLP_SCORE_ARCHITECTURES = frozenset({"INFORMForSequenceClassification"})
GATING_ARCHITECTURE = "LlamaForRewardModelWithGating"
# A causal LM's own head, saved beside a value head and never read by the reward.
UNREAD_LM_HEAD = "lm_head."


@dataclass(frozen=True)
class HeadRequest:
    """What ``rmserve export`` asks of the head: a value head by name (``--value-head``), a causal LM
    read at one token's logit (``--lm-logit``), OpenRLHF's normalisation (``--normalize``)."""

    value_head: str | None = None
    lm_logit: int | None = None
    normalize: bool = False


@dataclass(frozen=True)
class NamedHead:
    """The head a checkpoint has: its form, the prefix of its weights, the token an LM head is read at,
    and the (mean, std) the reward is normalised with, if it is."""

    form: NamedHeadForm
    prefix: str
    token_id: int | None = None
    normalize: tuple[float, float] | None = None
    # A gating head's: the ids whose last occurrence marks the prompt end, and its objectives' names.
    gate_pattern: tuple[int, ...] | None = None
    components: tuple[str, ...] | None = None

    @property
    def unread(self) -> tuple[str, ...]:
        """Prefixes of the checkpoint's weights that are not the body's: the head's, and what it leaves
        unread (a causal LM's ``lm_head``)."""
        extra = ("gating.", "reward_transform_matrix") if self.form == "gating" else ()
        return (self.prefix + ".", UNREAD_LM_HEAD, *extra)

    def as_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"form": self.form, "weights": self.prefix}
        if self.token_id is not None:
            out["token_id"] = self.token_id
        if self.gate_pattern is not None:
            out["gate_pattern"] = list(self.gate_pattern)
        if self.components is not None:
            out["components"] = list(self.components)
        if self.normalize is not None:
            out["normalize"] = {"mean": self.normalize[0], "std": self.normalize[1]}
        return out


def architecture_of(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    return str(archs[0]) if archs else ""


def named_head(config: Any, request: HeadRequest | None) -> NamedHead | None:
    """The named head ``config`` and ``request`` call for; None for a stock ``*ForSequenceClassification``.
    ValueError names an architecture or a request rmserve does not serve."""
    request = request or HeadRequest()
    arch = architecture_of(config)
    if request.value_head is not None and request.lm_logit is not None:
        raise ValueError("--value-head and --lm-logit name two different heads; give one")
    normalize = _normalization(config, arch) if request.normalize else None
    if request.lm_logit is not None:
        if not arch.endswith("ForCausalLM"):
            raise ValueError(f"--lm-logit reads a causal LM's head; {arch or '(no architecture)'} is not one")
        if getattr(config, "final_logit_softcapping", None):
            raise ValueError("--lm-logit: a soft-capped LM head (Gemma-2) is not exported")
        return NamedHead("lm_logit", "lm_head", token_id=request.lm_logit, normalize=normalize)
    if request.value_head is not None:
        return NamedHead("value_head", request.value_head, normalize=normalize)
    if arch == OPENRLHF_RM:
        prefix = str(getattr(config, "value_head_prefix", "score"))
        return NamedHead("value_head", prefix, normalize=normalize)
    if arch in MLP_SCORE_ARCHITECTURES:
        return NamedHead("mlp_score", "score", normalize=normalize)
    if arch == GATING_ARCHITECTURE:
        if normalize is not None:
            raise ValueError("--normalize applies OpenRLHF's mean/std, not a gating head's")
        return NamedHead("gating", "regression_layer")
    if normalize is not None:
        raise ValueError(
            "--normalize applies OpenRLHF's mean/std; this checkpoint is not an OpenRLHF RewardModel"
        )
    return None


def _normalization(config: Any, arch: str) -> tuple[float, float]:
    mean, std = getattr(config, "mean", None), getattr(config, "std", None)
    if mean is None or std is None:
        raise ValueError(
            f"--normalize needs the reward's mean and std in config.json (OpenRLHF's train_rm writes them); "
            f"this {arch or 'checkpoint'} has {'neither' if mean is None and std is None else 'only one'}"
        )
    if float(std) <= 0:
        raise ValueError(f"config.json's std is {std}; normalising divides by it")
    return float(mean), float(std)


class Normalized(nn.Module):
    """A head's reward as OpenRLHF normalises it: ``(r - mean) / std``, in float32."""

    def __init__(self, head: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("mean", torch.tensor([mean], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([std], dtype=torch.float32))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.head(hidden).float() - self.mean) / self.std


class BodyWithHead(nn.Module):
    """A decoder body and a named head, shaped as ``ScoreModel`` reads a sequence classifier:
    ``base_model`` (the body), ``score`` (the head: hidden -> ``[rows, 1]``) and ``config``."""

    def __init__(self, body: nn.Module, score: nn.Module) -> None:
        super().__init__()
        self.model = body
        self.score = score
        self.config: Any = getattr(body, "config", None)

    @property
    def base_model(self) -> nn.Module:
        return self.model


def checkpoint_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors weights named ``prefix.<rest>``, in float32, keyed
    by ``<rest>`` (models/lean/source.py reads them)."""
    from rmserve.models.lean.source import SafetensorsSource, tensors_under

    if not SafetensorsSource.present(path):
        return {}  # the head's checks name the tensors it lacks
    return tensors_under(SafetensorsSource(path), prefix)


def load_body(path: Path, config: Any, head: NamedHead, attn: str) -> nn.Module:
    """transformers' base model for ``config``, loaded with its loading info: ValueError naming the
    weights when a body weight is missing, or a weight is neither the body's nor the head's."""
    from transformers import AutoModel

    body, info = AutoModel.from_pretrained(
        path, config=config, dtype=torch.float32, attn_implementation=attn, output_loading_info=True
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{path} lacks body weights {', '.join(missing[:8])}: they would be random")
    foreign = sorted(k for k in info.get("unexpected_keys") or [] if not k.startswith(head.unread))
    if foreign:
        raise ValueError(
            f"{path} has weights that are neither its {type(body).__name__} body's nor its "
            f"{head.prefix!r} head's: {', '.join(foreign[:8])}"
        )
    if info.get("mismatched_keys"):
        raise ValueError(f"{path}: weights of the wrong shape: {sorted(info['mismatched_keys'])[:8]}")
    return body


def head_module(
    path: Path, config: Any, head: NamedHead, body: nn.Module, tokenizer: Any
) -> tuple[nn.Module, NamedHead]:
    """The head as a torch module (hidden -> ``[rows, 1]``; a gating head: models/gating_head.py), from
    the checkpoint's tensors, and the head as the manifest records it."""
    hidden = int(config.hidden_size)
    tensors = checkpoint_tensors(path, head.prefix)
    if head.form == "gating":
        from rmserve.models.gating_head import gating_head, objective_names

        gating = gating_head(path, config, tokenizer, tensors)
        names = objective_names(config, gating.regression.out_features)
        return gating, replace(head, gate_pattern=gating.pattern, components=names)
    if head.form == "lm_logit":
        module = _lm_row(config, tensors, body, head)
    elif head.form == "mlp_score":
        inner = int(tensors["0.weight"].shape[0]) if "0.weight" in tensors else hidden
        module = nn.Sequential(nn.Linear(hidden, inner), nn.ReLU(), nn.Linear(inner, 1))
        _load_exactly(module, tensors, path, head.prefix)
    else:
        has_bias = "bias" in tensors
        module = nn.Linear(hidden, 1, bias=has_bias)
        _load_exactly(module, tensors, path, head.prefix)
    if head.normalize is not None:
        return Normalized(module, *head.normalize), head
    return module, head


def _load_exactly(module: nn.Module, tensors: dict[str, torch.Tensor], path: Path, prefix: str) -> None:
    expected = set(module.state_dict())
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        what = "; ".join(
            part
            for part in (
                f"missing {', '.join(f'{prefix}.{k}' for k in missing)}" if missing else "",
                f"unexpected {', '.join(f'{prefix}.{k}' for k in extra)}" if extra else "",
            )
            if part
        )
        raise ValueError(f"{path}: the {prefix!r} head is not {_shape_words(module)}: {what}")
    for name, value in module.state_dict().items():
        if tuple(tensors[name].shape) != tuple(value.shape):
            raise ValueError(
                f"{path}: {prefix}.{name} has shape {tuple(tensors[name].shape)}, not {tuple(value.shape)} "
                f"({_shape_words(module)})"
            )
    module.load_state_dict(tensors)


def _shape_words(module: nn.Module) -> str:
    if isinstance(module, nn.Sequential):
        return "Linear, ReLU, Linear to one output"
    return "one linear layer to one output"


def _lm_row(config: Any, tensors: dict[str, torch.Tensor], body: nn.Module, head: NamedHead) -> nn.Module:
    """Row ``token_id`` of the LM head (the input embeddings' row when the two are tied)."""
    assert head.token_id is not None
    if "weight" in tensors:
        full = tensors["weight"]
    elif getattr(config, "tie_word_embeddings", False):
        full = body.get_input_embeddings().weight.detach()
    else:
        raise ValueError("the checkpoint has no lm_head.weight and does not tie it to its embeddings")
    vocab = int(full.shape[0])
    if not 0 <= head.token_id < vocab:
        raise ValueError(f"--lm-logit {head.token_id} is not a token id of the LM head (0 .. {vocab - 1})")
    row = nn.Linear(int(full.shape[1]), 1, bias="bias" in tensors)
    with torch.no_grad():
        row.weight.copy_(full[head.token_id : head.token_id + 1])
        if "bias" in tensors:
            assert row.bias is not None
            row.bias.copy_(tensors["bias"][head.token_id : head.token_id + 1])
    return row
