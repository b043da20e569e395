"""Random-init decoder reward checkpoints at real sizes, for the export and serving benchmarks.

A 32k-vocabulary byte-level BPE tokenizer trained on the spot (no hub) and a ``*ForSequenceClassification``
with one label, saved as transformers saves any checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB = 32768


def random_decoder(
    directory: Path,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    heads: int,
    kv: int,
    dtype: str = "bfloat16",
    arch: str = "qwen2",
) -> int:
    """Write the checkpoint to ``directory``; its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tests.support.tiny import _decoder_tokenizer

    tokenizer: Any = _decoder_tokenizer(None, with_pad=True)
    config = AutoConfig.for_model(
        arch,
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=getattr(torch, dtype))
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(directory, max_shard_size="5GB")  # sharded as the hub's 8B checkpoints are
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())
