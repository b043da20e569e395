"""Loading a process reward checkpoint as a float32 ``StepModel`` (models/process_heads.py).

Each head form (``head_form``) becomes a decoder body and a projection to the head's label logits:

* ``token_classification``: transformers' ``*ForTokenClassification``; its body and its ``score``
  (or ``classifier``) layer;
* ``lm_head``: a causal LM's body and the two rows of its LM head at the label tokens (the input
  embeddings' rows where the two are tied and the checkpoint has no ``lm_head.weight``);
* ``qwen2_prm``: transformers' base model for the body (the checkpoint's ``model.*``) and
  Qwen2.5-Math-PRM's ``score.0``/``score.2`` head built here;
* ``value_head``: the base model for the body and Skywork-o1's ``v_head.summary`` linear layer.

Whole, the body comes from ``from_pretrained``. Layer by layer (``layerwise``: a decoder saved as
safetensors), it is transformers' same class built by models/layerwise.py, each layer's float32
weights read from the checkpoint for each forward and dropped after; a body weight the checkpoint
lacks, or one of another shape, fails the load naming it. Either way the heads' weights are read
from the checkpoint's safetensors (models/lean/source.py) or from the loaded model, in float32, so
the two load the same float32 numbers into the same modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from rmserve.bundle import HeadForm, ProcessSettings, StepLayout, StepRule
from rmserve.models.heads import DECODER_ATTENTION, ModelMeta, base_model_of, family_of, load_tokenizer
from rmserve.models.lean.source import (
    SafetensorsSource,
    TensorSource,
    body_prefix,
    float32_tensors,
    within,
)
from rmserve.models.process_heads import (
    DEFAULT_LABEL_TOKENS,
    DEFAULT_STEP_TOKEN,
    QWEN2_PRM,
    VALUE_HEAD,
    StepHead,
    StepModel,
    default_rule,
    head_form,
    single_token,
    step_marker,
)


def load_step_model(
    checkpoint_dir: str | Path,
    *,
    step_token: str = DEFAULT_STEP_TOKEN,
    rule: StepRule | None = None,
    label_tokens: Sequence[str] = DEFAULT_LABEL_TOKENS,
    attn_implementation: str | None = None,
    layout: StepLayout = "joint",
    prompt_suffix: str = "",
    before_token: str = "",
    between_steps: str = "",
    layerwise: bool = False,
) -> tuple[StepModel, Any, ModelMeta, ProcessSettings]:
    """Load a process reward checkpoint as an fp32 ``StepModel`` in eval mode, with its tokenizer,
    meta and the process settings its bundle records. ``layerwise`` (a decoder saved as safetensors):
    the same float32 model, its body's layers read for each forward (the module docstring).
    ValueError says what does not fit."""
    from transformers import AutoConfig

    path = Path(checkpoint_dir)
    config = AutoConfig.from_pretrained(path)
    if family_of(config) != "decoder":
        raise ValueError("a process reward model must be a decoder (its step values are read causally)")
    head = head_form(config)
    tokenizer = load_tokenizer(path)
    config.pad_token_id = tokenizer.pad_token_id
    token_id, separator_ids = step_marker(tokenizer, step_token, layout)
    if prompt_suffix and layout == "joint":
        raise ValueError("a prompt suffix applies to the separate and turns step layouts")
    if (before_token or between_steps) and layout != "joint":
        raise ValueError("text before the step token and between steps applies to the joint step layout")
    label_ids: tuple[int, int] | None = None
    if head == "lm_head":
        if len(label_tokens) != 2:
            raise ValueError(f"an LM-head PRM is read at two label tokens (+, -), not {list(label_tokens)}")
        pos_id, neg_id = (single_token(tokenizer, t, "label token") for t in label_tokens)
        label_ids = (pos_id, neg_id)
    attn = attn_implementation or DECODER_ATTENTION
    source = SafetensorsSource(path) if layerwise else None
    body, projection, labels = _body_and_projection(path, config, head, attn, label_ids, source)
    chosen = rule or default_rule(head, labels)
    # The projection's outputs: (negative, positive) for 2 labels, as transformers' label order is.
    positive, negative = (1, 0) if labels == 2 else (0, None)
    softcap = getattr(config, "final_logit_softcapping", None) if head == "lm_head" else None
    model = StepModel(body, StepHead(projection, chosen, positive, negative, softcap)).eval()
    settings = ProcessSettings(
        step_token=step_token,
        step_token_id=token_id,
        head=head,
        rule=chosen,
        # An LM head's labels are the token ids it is read at; a classifier's, label indices.
        positive_label=label_ids[0] if label_ids else positive,
        negative_label=label_ids[1] if label_ids else negative,
        label_tokens=(label_tokens[0], label_tokens[1]) if label_ids else None,
        layout=layout,
        separator_ids=separator_ids,
        prompt_suffix=prompt_suffix,
        before_token=before_token,
        between_steps=between_steps,
    )
    archs = getattr(config, "architectures", None) or [type(body).__name__]
    meta = ModelMeta(
        family="decoder",
        pooling="step",
        model_type=config.model_type,
        architecture=archs[0],
        base_model=base_model_of(path),
        pad_token_id=int(tokenizer.pad_token_id),
        uses_token_type_ids=False,
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        num_layers=getattr(config, "num_hidden_layers", None),
    )
    return model, tokenizer, meta, settings


def _body_and_projection(
    path: Path,
    config: Any,
    head: HeadForm,
    attn: str,
    label_ids: tuple[int, int] | None,
    source: TensorSource | None,
) -> tuple[nn.Module, nn.Module, int]:
    """(body, projection to the label logits, number of labels); an LM head's two label rows are
    ordered (negative, positive) like a classifier's labels. ``source``: the body layer by layer."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    if head == "token_classification":
        labels = int(getattr(config, "num_labels", 2))
        if labels not in (1, 2):
            raise ValueError(f"{path} has num_labels={labels}; a token-classification PRM has 1 or 2")
        if source is None:
            hf = AutoModelForTokenClassification.from_pretrained(
                path, config=config, dtype=torch.float32, attn_implementation=attn
            )
        else:
            hf = _layerwise(AutoModelForTokenClassification, path, config, source, attn)
        projection = getattr(hf, "score", None) or hf.classifier
        return hf.base_model, projection, labels
    if source is not None:
        from transformers import AutoModel

        body = _layerwise(AutoModel, path, config, within(source, body_prefix(source)), attn)
    elif head == "lm_head":
        lm = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=torch.float32, attn_implementation=attn
        )
        full = lm.get_output_embeddings()
        bias = None if full.bias is None else full.bias.detach()
        return lm.base_model, _label_rows(full.weight.detach(), bias, label_ids), 2
    else:
        body = _body(path, config, attn)
    # The heads' few tensors, read whole.
    heads = source if source is not None else _safetensors(path)
    if head == "value_head":
        return body, _value_head(path, config, heads), 1
    if head == "qwen2_prm":
        return body, _qwen2_prm_projection(path, config, heads), 2
    assert source is not None
    weight, bias = _lm_head_weights(path, config, body, source)
    return body, _label_rows(weight, bias, label_ids), 2


