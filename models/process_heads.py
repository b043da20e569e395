"""Process reward heads: a decoder checkpoint as ``step values = f(ids, mask)``, one value per token.

A process reward model (PRM) scores each step of a solution at the token that ends it (the step
token). ``StepModel`` is the torch-side definition of those values: a decoder body's last hidden
states through a ``StepHead``, which projects them to the head's label logits and applies the rule
that makes a step's reward of them, so the exported graph emits ``[batch, length]`` floats (never a
``[batch, length, vocab]`` tensor) and the server reads the step-token positions.

Head forms (``ProcessSettings.head``), each with a default rule:

* ``token_classification``: transformers' ``*ForTokenClassification`` decoders (Qwen2, Llama,
  Qwen3, ...), 2 labels (label 1 positive; default ``positive_prob``) or 1 label (default ``sigmoid``);
* ``qwen2_prm``: the Qwen2.5-Math-PRM head, two linear layers around a ReLU over a Qwen2 body, 2 labels
  (default ``positive_prob``). transformers has no ``Qwen2ForProcessRewardModel``: the checkpoints ship
  it as remote code (their ``modeling_qwen2_rm.py``), which rmserve does not run. Their weights are
  plain (``model.*``, ``score.0.*``, ``score.2.*``), so the body loads as transformers' ``Qwen2Model``
  and this module builds the head itself;
* ``lm_head``: a causal LM read at two label tokens (Math-Shepherd: ``+`` and ``-``); only those two
  rows of the LM head are kept (default ``positive_prob``: softmax over the two);
* ``value_head``: a causal LM with a one-output value head beside it, Skywork-o1-Open-PRM's
  ``Qwen2ForPrmModel`` (SkyworkAI/skywork-o1-prm-inference ``model_utils/prm_model.py``: ``ValueHead``,
  ``summary = nn.Linear(hidden_size, 1)`` on the last hidden states, saved as ``v_head.summary.*`` beside
  the causal LM's ``model.*``; ``return_probs`` applies a sigmoid, the default rule here). The body loads
  as transformers' model for its ``model_type``; the head is read from the weights.

The step layout (``rmserve.layouts``) decides what the step token is: under ``joint`` one token of the
tokenizer, under ``separate`` any separator text (its ids are appended to each step), under ``turns``
the assistant's label after each step turn, one token.

The head is its own module, fed by any decoder body's hidden states, so another body (a lean graph
builder's) can feed it too. ``load_step_model`` (models/process_load.py) builds a ``StepModel`` from a
checkpoint, whole or layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rmserve.bundle import HeadForm, StepLayout, StepRule
from rmserve.models.heads import (
    position_ids_of,
)

DEFAULT_STEP_TOKEN = "<extra_0>"
DEFAULT_LABEL_TOKENS = ("+", "-")
QWEN2_PRM = "Qwen2ForProcessRewardModel"
# Skywork-o1-Open-PRM's remote class (its config.json), a causal LM and a ``v_head``.
VALUE_HEAD_PRMS = frozenset({"Qwen2ForPrmModel"})
VALUE_HEAD = "v_head.summary"


@dataclass(frozen=True)
class StepExport:
    """What ``rmserve export --step-token`` asks for: the step token, the rule (None: the head form's
    default) and, for an LM head, its two label tokens (positive, negative)."""

    step_token: str = DEFAULT_STEP_TOKEN
    rule: StepRule | None = None
    label_tokens: tuple[str, str] = DEFAULT_LABEL_TOKENS
    layout: StepLayout = "joint"
    prompt_suffix: str = ""
    before_token: str = ""
    between_steps: str = ""


class StepHead(nn.Module):
    """Hidden states ``[batch, length, hidden]`` -> step values ``[batch, length]`` in float32.

    ``projection`` maps a hidden state to the head's label logits; ``positive`` and ``negative`` index
    them. Rules: ``positive_prob`` p(+) = softmax over (+, -), written as sigmoid(l+ - l-) so the graph
    has no Softmax; ``prob_diff`` p(+) - p(-) = tanh((l+ - l-) / 2); ``sigmoid`` sigmoid(l+); ``raw`` l+.
    """

    def __init__(
        self,
        projection: nn.Module,
        rule: StepRule,
        positive: int,
        negative: int | None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        if rule in ("positive_prob", "prob_diff") and negative is None:
            raise ValueError(f"rule {rule!r} needs two labels; a 1-label head takes sigmoid or raw")
        self.projection = projection
        self.rule = rule
        self.positive = positive
        self.negative = negative
        self.softcap = softcap  # Gemma-style LM heads squash their logits before anything reads them

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.projection(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        pos = logits[..., self.positive]
        if self.rule == "sigmoid":
            return torch.sigmoid(pos)
        if self.rule == "raw":
            return pos
        assert self.negative is not None
        margin = pos - logits[..., self.negative]
        return torch.sigmoid(margin) if self.rule == "positive_prob" else torch.tanh(margin / 2)


class StepModel(nn.Module):
    """A decoder body and a ``StepHead``: one float32 value per token of a padded batch."""

    # The graph's output has a batch and a sequence axis (models/graph.py names them).
    output_axes = {0: "batch", 1: "sequence"}

    def __init__(self, body: nn.Module, head: StepHead) -> None:
        super().__init__()
        self.body: Any = body  # the transformer under the head, whose config is the model's
        self.head = head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,  # taken as a ScoreModel takes it; decoders have none
    ) -> torch.Tensor:
        hidden = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_of(attention_mask),
            use_cache=False,
        ).last_hidden_state
        return self.head(hidden)


def single_token(tokenizer: Any, text: str, what: str) -> int:
    """The id of ``text`` when the tokenizer reads it as exactly one token; ValueError naming it if not."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"the {what} {text!r} is not one token of the tokenizer (it reads as {len(ids)} tokens: {ids}); "
            "choose a token the tokenizer has, or add it to the tokenizer before export"
        )
    return int(ids[0])


