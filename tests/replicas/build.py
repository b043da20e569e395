"""Tiny random-weight replicas of published reward-model families (tests only; seconds each).

Each replica keeps its family's config.json fields (architectures, model_type, rope settings, context,
special-token ids as its tokenizer numbers them) and its tokenizer's behaviour: the family's special tokens,
its post-processor (Llama-3 adds ``<|begin_of_text|>``; Qwen3 adds nothing; DeBERTa-v3 writes
``[CLS] q [SEP] a [SEP]``) and its chat template (``templates/``, sources in ``SOURCES.md``). Sizes are tiny;
the directory is named as the hub checkpoint, as a snapshot's is, so the family is recognised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.tiny import corpus

TEMPLATES = Path(__file__).parent / "templates"
LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
]
SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "initializer_range": 0.2,
}
# Checkpoints whose tokenizer adds a "[PAD]" token after the vocabulary (id 128256 in the real ones:
# Skywork-Reward v0.1/v0.2 Llama, GRM; research notes, "Last-token pooling").
PADDED = ("skywork-v02-llama", "grm-llama-ft")
# replica name -> (hub name, model type, template file, whether the template keeps its BOS)
REPLICAS = {
    "skywork-v2-llama": ("Skywork-Reward-V2-Llama-3.1-8B", "llama", "llama3.2_json.jinja", True),
    "skywork-v2-qwen3": ("Skywork-Reward-V2-Qwen3-8B", "qwen3", "qwen3.jinja", True),
    "skywork-v02-llama": ("Skywork-Reward-Llama-3.1-8B-v0.2", "llama", "llama3.2_json.jinja", False),
    "grm-llama-ft": ("GRM-Llama3.2-3B-rewardmodel-ft", "llama", "llama3.2_json.jinja", True),
    "oasst-deberta": ("reward-model-deberta-v3-large-v2", "deberta-v2", "", True),
}


def _byte_bpe(specials: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def llama3_tokenizer(template: str, pad: bool = False) -> Any:
    """Llama-3's tokenizer behaviour: byte-level BPE, ``<|begin_of_text|>`` added by the post-processor
    (TemplateProcessing), ``<|eot_id|>`` ending a turn, no pad token (Llama-3's has none) unless ``pad``
    adds ``[PAD]`` after the vocabulary."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _byte_bpe(LLAMA_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    extra = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        chat_template=template,
        model_max_length=131072,
        model_input_names=["input_ids", "attention_mask"],
        **extra,
    )


def qwen3_tokenizer(template: str) -> Any:
    """Qwen3's: byte-level BPE, no BOS token at all, ``<|im_end|>`` as EOS, ``<|endoftext|>`` as pad."""
    from transformers import PreTrainedTokenizerFast

    tok = _byte_bpe(QWEN_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=template,
        model_max_length=131072,
        model_input_names=["input_ids", "attention_mask"],
    )


def deberta_v3_tokenizer() -> Any:
    """DeBERTa-v3's: SentencePiece (Unigram, Metaspace ``▁``), ``[CLS] q [SEP] a [SEP]``, pad ``[PAD]``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(
        corpus(), trainers.UnigramTrainer(vocab_size=500, special_tokens=specials, unk_token="[UNK]")
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[CLS]",
        eos_token="[SEP]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def _config(model_type: str, tokenizer: Any) -> Any:
    from transformers import AutoConfig

    vocab = len(tokenizer)
    if model_type == "deberta-v2":  # OpenAssistant/reward-model-deberta-v3-large-v2 config.json fields
        return AutoConfig.for_model(
            "deberta-v2",
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=512,
            relative_attention=True,
            position_buckets=256,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            max_relative_positions=-1,
            type_vocab_size=0,
            pad_token_id=tokenizer.pad_token_id,
            num_labels=1,
            initializer_range=0.2,
        )
    common = {
        **SIZES,
        "num_labels": 1,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    if model_type == "qwen3":  # Qwen3-8B config.json: rope 1e6, 40960 positions, q/k norms over head_dim
        qwen3 = {"head_dim": 8, "rope_theta": 1000000.0, "max_position_embeddings": 40960}
        return AutoConfig.for_model("qwen3", vocab_size=vocab, **qwen3, **common)
    rope = {  # Llama-3.1-8B config.json
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    }
    return AutoConfig.for_model(
        "llama", vocab_size=vocab, max_position_embeddings=131072, rope_parameters=rope, **common
    )


def replica(name: str, root: str | Path, *, seed: int = 0) -> Path:
    """Write the replica ``name`` (``REPLICAS``) under ``root``, in a directory named as its hub
    checkpoint; returns that directory."""
    import torch
    from transformers import AutoModelForSequenceClassification

    hub, model_type, template_file, keeps_bos = REPLICAS[name]
    out = Path(root) / hub
    out.mkdir(parents=True, exist_ok=True)
    if model_type == "deberta-v2":
        tokenizer = deberta_v3_tokenizer()
    else:
        template = (TEMPLATES / template_file).read_text()
        if not keeps_bos:
            template = template.removeprefix("{{- bos_token }}\n")
        if model_type == "qwen3":
            tokenizer = qwen3_tokenizer(template)
        else:
            tokenizer = llama3_tokenizer(template, pad=name in PADDED)
    config = _config(model_type, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
