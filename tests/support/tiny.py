"""Tiny, seeded, random-init reward-model checkpoints (and bundles) for tests; seconds each, offline.

Each checkpoint is a real Hugging Face directory (config.json, safetensors weights, a fast
``tokenizer.json`` trained here on built-in sentences), so export, parity and serving run the same
code paths as for a full-size model. The llama variant has no pad token, like real Llama
tokenizers, to prove the exporter handles that.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

ARCHITECTURES = ("bert", "deberta-v2", "llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "mistral")
ENCODERS = ("bert", "deberta-v2")
DECODERS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "mistral")
# Decoders whose attention exports fused (one ONNX Attention per layer): Gemma-2 (soft-capped logits,
# no PyTorch SDPA path) and Gemma-3 through the lean graph, which writes its own Attention.
FUSED = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text")
# Decoders exported as the lean graph by default (models/lean): the fused ones, here.
LEAN = FUSED
# Decoders that keep a tokenizer without any pad token (the exporter must pad with EOS).
NO_PAD = ("llama",)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "num_labels": 1,
    # Larger than the 0.02 default so tiny random models give scores spread enough to rank.
    "initializer_range": 0.2,
}


def corpus() -> list[str]:
    """A few hundred varied English sentences, built from small word lists (no data files needed)."""
    subjects = [
        "The assistant",
        "A user",
        "My neighbour",
        "The teacher",
        "Our team",
        "This answer",
        "She",
        "He",
    ]
    verbs = ["explains", "refuses", "describes", "summarizes", "questions", "recommends", "ignores", "writes"]
    objects = [
        "the recipe for bread.",
        "a safe way to travel at night.",
        "why the sky is blue!",
        "how to fix a bicycle tyre?",
        "the history of Rome, briefly.",
        "a poem about rain.",
        "what 12 + 30 equals.",
        "the rules of chess; carefully.",
    ]
    sentences = [f"{s} {v} {o}" for s, v, o in itertools.product(subjects, verbs, objects)]
    extra = [
        "Human: Can you help me?",
        "Assistant: Sure, here is how.",
        "I don't know, sorry.",
        "That is harmful and I won't help.",
        "Thanks! That's very helpful :)",
        "Numbers: 0 1 2 3 4 5 6 7 8 9",
    ]
    return sentences + extra


def _encoder_tokenizer(directory: Path) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def _decoder_tokenizer(directory: Path, with_pad: bool) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<unk>"] + (["<pad>"] if with_pad else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        **extra,
    )


def _config(arch: str, vocab_size: int, tokenizer: Any, sizes: dict[str, Any] | None = None) -> Any:
    from transformers import AutoConfig

    if arch in ENCODERS:
        extra: dict[str, Any] = {"max_position_embeddings": 128}
        if arch == "deberta-v2":
            # DeBERTa-v2's own defaults: relative attention, no token types.
            extra |= {
                "relative_attention": True,
                "position_buckets": 32,
                "max_relative_positions": -1,
                "pos_att_type": ["p2c", "c2p"],
                "type_vocab_size": 0,
            }
    else:
        extra = {
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        }
        if arch == "gemma2":
            extra |= {"head_dim": 8, "sliding_window": 16, "query_pre_attn_scalar": 8}
        if arch == "gemma3_text":
            # Gemma-3: a sliding layer then a global one (rope_local_base_freq vs rope_theta with the
            # 4B+ configs' linear scaling, factor 8); the window shorter than max_length.
            extra |= {
                "head_dim": 8,
                "sliding_window": 16,
                "query_pre_attn_scalar": 8,
                "layer_types": ["sliding_attention", "full_attention"],
                "rope_theta": 1000000.0,
                "rope_local_base_freq": 10000.0,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            }
        if arch == "qwen3":
            extra |= {"head_dim": 8}  # Qwen3 normalizes q and k per head (RMSNorm over head_dim)
    # ``sizes`` overrides the tiny sizes (a benchmark's larger random-init model: loadtests/prefix_reuse.py).
    return AutoConfig.for_model(arch, vocab_size=vocab_size, **(_SIZES | extra | (sizes or {})))


def tiny_checkpoint(
    arch: str,
    directory: str | Path,
    *,
    seed: int = 0,
    pooling: str | None = None,
    sizes: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny random-init num_labels=1 checkpoint of ``arch`` into ``directory``.

    ``pooling="mean"`` (encoders only) writes ``rmserve_pooling: "mean"`` into config.json.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if arch in ENCODERS:
        tokenizer = _encoder_tokenizer(out)
    else:
        tokenizer = _decoder_tokenizer(out, with_pad=arch not in NO_PAD)
    config = _config(arch, len(tokenizer), tokenizer, sizes)
    if pooling is not None:
        config.rmserve_pooling = pooling
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_bundle(arch: str, directory: str | Path, *, seed: int = 0, **export_options: Any) -> Path:
    """A tiny checkpoint of ``arch`` in ``directory/checkpoint`` exported to ``directory/bundle``."""
    from rmserve.models.export import export_bundle

    root = Path(directory)
    checkpoint = tiny_checkpoint(arch, root / "checkpoint", seed=seed)
    bundle = root / "bundle"
    export_bundle(checkpoint, bundle, name=f"tiny-{arch}", **export_options)
    return bundle


# Process reward checkpoints: (architecture, head) -> what the tests build.
#   qwen2-tc2: Qwen2ForTokenClassification, 2 labels, step token <extra_0> (PURE-PRM's form)
#   llama-tc1: LlamaForTokenClassification, 1 label (exported with the sigmoid rule)
#   llama-lm:  LlamaForCausalLM read at "+" / "-", step token "ки" (Math-Shepherd's form)
#   qwen2-prm: Qwen2ForProcessRewardModel weights (Qwen2.5-Math-PRM's form: model.*, score.0/score.2)
PROCESS_FORMS = ("qwen2-tc2", "llama-tc1", "llama-lm", "qwen2-prm")
STEP_TOKENS = {"qwen2-tc2": "<extra_0>", "llama-tc1": "<extra_0>", "llama-lm": "ки", "qwen2-prm": "<extra_0>"}


def tiny_process_checkpoint(
    form: str, directory: str | Path, *, seed: int = 0, sizes: dict[str, Any] | None = None
) -> Path:
    """Write a tiny random-init process reward checkpoint of ``form`` (``PROCESS_FORMS``)."""
    import torch
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    if form not in PROCESS_FORMS:
        raise ValueError(f"unknown process form {form!r}; choose one of {PROCESS_FORMS}")
    arch = form.split("-")[0]
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _decoder_tokenizer(out, with_pad=arch not in NO_PAD)
    step = STEP_TOKENS[form]
    tokenizer.add_tokens([AddedToken(step, special=step.startswith("<"), normalized=False)])
    config = _config(arch, len(tokenizer), tokenizer, sizes)
    config.num_labels = 1 if form == "llama-tc1" else 2
    torch.manual_seed(seed)
    if form == "qwen2-prm":
        _save_qwen2_prm(config, out)
    else:
        auto = AutoModelForCausalLM if form == "llama-lm" else AutoModelForTokenClassification
        model = auto.from_config(config)
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _save_qwen2_prm(config: Any, out: Path) -> None:
    """Qwen2.5-Math-PRM's checkpoint layout, written without its remote code: a Qwen2 body under
    ``model.`` and the head's two linear layers as ``score.0`` and ``score.2``."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Model

    body = Qwen2Model(config)
    hidden = config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
    torch.nn.init.normal_(head[2].weight, std=0.5)
    weights = {f"model.{k}": v.contiguous() for k, v in body.state_dict().items()}
    weights |= {f"score.{k}": v.contiguous() for k, v in head.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = ["Qwen2ForProcessRewardModel"]
    config.save_pretrained(out)


def tiny_process_bundle(
    form: str,
    directory: str | Path,
    *,
    seed: int = 0,
    sizes: dict[str, Any] | None = None,
    **export_options: Any,
) -> Path:
    """A tiny process checkpoint of ``form`` in ``directory/checkpoint`` exported to ``directory/bundle``."""
    from rmserve.models.export import export_bundle
    from rmserve.models.process_heads import StepExport

    root = Path(directory)
    checkpoint = tiny_process_checkpoint(form, root / "checkpoint", seed=seed, sizes=sizes)
    rule = export_options.pop("rule", "sigmoid" if form == "llama-tc1" else None)
    step = StepExport(STEP_TOKENS[form], rule)
    export_bundle(checkpoint, root / "bundle", name=f"tiny-{form}", step=step, **export_options)
    return root / "bundle"