def _layerwise(auto: Any, path: Path, config: Any, source: TensorSource, attn: str) -> nn.Module:
    """``auto``'s class for ``config``, its layers read from ``source`` for each forward
    (models/layerwise.py); ValueError naming a weight the class needs that ``source`` lacks or holds
    in another shape (the checkpoint's other weights, a head's, are not the class's to read)."""
    from rmserve.models.layerwise import layerwise_model

    def check(built: Any, info: dict[str, list[Any]]) -> None:
        if info["missing_keys"]:
            raise ValueError(f"{path} lacks body weights: {', '.join(info['missing_keys'][:5])}")
        if info["mismatched_keys"]:
            raise ValueError(f"{path}: weights of the wrong shape: {info['mismatched_keys'][:5]}")

    return cast(nn.Module, layerwise_model(auto, config, source, attn, check=check))


def _body(path: Path, config: Any, attn: str) -> nn.Module:
    """The decoder body under a head transformers has no class for, from the checkpoint's ``model.*``
    weights; a body weight missing from the checkpoint fails the load naming it (never random)."""
    from transformers import AutoModel

    body, info = AutoModel.from_pretrained(
        path, config=config, dtype=torch.float32, output_loading_info=True, attn_implementation=attn
    )
    if info["missing_keys"]:
        raise ValueError(f"{path} lacks body weights: {', '.join(sorted(info['missing_keys'])[:5])}")
    return cast(nn.Module, body)


