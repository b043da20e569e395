"""Reward heads: a Hugging Face sequence-classification checkpoint as ``scores = f(ids, mask)``.

``ScoreModel`` is the one definition of "the score of an item" on the torch side: training
optimizes it, the exporter traces it to ONNX and parity compares the ONNX graph against it.
Pooling is explicit (not left to each architecture's head) so that it is correct under left and
right padding and so the exported graph takes only ``input_ids``/``attention_mask``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from rmserve.bundle import ENCODER_POOLINGS, Pooling
from rmserve.models.gating_head import GatingHead
from rmserve.models.named_heads import (
    BodyWithHead,
    HeadRequest,
    NamedHead,
    head_module,
    load_body,
    named_head,
)

Family = Literal["encoder", "decoder"]

# Families we export and test; anything else falls back on the head's attribute name below.
ENCODER_TYPES = frozenset(
    {"bert", "deberta-v2", "deberta", "roberta", "xlm-roberta", "distilbert", "electra"}
)
# gemma3: Gemma-3's image-text class, whose text decoder (``text_body``) is scored.
DECODER_TYPES = frozenset(
    {"llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "mistral", "phi3"}
)

# Decoders are loaded with eager attention unless the caller asks for another implementation
# (the exporter asks for "sdpa" to get a fused Attention op per layer: models/attention.py).
# Gemma2 has no sdpa path at all (logit softcapping).
DECODER_ATTENTION = "eager"


def family_of(config: Any) -> Family:
    """Encoder or decoder, from the config's model_type (or, failing that, its head's name)."""
    model_type = getattr(config, "model_type", "")
    if model_type in ENCODER_TYPES:
        return "encoder"
    if model_type in DECODER_TYPES:
        return "decoder"
    # Decoder sequence-classification heads in transformers are called ``score``.
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or any("CausalLM" in a for a in archs):
        return "decoder"
    raise ValueError(f"cannot tell whether model_type {model_type!r} is an encoder or a decoder")


def pooling_of(config: Any) -> Pooling:
    """The pooling a checkpoint was trained with: ``rmserve_pooling`` in config.json, else the default."""
    if family_of(config) == "decoder":
        return "last_token"
    chosen = getattr(config, "rmserve_pooling", None) or "cls"
    if chosen not in ENCODER_POOLINGS:
        raise ValueError(
            f"rmserve_pooling must be one of {', '.join(ENCODER_POOLINGS)} for an encoder, not {chosen!r}"
        )
    if chosen == "mean_response" and not uses_token_type_ids(config):
        raise ValueError(
            "mean_response pooling needs segment ids (a BERT-style encoder with type_vocab_size > 0)"
        )
    return cast(Pooling, chosen)


def uses_token_type_ids(config: Any) -> bool:
    """BERT-style encoders embed segment ids; DeBERTa-v2 (type_vocab_size 0) and decoders do not."""
    return family_of(config) == "encoder" and int(getattr(config, "type_vocab_size", 0) or 0) > 0


def text_body(base: Any) -> Any:
    """The decoder that reads the token ids: ``base`` itself, or the ``language_model`` of an image-text
    model (Gemma-3's ``Gemma3Model``: a vision tower and projector beside ``language_model``, which for
    text alone embeds the ids and runs its layers, transformers models/gemma3/modeling_gemma3.py)."""
    return getattr(base, "language_model", None) or base


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token; right under left padding, right padding and none."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device, dtype=torch.long)
    return (positions.unsqueeze(0) * attention_mask.long()).amax(dim=1)


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift a row's positions."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class ScoreModel(nn.Module):
    """One float32 reward per row of a padded batch."""

    def __init__(self, hf_model: nn.Module, pooling: Pooling, family: Family) -> None:
        super().__init__()
        # Any: the HF model's heads (classifier/score) and base_model are looked up by name.
        self.hf_model: Any = hf_model
        if family == "decoder" and pooling != "last_token":
            raise ValueError("a decoder reward model pools its last token")
        if family == "encoder" and pooling not in ENCODER_POOLINGS:
            raise ValueError(f"an encoder pools {', '.join(ENCODER_POOLINGS)}, not {pooling!r}")
        self.pooling = pooling
        self.family = family
        # A head other than transformers' ``score`` layer (models/named_heads.py), as the manifest says.
        self.named_head: NamedHead | None = None

    @property
    def body(self) -> Any:
        """The transformer under the head (``hf_model.base_model``; an image-text model's text decoder),
        whose config is the model's (the text decoder's)."""
        return text_body(self.hf_model.base_model)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.pooling == "cls":
            return self._cls(input_ids, attention_mask, token_type_ids)
        if self.pooling == "mean":
            return self._mean(input_ids, attention_mask, token_type_ids)
        if self.pooling == "mean_response":
            if token_type_ids is None:
                raise ValueError("mean_response pooling needs token_type_ids (the response is segment 1)")
            return self._mean(input_ids, attention_mask, token_type_ids, only_segment=1)
        return self._last_token(input_ids, attention_mask)

    def _encoder_kwargs(
        self, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return kwargs

    def _cls(self, input_ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
        # The checkpoint's own head (BERT: pooler + classifier; DeBERTa: ContextPooler + classifier).
        logits = self.hf_model(input_ids=input_ids, **self._encoder_kwargs(mask, types)).logits
        return logits[:, 0].float()

    def _mean(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        types: torch.Tensor | None,
        only_segment: int | None = None,
    ) -> torch.Tensor:
        base = self.hf_model.base_model
        hidden = base(input_ids=input_ids, **self._encoder_kwargs(mask, types)).last_hidden_state
        keep = mask if only_segment is None or types is None else mask * (types == only_segment)
        weights = keep.to(hidden.dtype).unsqueeze(-1)
        # clamp: an all-padding row (never served, but possible in a batch) gives 0, not NaN.
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.hf_model.classifier(pooled)[:, 0].float()

    def _last_token(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        base = self.hf_model.base_model
        hidden = base(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids_of(mask),
            use_cache=False,
        ).last_hidden_state
        last = _rows(hidden, last_token_index(mask))
        head = self.hf_model.score
        if isinstance(head, GatingHead):  # also reads the prompt end (models/gating_head.py)
            return head(last, _rows(hidden, head.prompt_end(input_ids).clamp(min=0))).float()
        return head(last)[:, 0].float()


def _rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``hidden[b, index[b]]`` for each row b: ``[batch, hidden]``."""
    return hidden.gather(1, index.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)


