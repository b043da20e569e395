"""Families whose head is transformers' own: a ``*ForSequenceClassification`` class with one label, its
``score`` layer (decoders, read at the last token) or its pooled classifier (encoders).

The named families differ from the generic entries only in their authors' tokenization (cited in
``reference.py``); the generic entries take the default recipe, the tokenizer's defaults on the rendered
template. Remote code (``auto_map``) is never a stock family: its head is the checkpoint's own.
"""

from __future__ import annotations

from rmserve.models.families import register
from rmserve.models.families.base import ModelFamily, Recognition
from rmserve.models.families.reference import chat_usage, pair_usage, rmserve_usage
from rmserve.models.heads import DECODER_TYPES, ENCODER_TYPES

CLASSIFIER = ("*ForSequenceClassification",)
# Gemma-3 checkpoints have their own entry (models/families/gemma3.py).
DECODERS = tuple(sorted(DECODER_TYPES - {"gemma3_text", "gemma3"}))
ENCODERS = tuple(sorted(ENCODER_TYPES))


def _stock(model_types: tuple[str, ...], *names: str) -> Recognition:
    return Recognition(architectures=CLASSIFIER, model_types=model_types, auto_map=False, names=names)


register(
    ModelFamily(
        name="skywork-reward-v2",
        title="Skywork-Reward-V2 (Llama-3.1/3.2, Qwen3)",
        recognition=_stock(("llama", "qwen3"), "*Skywork-Reward-V2*"),
        head="score",
        recipe="template-bos+tokenizer",
        reference=chat_usage("template-bos+tokenizer"),
        source="Skywork/Skywork-Reward-V2-Llama-3.1-8B README.md (model card usage)",
        checked="replicas of the Llama-3.1 and Qwen3 checkpoints: token ids identical, fp32 within 1e-4",
        examples=("Skywork/Skywork-Reward-V2-Llama-3.1-8B", "Skywork/Skywork-Reward-V2-Qwen3-8B"),
    ),
    ModelFamily(
        name="skywork-reward",
        title="Skywork-Reward v0.1/v0.2 (Llama-3.1-8B, Gemma-2-27B)",
        recognition=_stock(("llama", "gemma2"), "*Skywork-Reward-Llama-3.1*", "*Skywork-Reward-Gemma-2*"),
        head="score",
        recipe="template+tokenizer",
        reference=chat_usage("template+tokenizer", attention="eager"),
        source="SkyworkAI/Skywork-Reward README.md (Demo Code)",
        checked="Llama-3.1 and Gemma-2 replicas (templates without BOS): one BOS from the tokenizer, "
        "served as bos_tokens=1, ids identical, fp32 within 1e-4",
        examples=("Skywork/Skywork-Reward-Llama-3.1-8B-v0.2", "Skywork/Skywork-Reward-Gemma-2-27B-v0.2"),
    ),
    ModelFamily(
        name="grm-ft",
        title="GRM -rewardmodel-ft / -distill (Llama, Gemma-2)",
        recognition=_stock(("llama", "gemma2"), "*GRM*rewardmodel-ft*", "*GRM*distill*"),
        head="score",
        recipe="template+tokenizer",
        reference=chat_usage("template+tokenizer"),
        source="Ray2333/GRM-Llama3.2-3B-rewardmodel-ft README.md; training: reward_models/load_datasets.py",
        checked="replica: the template's BOS and the tokenizer's, served as bos_tokens=2",
        examples=("Ray2333/GRM-Llama3.2-3B-rewardmodel-ft", "Ray2333/GRM-Gemma2-2B-rewardmodel-ft"),
    ),
    ModelFamily(
        name="openassistant-deberta",
        title="OpenAssistant DeBERTa-v3 reward models",
        recognition=_stock(("deberta-v2",), "*reward-model-deberta*"),
        head="score",
        recipe="text_pair",
        reference=pair_usage,
        source="OpenAssistant/reward-model-deberta-v3-large-v2 README.md",
        input_format="text_pair",
        checked="replica (SentencePiece tokenizer, [CLS] q [SEP] a [SEP]): ids identical, fp32 within 1e-4",
        examples=("OpenAssistant/reward-model-deberta-v3-large-v2",),
    ),
    ModelFamily(
        name="sequence-classification",
        title="Other decoder *ForSequenceClassification checkpoints (FsfairX, RB2, ...)",
        recognition=_stock(DECODERS),
        head="score",
        recipe="template+tokenizer",
        reference=chat_usage("template+tokenizer"),
        source="transformers' usage: tokenizer(apply_chat_template(conversation, tokenize=False))",
        checked="tiny checkpoints of each decoder type; the reference decides the BOS count",
        examples=("sfairXC/FsfairX-LLaMA3-RM-v0.1", "allenai/Llama-3.1-8B-Instruct-RM-RB2"),
    ),
    ModelFamily(
        name="rmserve-trained",
        title="Encoders trained by rmserve train (rmserve_pooling in config.json)",
        recognition=Recognition(
            architectures=CLASSIFIER, model_types=ENCODERS, auto_map=False, config_keys=("rmserve_pooling",)
        ),
        head="score",
        recipe="text_pair",
        reference=rmserve_usage,
        source="rmserve: models/train (the pooling it trained with, recorded in config.json)",
        input_format="text_pair",
        checked="tiny encoders with cls, mean and mean_response pooling",
    ),
    ModelFamily(
        name="encoder-classification",
        title="Encoder *ForSequenceClassification checkpoints (BERT, RoBERTa, DeBERTa, ...)",
        recognition=_stock(ENCODERS),
        head="score",
        recipe="text_pair",
        reference=pair_usage,
        source="transformers' sequence-pair usage: tokenizer(question, answer)",
        input_format="text_pair",
        checked="tiny BERT and DeBERTa-v2 checkpoints, and the default bundle's model",
    ),
)