def _safetensors(path: Path) -> TensorSource | None:
    return SafetensorsSource(path) if SafetensorsSource.present(path) else None


def _head_tensors(
    path: Path, source: TensorSource | None, wanted: set[str], what: str
) -> dict[str, torch.Tensor]:
    """The named tensors in float32; ValueError naming any the checkpoint's safetensors lack."""
    missing = sorted(wanted - (source.names() if source is not None else frozenset()))
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)}: not a {what} checkpoint in safetensors")
    assert source is not None
    return float32_tensors(source, sorted(wanted))


def _qwen2_prm_projection(path: Path, config: Any, source: TensorSource | None) -> nn.Module:
    """The Qwen2.5-Math-PRM head (Linear, ReLU, Linear), from the checkpoint's ``score.0``/``score.2``."""
    hidden = int(config.hidden_size)
    mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    wanted = {f"score.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    found = _head_tensors(path, source, wanted, QWEN2_PRM)
    mlp.load_state_dict({k.removeprefix("score."): v for k, v in found.items()})
    return cast(nn.Module, mlp)


def _value_head(path: Path, config: Any, source: TensorSource | None) -> nn.Module:
    """A value head ``Linear(hidden, 1)`` with its bias, from the checkpoint's ``v_head.summary.*``."""
    linear = nn.Linear(int(config.hidden_size), 1)
    wanted = {f"{VALUE_HEAD}.weight", f"{VALUE_HEAD}.bias"}
    found = _head_tensors(path, source, wanted, "value-head PRM")
    linear.load_state_dict({k.removeprefix(VALUE_HEAD + "."): v for k, v in found.items()})
    return linear


def _lm_head_weights(
    path: Path, config: Any, body: nn.Module, source: TensorSource
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A causal LM's head as transformers loads it: the checkpoint's ``lm_head.weight`` where it has
    one, else (``tie_word_embeddings``) the input embeddings (transformers' ``tie_weights`` ties to
    whichever of the two the checkpoint holds)."""
    names = [n for n in ("lm_head.weight", "lm_head.bias") if n in source.names()]
    found = float32_tensors(source, names)
    bias = found.get("lm_head.bias")
    if "lm_head.weight" in found:
        return found["lm_head.weight"], bias
    if getattr(config, "tie_word_embeddings", False):
        return cast(Any, body).get_input_embeddings().weight.detach(), bias
    raise ValueError(f"{path} has no lm_head.weight and does not tie it to its input embeddings")


def _label_rows(
    weight: torch.Tensor, bias: torch.Tensor | None, label_ids: tuple[int, int] | None
) -> nn.Module:
    """Only the LM head's two label rows, (negative, positive): the graph never holds a [.., vocab]
    tensor."""
    assert label_ids is not None
    order = [label_ids[1], label_ids[0]]
    rows = nn.Linear(int(weight.shape[1]), 2, bias=bias is not None)
    with torch.no_grad():
        rows.weight.copy_(weight[order])
        if bias is not None:
            rows.bias.copy_(bias[order])
    return rows
