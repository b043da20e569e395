"""Gemma-3 reward models: the text decoder with transformers' ``score`` head, as the text-only class
(``Gemma3TextForSequenceClassification``, model_type ``gemma3_text``) or the image-text one
(``Gemma3ForSequenceClassification``, model_type ``gemma3``, its decoder under ``text_config`` beside a
vision tower), exported on the lean graph (models/lean/layout.py). The image-text model scores text as
its ``language_model`` does (models/heads.py ``text_body``); its vision tower is loaded and not written.

No Gemma-3 reward model with a published usage snippet was found, so the reference is transformers' own
usage of a chat model's tokenizer, ``apply_chat_template(conversation, tokenize=True)``, which is how
TRL's ``RewardTrainer`` tokenizes the conversations it trains a reward model on: Gemma-3's template
writes the one ``<bos>`` (models/families/reference.py, recipe ``template``). The reference loads the
model with ``eager`` attention, transformers' plain implementation of the attention math.
"""

from __future__ import annotations

from rmserve.models.families import register
from rmserve.models.families.base import ModelFamily, Recognition
from rmserve.models.families.reference import chat_usage

register(
    ModelFamily(
        name="gemma3-text",
        title="Gemma-3 reward models (Gemma3TextForSequenceClassification, Gemma3ForSequenceClassification)",
        recognition=Recognition(
            architectures=("Gemma3TextForSequenceClassification", "Gemma3ForSequenceClassification"),
            model_types=("gemma3_text", "gemma3"),
            auto_map=False,
        ),
        head="score",
        recipe="template",
        reference=chat_usage("template", attention="eager"),
        source="transformers' apply_chat_template(conversation, tokenize=True), as TRL's RewardTrainer "
        "tokenizes conversations (trl/trainer/reward_trainer.py); google/gemma-3-1b-it chat template",
        checked="replica of google/gemma-3-1b-it's config.json and tokenizer settings (the template's <bos>, "
        "none added): ids identical, fp32 within 1e-4; a tiny image-text classifier against its own forward",
        examples=(),
    ),
)
