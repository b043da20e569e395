"""Tiny replicas of published reward-model families: their real config.json fields and tokenizer
settings, random weights, seconds to build. The families' own published code, where a test runs it as
the reference, is under tests/replicas/<family>/ verbatim.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from tests.support.tiny import corpus

REPLICAS = Path(__file__).resolve().parents[1] / "replicas"

# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat template (the one OpenRLHF's Llama-3 reward
# models and ArmoRM ship): BOS before the first turn, each turn's content trimmed.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

CONVERSATIONS: list[list[dict[str, str]]] = [
    [
        {"role": "system", "content": "The assistant explains the recipe for bread."},
        {"role": "user", "content": "Can you help me?"},
        {"role": "assistant", "content": "Sure, here is how."},
    ],
    [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42."},
        {"role": "user", "content": "And why the sky is blue?"},
        {"role": "assistant", "content": "Blue light scatters more than red. Ça va, naïve café — 天空."},
    ],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I don't know, sorry."}],
]


# Llama-3's pre-tokenizer split (its tokenizer.json): "\n\n" is one piece, words keep no newline.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Ids of the real Llama-3 tokenizer that published code hard-codes (ArmoRM's gate pattern is
# [128009, 128006, 78191, 128007, 271]); "ĊĊ" is byte-level "\n\n". 128256 is ArmoRM's added [PAD].
LLAMA3_IDS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eot_id|>": 128009,
    "assistant": 78191,
    "ĊĊ": 271,
}
LLAMA3_VOCAB = 128256


def llama3_tokenizer(*, llama3_ids: bool = False, pad: str | None = None) -> Any:
    """A byte-level BPE tokenizer with Llama-3's special tokens, pre-tokenizer split, chat template and
    post-processor (one ``<|begin_of_text|>`` before a single text when special tokens are added).
    ``llama3_ids``: the tokens in ``LLAMA3_IDS`` get the real tokenizer's ids (the vocabulary then spans
    ``LLAMA3_VOCAB`` ids, most unused). ``pad``: an added pad token, given the next id."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=list(LLAMA3_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Turn headers as the template writes them, so "assistant" and "\n\n" are tokens of their own.
    tok.train_from_iterator(corpus() + ["assistant\n\nuser\n\nsystem\n\n"] * 50, trainer)
    if pad is not None:
        tok.add_special_tokens([pad])
    if llama3_ids:
        tok = _renumbered(tok, LLAMA3_IDS | ({pad: LLAMA3_VOCAB} if pad is not None else {}))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        chat_template=LLAMA3_CHAT_TEMPLATE,
        model_max_length=8192,
    )
    if pad is not None:
        tokenizer.pad_token = pad
    return tokenizer


def _renumbered(tok: Any, ids: dict[str, int]) -> Any:
    """``tok`` with each token of ``ids`` moved to its id (a token already there takes the old id)."""
    import json

    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    for token, new in ids.items():
        if token not in vocab:  # an added token: into the model's vocabulary at its id
            vocab[token], by_id[new] = new, token
            continue
        old = vocab[token]
        displaced = by_id.pop(new, None)
        vocab[token], by_id[new] = new, token
        del by_id[old]
        if displaced is not None:
            vocab[displaced], by_id[old] = old, displaced
    for added in data["added_tokens"]:
        added["id"] = vocab.get(added["content"], ids.get(added["content"], added["id"]))
    return Tokenizer.from_str(json.dumps(data))


def llama_config(tokenizer: Any, **extra: Any) -> Any:
    """A tiny Llama config with Llama-3's rope and token ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=extra.pop("vocab_size", len(tokenizer)),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.2,
        **extra,
    )


def published_module(relative: str) -> Any:
    """A vendored file whose imports are all installed here, imported as the module it is."""
    import importlib.util

    path = REPLICAS / relative
    spec = importlib.util.spec_from_file_location(f"replica_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def published_definitions(relative: str, names: list[str], namespace: dict[str, Any]) -> dict[str, Any]:
    """The top-level definitions ``names`` (functions, classes, assignments) of a vendored file, their
    own source executed in order in ``namespace`` (see ``published_function``)."""
    source = (REPLICAS / relative).read_text(encoding="utf-8")
    nodes = [node for node in ast.parse(source).body if _defines(node, names)]
    code = compile(ast.Module(body=nodes, type_ignores=[]), str(REPLICAS / relative), "exec")
    exec(code, namespace)  # the published definitions, as written
    missing = [n for n in names if n not in namespace]
    if missing:
        raise LookupError(f"{relative} does not define {missing}")
    return {n: namespace[n] for n in names}


def _defines(node: ast.stmt, names: list[str]) -> bool:
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
        return node.name in names
    return isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id in names for t in node.targets
    )


def published_function(relative: str, name: str, namespace: dict[str, Any]) -> Any:
    """The function or class ``name`` from a vendored file, its own source executed in ``namespace``.

    A vendored file is run this way where its module-level imports cannot be installed here (OpenRLHF's
    model module imports deepspeed, peft and flash-attn's ring attention, none of which the definition
    uses): the definition runs as published, only its unusable neighbours are left out.
    """
    source = (REPLICAS / relative).read_text(encoding="utf-8")
    tree = ast.parse(source)
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == name]
    if len(nodes) != 1:
        raise LookupError(f"{relative} defines {name} {len(nodes)} times")
    code = compile(ast.Module(body=nodes, type_ignores=[]), str(REPLICAS / relative), "exec")
    exec(code, namespace)  # the published definition, as written
    return namespace[name]
