"""The authors' usage, as code: each recipe loads the checkpoint and tokenizes a conversation the way a
family's model card does, and scores it with the checkpoint's declared class, one conversation at a time
and unpadded, as the cards do. This, not rmserve's own PyTorch wrapper, is what export compares with.

- ``template+tokenizer``: ``tokenizer(tokenizer.apply_chat_template(conv, tokenize=False))``, then
  ``model(**inputs).logits[0][0]``: the Skywork-Reward v0.1/v0.2 demo (SkyworkAI/Skywork-Reward
  ``README.md``, "Demo Code") and the GRM cards (Ray2333/GRM-*-rewardmodel-ft ``README.md``).
- ``template-bos+tokenizer``: the same with the rendered text's leading BOS stripped first (the
  Skywork-Reward-V2 cards, Skywork/Skywork-Reward-V2-* ``README.md``).
- ``text_pair``: ``tokenizer(question, answer)``, then ``logits[0]`` (OpenAssistant/
  reward-model-deberta-v3-large-v2 ``README.md``).

Templates render on the export's fixed date: transformers' ``strftime_now`` reads ``datetime.now()``,
so it is given that date while the reference runs (``pinned_now``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rmserve.models.families.base import Conversation, Recipe, Reference, ReferenceSettings, ReferenceUsage
from rmserve.models.families.conversations import near_limit


@contextlib.contextmanager
def pinned_now(day: str) -> Iterator[None]:
    """transformers' chat templates see ``day`` (ISO) as today while this block runs."""
    from transformers.utils import chat_template_utils

    fixed = dt.datetime.combine(dt.date.fromisoformat(day), dt.time())

    class _Pinned(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> _Pinned:
            return cls.combine(fixed.date(), fixed.time(), tzinfo=tz)

    original = chat_template_utils.datetime
    chat_template_utils.datetime = _Pinned  # type: ignore[misc]
    try:
        yield
    finally:
        chat_template_utils.datetime = original  # type: ignore[misc]


def authors_model(checkpoint: Path, settings: ReferenceSettings) -> Any:
    """The checkpoint as its class loads it (``AutoModelForSequenceClassification``), fp32, eval."""
    import torch
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        checkpoint, dtype=torch.float32, trust_remote_code=settings.trust_remote_code
    ).eval()


def authors_tokenizer(checkpoint: Path, settings: ReferenceSettings) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=settings.trust_remote_code)


def _score(model: Any, inputs: Any) -> float:
    import torch

    names = ("input_ids", "attention_mask", "token_type_ids")
    used = {k: v for k, v in inputs.items() if k in names and (k != "token_type_ids" or _types(model))}
    with torch.inference_mode():
        return float(model(**used).logits[0][0].float())


def _types(model: Any) -> bool:
    return int(getattr(model.config, "type_vocab_size", 0) or 0) > 0


def chat_usage(recipe: Recipe) -> ReferenceUsage:
    """The reference of a chat-template family tokenized by ``recipe``."""

    def run(
        checkpoint: Path, conversations: Sequence[Conversation], settings: ReferenceSettings
    ) -> Reference:
        tokenizer = authors_tokenizer(checkpoint, settings)
        model = authors_model(checkpoint, settings)

        def rendered(conv: Conversation) -> str:
            return str(
                tokenizer.apply_chat_template(
                    [dict(m) for m in conv.messages],
                    tools=None if conv.tools is None else [dict(t) for t in conv.tools],
                    tokenize=False,
                )
            )

        def tokenized(text: str) -> Any:
            if recipe == "template-bos+tokenizer" and tokenizer.bos_token:
                text = text.removeprefix(tokenizer.bos_token)
            return tokenizer(text, return_tensors="pt")

        def length(conv: Conversation) -> int:
            return int(tokenized(rendered(conv))["input_ids"].shape[1])

        with pinned_now(settings.template_date):
            convs = tuple(near_limit(c, length, settings.max_length) for c in conversations)
            texts = tuple(rendered(c) for c in convs)
        inputs = [tokenized(t) for t in texts]
        return Reference(
            recipe=recipe,
            conversations=convs,
            rendered=texts,
            ids=tuple(tuple(int(i) for i in x["input_ids"][0]) for x in inputs),
            scores=tuple(_score(model, x) for x in inputs),
        )

    return run


def question_answer(conv: Conversation) -> tuple[str, str]:
    """An encoder's sentence pair from a conversation: the last user turn and the final reply."""
    *before, last = conv.messages
    question = next((m for m in reversed(before) if m.get("role") == "user"), {"content": ""})
    return str(question.get("content") or ""), str(last.get("content") or "")


def pair_usage(
    checkpoint: Path, conversations: Sequence[Conversation], settings: ReferenceSettings
) -> Reference:
    """``tokenizer(question, answer)`` then ``logits[0]``: the OpenAssistant DeBERTa card."""
    tokenizer = authors_tokenizer(checkpoint, settings)
    model = authors_model(checkpoint, settings)

    def tokenized(conv: Conversation) -> Any:
        return tokenizer(*question_answer(conv), return_tensors="pt")

    convs = tuple(
        near_limit(c, lambda c: int(tokenized(c)["input_ids"].shape[1]), settings.max_length)
        for c in conversations
    )
    inputs = [tokenized(c) for c in convs]
    return Reference(
        recipe="text_pair",
        conversations=convs,
        rendered=tuple("\n".join(question_answer(c)) for c in convs),
        ids=tuple(tuple(int(i) for i in x["input_ids"][0]) for x in inputs),
        scores=tuple(_score(model, x) for x in inputs),
    )


def rmserve_usage(
    checkpoint: Path, conversations: Sequence[Conversation], settings: ReferenceSettings
) -> Reference:
    """A checkpoint rmserve trained (``rmserve train`` writes ``rmserve_pooling``): its authors' usage is
    rmserve's own ``ScoreModel`` with the pooling it was trained with, on ``tokenizer(question, answer)``."""
    import torch

    from rmserve.models.heads import load_score_model

    model, tokenizer, meta = load_score_model(checkpoint)

    def tokenized(conv: Conversation) -> Any:
        return tokenizer(*question_answer(conv), return_tensors="pt")

    convs = tuple(
        near_limit(c, lambda c: int(tokenized(c)["input_ids"].shape[1]), settings.max_length)
        for c in conversations
    )
    inputs = [tokenized(c) for c in convs]
    scores = []
    for x in inputs:
        types = x.get("token_type_ids") if meta.uses_token_type_ids else None
        with torch.inference_mode():
            scores.append(float(model(x["input_ids"], x["attention_mask"], types)[0]))
    return Reference(
        recipe="text_pair",
        conversations=convs,
        rendered=tuple("\n".join(question_answer(c)) for c in convs),
        ids=tuple(tuple(int(i) for i in x["input_ids"][0]) for x in inputs),
        scores=tuple(scores),
    )
