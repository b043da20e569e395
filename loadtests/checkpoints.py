"""Random-init decoder reward checkpoints at real sizes, for the export and serving benchmarks.

A 32k-vocabulary byte-level BPE tokenizer trained on the spot (no hub) and a ``*ForSequenceClassification``
with one label, saved as transformers saves any checkpoint; or, with ``shard_bytes`` (sizes whose model
would not fit in RAM beside anything else: 8B), written shard by shard without building the model:
each weight named and shaped as the class names and shapes it (the class built on the meta device), norms
ones, every other weight normal(0, ``initializer_range``) as the class initialises it, the shards and
their ``model.safetensors.index.json`` as ``save_pretrained`` writes them.
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
    shard_bytes: int | None = None,
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
    if shard_bytes is not None:
        tokenizer.save_pretrained(directory)
        return _sharded(directory, config, getattr(torch, dtype), shard_bytes)
    model = AutoModelForSequenceClassification.from_config(config, dtype=getattr(torch, dtype))
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(directory, max_shard_size="5GB")  # sharded as the hub's 8B checkpoints are
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def _sharded(directory: Path, config: Any, dtype: Any, shard_bytes: int) -> int:
    import json

    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    with init_empty_weights():
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    std = float(config.initializer_range)
    shards: list[list[str]] = []  # each shard's tensor names, in the order written
    shard: dict[str, torch.Tensor] = {}
    size = total = params = 0

    def flush() -> None:
        save_file(shard, str(directory / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
        shards.append(list(shard))
        shard.clear()

    for name, param in model.named_parameters():
        tensor = torch.empty(param.shape, dtype=dtype)
        if "norm" in name:
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, std)
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
            size = 0
        shard[name] = tensor
        size, total, params = size + nbytes, total + nbytes, params + tensor.numel()
    flush()
    weight_map = {}
    for k, names in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        (directory / f"shard-{k}.tmp").rename(directory / final)
        weight_map |= dict.fromkeys(names, final)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return params
