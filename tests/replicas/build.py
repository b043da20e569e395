"""Tiny random-weight replicas of published reward-model families (tests only; seconds each).

Each replica keeps its family's config.json fields (architectures, model_type, rope settings, context,
special-token ids as its tokenizer numbers them) and its tokenizer's behaviour: the family's special tokens,
its post-processor (Llama-3 adds ``<|begin_of_text|>``; Qwen3 adds nothing; DeBERTa-v3 writes
``[CLS] q [SEP] a [SEP]``) and its chat template (``templates/``, sources in ``SOURCES.md``). Sizes are tiny;
the directory is named as the hub checkpoint, as a snapshot's is, so the family is recognised.
"""

from __future__ import annotations

import re
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
# Gemma's specials at Gemma's ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3, then the turn markers.
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
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
    "skywork-v02-gemma2": ("Skywork-Reward-Gemma-2-27B-v0.2", "gemma2", "gemma2.jinja", False),
    "gemma3-1b-rm": ("gemma-3-1b-it-rm", "gemma3_text", "gemma3.jinja", True),
    "oasst-deberta": ("reward-model-deberta-v3-large-v2", "deberta-v2", "", True),
}
# A template's leading BOS, as Llama-3.2's (``{{- bos_token }}`` and a newline) and Gemma-2's write it.
LEADING_BOS = re.compile(r"\A\{\{-? bos_token \}\}\n?")


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


def gemma_tokenizer(template: str) -> Any:
    """Gemma's tokenizer behaviour: ``<bos>`` added by the post-processor (``add_bos_token``), ``<eos>`` as
    EOS, ``<pad>`` (id 0) as pad, ``<start_of_turn>``/``<end_of_turn>`` as special tokens. Byte-level BPE
    stands in for Gemma's SentencePiece model (its pieces are not what is under test)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _byte_bpe(GEMMA_SPECIALS)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=template,
        model_max_length=1000000000000000019884624838656,
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
    # Skywork-Reward-Gemma-2-27B config.json, scaled with the sizes: the window (4096) to 256 so the
    # near-limit conversation crosses it; the attention soft-cap (50) to 5, which the tiny model's
    # attention logits reach (at 50 it moves a score by 2e-5, under the parity tolerance; at 5, by 2e-3).
    if model_type == "gemma2":
        gemma2 = {
            "head_dim": 8,
            "query_pre_attn_scalar": 144,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 30.0,
            "sliding_window": 256,
            "max_position_embeddings": 8192,
        }
        return AutoConfig.for_model("gemma2", vocab_size=vocab, **gemma2, **common)
    if model_type == "gemma3_text":
        return _gemma3_config(tokenizer, common)
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


def _gemma3_config(tokenizer: Any, common: dict[str, Any]) -> Any:
    """google/gemma-3-1b-it config.json as a Gemma3TextForSequenceClassification: its fields kept, its
    sizes scaled (head_dim 256 -> 8 with query_pre_attn_scalar, which equals head_dim there; 26 layers ->
    6, one sliding_window_pattern; the window 512 -> 256 so the near-limit conversation crosses it), its
    eos_token_id list [<eos>, <end_of_turn>] in this tokenizer's ids."""
    from transformers import AutoConfig

    gemma3 = {
        "num_hidden_layers": 6,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "query_pre_attn_scalar": 8,
        "sliding_window": 256,
        "sliding_window_pattern": 6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 32768,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-06,
        "attention_bias": False,
    }
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    ids = {**common, "eos_token_id": [tokenizer.eos_token_id, end_of_turn]}
    sizes = {k: v for k, v in ids.items() if k not in gemma3}
    return AutoConfig.for_model("gemma3_text", vocab_size=len(tokenizer), **gemma3, **sizes)


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
            template = LEADING_BOS.sub("", template)
        if model_type == "qwen3":
            tokenizer = qwen3_tokenizer(template)
        elif model_type in ("gemma2", "gemma3_text"):
            tokenizer = gemma_tokenizer(template)
        else:
            tokenizer = llama3_tokenizer(template, pad=name in PADDED)
    config = _config(model_type, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
