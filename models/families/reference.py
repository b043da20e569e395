"""The authors' usage, as code: each recipe loads the checkpoint and tokenizes a conversation the way a
family's model card does, and scores it with the checkpoint's declared class, one conversation at a time
and unpadded, as the cards do. This, not rmserve's own PyTorch wrapper, is what export compares with.

- ``template+tokenizer``: ``tokenizer(tokenizer.apply_chat_template(conv, tokenize=False))``, then
  ``model(**inputs).logits[0][0]``: the Skywork-Reward v0.1/v0.2 demo (SkyworkAI/Skywork-Reward
  ``README.md``, "Demo Code", with ``eager`` attention: the README names ``flash_attention_2`` or
  ``eager`` for the Gemma-2 model, sdpa "may result in bugs") and the GRM cards
  (Ray2333/GRM-*-rewardmodel-ft ``README.md``).
- ``template-bos+tokenizer``: the same with the rendered text's leading BOS stripped first (the
  Skywork-Reward-V2 cards, Skywork/Skywork-Reward-V2-* ``README.md``).
- ``template``: ``tokenizer.apply_chat_template(conv, tokenize=True)``, the template's text with no
  special tokens added (transformers' ``apply_chat_template`` tokenizes with ``add_special_tokens=False``,
  tokenization_utils_base.py), as TRL's ``RewardTrainer`` tokenizes a conversation
  (trl/trainer/reward_trainer.py ``_tokenize``): the Gemma-3 text entry (models/families/gemma3.py).
- ``text_pair``: ``tokenizer(question, answer)``, then ``logits[0]`` (OpenAssistant/
  reward-model-deberta-v3-large-v2 ``README.md``).

Templates render on the export's fixed date: transformers' ``strftime_now`` reads ``datetime.now()``,
so it is given that date while the reference runs (``pinned_now``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator, Sequence
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


def authors_model(checkpoint: Path, settings: ReferenceSettings, attention: str | None = None) -> Any:
    """The checkpoint as its class loads it (``AutoModelForSequenceClassification``), fp32, eval, with
    the attention implementation its card names (None: transformers' default); with
    ``settings.layerwise``, the same class and forward with each decoder layer's float32 weights read
    from the checkpoint as it runs (models/layerwise.py)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if settings.layerwise:
        from rmserve.models.layerwise import layerwise_model
        from rmserve.models.lean.source import SafetensorsSource

        config = AutoConfig.from_pretrained(checkpoint)
        return layerwise_model(
            AutoModelForSequenceClassification, config, SafetensorsSource(checkpoint), attention, _complete
        )
    extra = {} if attention is None else {"attn_implementation": attention}
    return AutoModelForSequenceClassification.from_pretrained(
        checkpoint, dtype=torch.float32, trust_remote_code=settings.trust_remote_code, **extra
    ).eval()


def _complete(_model: Any, info: dict[str, list[Any]]) -> None:
    """A layer-by-layer reference reads every weight its class has from the checkpoint, or none."""
    lacking = info["missing_keys"] + info["mismatched_keys"]
    if lacking:
        raise ValueError(f"the checkpoint lacks or misshapes weights its class needs: {lacking[:5]}")


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


def with_bos(inputs: Any, bos: int | None, count: int | None) -> Any:
    """``inputs`` (one row) with its leading BOS ids replaced by ``count`` of them (None: unchanged)."""
    import torch

    if count is None or bos is None:
        return inputs
    ids = inputs["input_ids"][0]
    lead = 0
    while lead < len(ids) and int(ids[lead]) == bos:
        lead += 1
    new = torch.cat([torch.full((count,), bos, dtype=ids.dtype), ids[lead:]]).unsqueeze(0)
    return {"input_ids": new, "attention_mask": torch.ones_like(new)}


def chat_usage(recipe: Recipe, attention: str | None = None) -> ReferenceUsage:
    """The reference of a chat-template family tokenized by ``recipe``, its model loaded with the
    ``attention`` implementation the card names."""

    def run(
        checkpoint: Path, conversations: Sequence[Conversation], settings: ReferenceSettings
    ) -> Reference:
        tokenizer = authors_tokenizer(checkpoint, settings)
        model = authors_model(checkpoint, settings, attention)

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
            specials = recipe != "template"  # apply_chat_template(tokenize=True) adds none
            inputs = tokenizer(text, add_special_tokens=specials, return_tensors="pt")
            return with_bos(inputs, tokenizer.bos_token_id, settings.bos_tokens)

        def length(conv: Conversation) -> int:
            return int(tokenized(rendered(conv))["input_ids"].shape[1])

        refused = {}
        with pinned_now(settings.template_date):
            for conv in conversations:
                try:
                    rendered(conv)
                except Exception as exc:  # the template's own raise_exception (e.g. no system role)
                    refused[conv.name] = f"the authors' template refuses it: {exc}"
            kept = [c for c in conversations if c.name not in refused]
            convs = tuple(near_limit(c, length, settings.max_length) for c in kept)
            texts = tuple(rendered(c) for c in convs)
        inputs = [tokenized(t) for t in texts]
        return Reference(
            recipe=recipe,
            refused=refused,
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


def pair_reference(
    tokenizer: Any,
    score: Callable[[Any], float],
    conversations: Sequence[Conversation],
    settings: ReferenceSettings,
) -> Reference:
    """Each conversation as ``tokenizer(question, answer)`` (one grown near max_length), scored."""

    def tokenized(conv: Conversation) -> Any:
        return tokenizer(*question_answer(conv), return_tensors="pt")

    convs = tuple(
        near_limit(c, lambda c: int(tokenized(c)["input_ids"].shape[1]), settings.max_length)
        for c in conversations
    )
    inputs = [tokenized(c) for c in convs]
    return Reference(
        recipe="text_pair",
        refused={},
        conversations=convs,
        rendered=tuple("\n".join(question_answer(c)) for c in convs),
        ids=tuple(tuple(int(i) for i in x["input_ids"][0]) for x in inputs),
        scores=tuple(score(x) for x in inputs),
    )


def pair_usage(
    checkpoint: Path, conversations: Sequence[Conversation], settings: ReferenceSettings
) -> Reference:
    """``tokenizer(question, answer)`` then ``logits[0]``: the OpenAssistant DeBERTa card."""
    model = authors_model(checkpoint, settings)
    tokenizer = authors_tokenizer(checkpoint, settings)
    return pair_reference(tokenizer, lambda x: _score(model, x), conversations, settings)


def rmserve_usage(
    checkpoint: Path, conversations: Sequence[Conversation], settings: ReferenceSettings
) -> Reference:
    """A checkpoint rmserve trained (``rmserve train`` writes ``rmserve_pooling``): its authors' usage is
    rmserve's own ``ScoreModel`` with the pooling it was trained with, on ``tokenizer(question, answer)``."""
    import torch

    from rmserve.models.heads import load_score_model

    model, tokenizer, meta = load_score_model(checkpoint)

    def score(x: Any) -> float:
        types = x.get("token_type_ids") if meta.uses_token_type_ids else None
        with torch.inference_mode():
            return float(model(x["input_ids"], x["attention_mask"], types)[0])

    return pair_reference(tokenizer, score, conversations, settings)