def base_model_of(checkpoint: Path) -> str:
    """The hub name config.json records, if any; else the checkpoint's directory name.

    (transformers fills ``config._name_or_path`` with the path it loaded from, which would put
    a local path into the manifest, so the saved file is read instead.)
    """
    try:
        recorded = json.loads((checkpoint / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, str) and recorded and not Path(recorded).is_absolute():
        return recorded
    return checkpoint.resolve().name


@dataclass(frozen=True)
class ModelMeta:
    """What the exporter needs to know about a checkpoint besides its weights."""

    family: Family
    pooling: Pooling
    model_type: str
    architecture: str
    base_model: str
    pad_token_id: int
    uses_token_type_ids: bool
    max_position_embeddings: int | None
    num_layers: int | None = None


def load_score_model(
    checkpoint_dir: str | Path,
    *,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    head: HeadRequest | None = None,
    layerwise: bool = False,
) -> tuple[ScoreModel, Any, ModelMeta]:
    """Load a num_labels=1 checkpoint (or one with a named head: models/named_heads.py) as an fp32
    ScoreModel in eval mode, with its tokenizer and meta.

    Every weight of the class built must come from the checkpoint and every checkpoint weight must be
    used, and the class built must be the one config.json declares (``strict_load``): transformers
    would otherwise build a missing head with random weights and only log a warning.
    A tokenizer without a pad token (most decoders) pads with EOS; pooling reads the attention
    mask, never the pad id, so that choice cannot change a score. ``layerwise`` (a decoder saved as
    safetensors): the same float32 model, its layers' weights read for each forward and dropped after
    (models/layerwise.py), so it holds one layer at a time.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(checkpoint_dir)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    named = named_head(config, head)
    if named is not None:
        return _load_named(path, config, named, attn_implementation)
    if int(getattr(config, "num_labels", 1)) != 1:
        raise ValueError(f"{path} has num_labels={config.num_labels}; a reward model has exactly one")
    family = family_of(config)
    tokenizer = load_tokenizer(path)
    config.pad_token_id = tokenizer.pad_token_id
    attn = attn_implementation or (DECODER_ATTENTION if family == "decoder" else None)
    extra = {"attn_implementation": attn} if attn else {}
    if layerwise:
        from rmserve.models.layerwise import layerwise_model
        from rmserve.models.lean.source import SafetensorsSource

        source = SafetensorsSource(path)
        hf_model = layerwise_model(
            AutoModelForSequenceClassification,
            config,
            source,
            attn,
            check=lambda built, info: check_loading(path, built, info),
        )
    else:
        hf_model = strict_load(
            AutoModelForSequenceClassification,
            path,
            config=config,
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
            **extra,
        )
    model = ScoreModel(hf_model, pooling_of(config), family).eval()
    return model, tokenizer, model_meta(model, base_model_of(path), int(tokenizer.pad_token_id))


def _load_named(
    path: Path, config: Any, named: NamedHead, attn_implementation: str | None
) -> tuple[ScoreModel, Any, ModelMeta]:
    if family_of(config) != "decoder":
        raise ValueError(f"a {named.form} head sits on a decoder; {config.model_type} is an encoder")
    tokenizer = load_tokenizer(path)
    config.pad_token_id = tokenizer.pad_token_id
    body = load_body(path, config, named, attn_implementation or DECODER_ATTENTION)
    head, named = head_module(path, config, named, body, tokenizer)
    model = ScoreModel(BodyWithHead(body, head), "last_token", "decoder").eval()
    model.named_head = named
    return model, tokenizer, model_meta(model, base_model_of(path), int(tokenizer.pad_token_id))


class LoadingError(ValueError):
    """The checkpoint does not load as exactly what it declares: weights missing or unused, another
    class built, or weights that cannot be read."""


def strict_load(auto: Any, path: Path, **kwargs: Any) -> Any:
    """``auto.from_pretrained(path)`` with its loading info checked: a weight the class needs and the
    checkpoint lacks (it would be random), a checkpoint weight the class does not use (a head it cannot
    express), a shape mismatch, or a class other than config.json's ``architectures[0]`` raises
    LoadingError naming them."""
    try:
        model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise LoadingError(f"cannot read the weights of {path}: {exc}") from None
    except Exception as exc:  # safetensors' own error type on a corrupt file
        if type(exc).__name__ != "SafetensorError":
            raise
        raise LoadingError(f"cannot read the weights of {path}: {exc}") from None
    check_loading(path, model, info)
    return model


def check_loading(path: Path, model: Any, info: dict[str, Any]) -> None:
    """LoadingError naming what ``info`` (transformers' loading info) reports missing, unused or
    mismatched, or a class built other than config.json's ``architectures[0]``."""
    problems = []
    for key, what in (
        ("missing_keys", "missing from the checkpoint (transformers would initialise them randomly)"),
        ("unexpected_keys", "in the checkpoint but not used by the class built"),
        ("mismatched_keys", "of another shape than the class built"),
    ):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            problems.append(f"weights {what}: {shown}")
    declared = (getattr(model.config, "architectures", None) or [None])[0]
    built = type(model).__name__
    if declared and declared != built:
        problems.append(f"config.json declares {declared}, but transformers built {built}")
    if problems:
        raise LoadingError(f"{path} does not load as it declares: " + "; ".join(problems))


def load_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer, padding with EOS when it has no pad token (most decoders); pooling
    and step positions read the attention mask, never the pad id, so that choice changes no score."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{path}: the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_meta(model: ScoreModel, base_model: str, pad_token_id: int) -> ModelMeta:
    """What the exporter needs to know about ``model``, read from its config."""
    config = model.hf_model.config
    archs = getattr(config, "architectures", None) or [type(model.hf_model).__name__]
    return ModelMeta(
        family=model.family,
        pooling=model.pooling,
        model_type=config.model_type,
        architecture=archs[0],
        base_model=base_model,
        pad_token_id=pad_token_id,
        uses_token_type_ids=uses_token_type_ids(config),
        max_position_embeddings=getattr(model.body.config, "max_position_embeddings", None),
        num_layers=getattr(model.body.config, "num_hidden_layers", None),
    )


def checkpoint_family(checkpoint_dir: str | Path) -> Family:
    """Encoder or decoder, from the checkpoint's config alone (no weights are read)."""
    from transformers import AutoConfig

    return family_of(AutoConfig.from_pretrained(Path(checkpoint_dir)))
