"""Tiny random-weight replicas of published process reward models, with their tokenizers' real settings.

No model hub here: each replica is the model's architecture at a tiny size, with a tokenizer trained here
on math steps but configured as the model's is, so that what differs between step layouts really
happens:

* ``qwen2_tokenizer``: Qwen2's pre-tokenizer (its ``tokenizer.json`` Split pattern, then byte-level), in
  which ``" ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"`` glues a newline to the punctuation before it, so ``".\\n"``
  is one token after training on text full of it (Qwen2.5-Math PRMs, PURE, Skywork-o1, TRL's PRMs);
* ``llama3_tokenizer``: Llama-3's header tokens and chat template (RLHFlow's Llama3.1-8B-PRM);
* ``mistral_tokenizer``: a SentencePiece-style tokenizer (``▁`` word starts, ``<s>`` added by its
  post-processor, as Mistral-7B v0.1's ``tokenizer.encode`` does; Math-Shepherd).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Qwen2's pre-tokenizer pattern (Qwen/Qwen2.5-Math-7B tokenizer.json, pre_tokenizer.pretokenizers[0]).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
# Llama-3's pre-tokenizer pattern (meta-llama/Meta-Llama-3-8B tokenizer.json): digits in threes.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
# Meta-Llama-3's chat template (content trimmed, BOS before the first turn).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + "
    "content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def math_corpus() -> list[str]:
    """Solutions in steps, one step a line, ending in punctuation: the text merges are learnt from."""
    lines = []
    for a in range(2, 14):
        for b in (3, 5, 7, 12):
            lines.append(f"We add {a} and {b} to get {a + b}.\n")
            lines.append(f"Then {a} * {b} = {a * b}.\n")
            lines.append(f"So the answer is {a * b - a}!\n")
            lines.append(f"Step {a}: multiply {b} by {a}: ки\n")
            lines.append(f"Is {a} + {b} less than {a * b}? Yes + no - maybe.\n")
    return lines


def _bpe(specials: list[str], pre_tokenizer: Any, decoder: Any, byte_level: bool = True) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    vocab = 700
    tok.train_from_iterator(
        math_corpus() * 3,
        trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=alphabet),
    )
    return tok


def qwen2_tokenizer(
    *, bos: str | None = None, extra: tuple[str, ...] = (), template: str | None = None
) -> Any:
    """A Qwen2-style fast tokenizer: ``<|endoftext|>`` pads, ``<|im_end|>`` ends, no BOS unless given."""
    from tokenizers import Regex, decoders, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra]
    split = pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = _bpe(specials, pre_tokenizers.Sequence([split, byte_level]), decoders.ByteLevel())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(extra),
        chat_template=template,
        model_max_length=4096,
    )


def llama3_tokenizer() -> Any:
    """A Llama-3-style fast tokenizer with its chat template (BOS written by the template)."""
    from tokenizers import Regex, decoders, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = _bpe(specials, pre_tokenizers.Sequence([split, byte_level]), decoders.ByteLevel())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        chat_template=LLAMA3_TEMPLATE,
        model_max_length=4096,
    )


def mistral_tokenizer() -> Any:
    """A Mistral-7B-v0.1-style fast tokenizer: ``▁`` word starts, ``<s>`` added by the post-processor."""
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    # SentencePiece has no piece that joins a newline to a word: newlines stand apart.
    newline = pre_tokenizers.Split("\n", behavior="isolated")
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok = _bpe(
        specials, pre_tokenizers.Sequence([newline, metaspace]), decoders.Metaspace(), byte_level=False
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=4096
    )


def tiny_config(model_type: str, tokenizer: Any, **extra: Any) -> Any:
    """The model family's config at a tiny size, for ``tokenizer``'s vocabulary."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def save(model: Any, tokenizer: Any, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def causal_lm(model_type: str, tokenizer: Any, out: Path, seed: int = 0) -> Path:
    """A tiny random-init causal LM of ``model_type`` for ``tokenizer``, saved with it to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return save(AutoModelForCausalLM.from_config(tiny_config(model_type, tokenizer)), tokenizer, out)
