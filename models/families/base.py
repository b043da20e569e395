"""What a model family is: how it is recognised, its head, its tokenization and its authors' usage.

A family is one declarative ``ModelFamily`` entry in one registry (``rmserve.models.families``), the way
Optimum keeps one export config per architecture: export picks the family from config.json alone (no
weights are read), loads its head form, decides the BOS policy from its reference, and parity compares
the served scores with its reference usage; docs/models.md is written from the same entries. Nothing
else branches on a family's name. A checkpoint no entry recognises is refused by name, never guessed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# How the authors turn a conversation into token ids (see ``reference.py`` for each one's code):
#   template+tokenizer:  tokenizer(apply_chat_template(conv, tokenize=False)), the tokenizer's defaults
#                        on the rendered text (the default);
#   template-bos+tokenizer: the same after stripping the rendered text's leading BOS (Skywork-Reward-V2);
#   text_pair:           tokenizer(question, answer), an encoder's sentence pair;
#   template:            the rendered text as it tokenizes, no special tokens added (apply_chat_template's
#                        own tokenize=True, OpenRLHF's serve_rm; models/families/heads.py).
Recipe = Literal["template+tokenizer", "template-bos+tokenizer", "text_pair", "template"]
Status = Literal["supported", "refused"]


@dataclass(frozen=True)
class Conversation:
    """One conversation of the fixed reference set, in OpenAI's message shape (as templates take it)."""

    name: str
    messages: tuple[Mapping[str, Any], ...]
    tools: tuple[Mapping[str, Any], ...] | None = None
    # Text the reference repeats into the first turn until the conversation is near max_length.
    fill: str | None = None


@dataclass(frozen=True)
class ReferenceSettings:
    """How the reference is run: remote code allowed or not, and the date templates see."""

    trust_remote_code: bool
    template_date: str
    max_length: int
    # ``--bos-tokens``: the recipe's token ids with their leading BOS replaced by exactly this many.
    bos_tokens: int | None = None
    # The checkpoint's class built with its decoder layers' weights read as each runs (models/layerwise.py),
    # so the reference holds one layer, not the model; its scores are the whole model's bit for bit.
    layerwise: bool = False


@dataclass(frozen=True)
class Reference:
    """The authors' usage on the fixed conversations: per conversation, the template's rendering, the
    token ids the model read and its fp32 score."""

    recipe: str
    # The conversations the authors' template refuses (name -> why): the server must refuse them too.
    refused: Mapping[str, str]
    conversations: tuple[Conversation, ...]
    rendered: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]
    scores: tuple[float, ...]


# The authors' usage: load the checkpoint their way, tokenize each conversation their way, score it.
ReferenceUsage = Callable[[Path, Sequence[Conversation], ReferenceSettings], Reference]


@dataclass(frozen=True)
class Recognition:
    """How a family is recognised from config.json: every field given must hold.

    ``architectures``: fnmatch patterns, one of which ``architectures[0]`` matches; ``model_types``:
    config's ``model_type`` is one of them; ``auto_map``: whether config.json may name remote classes
    (None: either way); ``config_keys``: keys config.json must have; ``names``: fnmatch patterns
    (case-insensitive) one of which the checkpoint's hub name (``_name_or_path``) or a directory of its
    path matches. An entry with ``names`` is more specific than one without and wins over it.
    """

    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    auto_map: bool | None = None
    config_keys: tuple[str, ...] = ()
    names: tuple[str, ...] = ()

    def mismatch(self, config: Mapping[str, Any]) -> str | None:
        """Why ``config`` is not this family's (None when it is), leaving ``names`` aside."""
        archs = config.get("architectures") or []
        arch = archs[0] if archs else ""
        if self.architectures and not any(fnmatch.fnmatchcase(arch, p) for p in self.architectures):
            return f"architectures[0] is {arch!r}, not {' or '.join(self.architectures)}"
        model_type = config.get("model_type")
        if self.model_types and model_type not in self.model_types:
            return f"model_type is {model_type!r}, not {' or '.join(self.model_types)}"
        if self.auto_map is not None and bool(config.get("auto_map")) != self.auto_map:
            return "config.json names remote classes (auto_map)" if not self.auto_map else "no auto_map"
        missing = [k for k in self.config_keys if k not in config]
        if missing:
            return f"config.json has no {', '.join(missing)}"
        return None

    def named(self, names: Sequence[str]) -> bool:
        return any(fnmatch.fnmatch(n.lower(), p.lower()) for n in names for p in self.names)


@dataclass(frozen=True)
class ModelFamily:
    """One family of reward models, as its authors publish and use it.

    ``head``: the head form export builds (``score``: the stock classifier head of transformers'
    ``*ForSequenceClassification``, read at the last token, or an encoder's own pooled head).
    ``bos``: ``reference`` decides the BOS count from the reference's token ids; an int fixes it.
    ``source``: where the authors' usage is published (repo + path), cited in docs/models.md.
    ``refusal``: for a refused family, what rmserve cannot reproduce (the export's message).
    """

    name: str
    title: str
    recognition: Recognition
    head: str
    recipe: Recipe
    reference: ReferenceUsage | None
    source: str
    status: Status = "supported"
    input_format: Literal["chat_template", "text_pair"] = "chat_template"
    flags: tuple[str, ...] = ()
    checked: str = ""
    refusal: str | None = None
    examples: tuple[str, ...] = field(default=())