def head_form(config: Any) -> HeadForm:
    """Which process head a checkpoint has, from its config's architecture."""
    archs = getattr(config, "architectures", None) or []
    arch = archs[0] if archs else ""
    if arch == QWEN2_PRM:
        return "qwen2_prm"
    if arch in VALUE_HEAD_PRMS:
        return "value_head"
    if arch.endswith("ForTokenClassification"):
        return "token_classification"
    if arch.endswith("ForCausalLM"):
        return "lm_head"
    raise ValueError(
        f"architecture {arch or '(none)'!r} is not a process reward model rmserve exports: it takes "
        f"*ForTokenClassification decoders (1 or 2 labels), {QWEN2_PRM}, "
        f"{', '.join(sorted(VALUE_HEAD_PRMS))} (a value head) and *ForCausalLM models read at two "
        "label tokens"
    )


def default_rule(head: HeadForm, labels: int) -> StepRule:
    return "sigmoid" if labels == 1 else "positive_prob"


def step_marker(tokenizer: Any, text: str, layout: StepLayout) -> tuple[int, tuple[int, ...] | None]:
    """(the id a step is read at, the separator's ids under ``separate``); ValueError when the layout
    needs one token and ``text`` is not one."""
    if layout == "separate":
        ids = tuple(int(i) for i in tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise ValueError(f"the step separator {text!r} tokenizes to nothing")
        return ids[-1], ids
    what = "assistant label (the reply after each step turn)" if layout == "turns" else "step token"
    return single_token(tokenizer, text, what), None


def process_format(
    step: StepExport | None, tokenizer: Any, input_format: str | None, bos_tokens: int | None
) -> tuple[str | None, int | None]:
    """The input format and BOS policy a process bundle's step layout asks for: ``separate`` reads
    plain text (no template, nothing between the prompt and its first step) with one BOS where the
    tokenizer has one (TRL's ``tokenize_row``); ``turns`` renders steps as chat turns, so it needs the
    chat template. ValueError when the asked input format contradicts the layout."""
    if step is None or step.layout == "joint":
        return input_format, bos_tokens
    if step.layout == "separate":
        if input_format not in (None, "plain"):
            raise ValueError("the separate step layout reads plain text; --input-format must be plain")
        has_bos = getattr(tokenizer, "bos_token_id", None) is not None
        return "plain", bos_tokens if bos_tokens is not None else (1 if has_bos else None)
    if input_format not in (None, "chat_template"):
        raise ValueError("the turns step layout renders each step as a chat turn; it needs chat_template")
    return "chat_template", bos_tokens
