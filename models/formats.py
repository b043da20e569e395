"""How the server turns a checkpoint's text into token ids: format settings and tokenizer files."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rmserve.bundle import FormatSettings
from rmserve.models.graph import ExportError
from rmserve.models.heads import ModelMeta

# Only where neither the config nor the tokenizer states the model's context.
FALLBACK_MAX_LENGTH = {"encoder": 512, "decoder": 4096}
# Used when a decoder's tokenizer has no chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
)


def default_max_length(tokenizer: Any, meta: ModelMeta) -> int:
    """The model's trained context: ``max_position_embeddings``, or the tokenizer's ``model_max_length``
    where that is smaller (a tokenizer without one says 1e30); the fallback when neither states it."""
    limits = [int(meta.max_position_embeddings or 0), int(min(tokenizer.model_max_length or 0, 1 << 30))]
    stated = [n for n in limits if 1 < n < 1 << 30]
    return min(stated) if stated else FALLBACK_MAX_LENGTH[meta.family]


def format_settings(
    tokenizer: Any,
    meta: ModelMeta,
    *,
    max_length: int | None,
    input_format: str | None,
    bos_tokens: int | None = None,
    template_date: str | None = None,
) -> FormatSettings:
    """How the server must turn items into token ids for this checkpoint."""
    fmt = input_format or ("text_pair" if meta.family == "encoder" else "chat_template")
    if fmt == "text_pair" and meta.family == "decoder":
        raise ExportError("text_pair is an encoder format; a decoder reads chat_template or plain text")
    template = None
    if fmt == "chat_template":
        template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        if not isinstance(template, str):
            raise ExportError("the tokenizer has several named chat templates; pass one as plain text")
    return FormatSettings(
        input_format=fmt,  # type: ignore[arg-type]
        max_length=max_length or default_max_length(tokenizer, meta),
        pooling=meta.pooling,
        pad_token_id=meta.pad_token_id,
        # Decoder text arrives rendered, special tokens included (the template writes BOS/EOS).
        add_special_tokens=meta.family == "encoder",
        chat_template=template,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        bos_tokens=bos_tokens,
        template_date=template_date if template is not None else None,
    )


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json, nothing else.

    transformers 5 also writes chat_template.jinja and may skip special_tokens_map.json; the
    template lives in the manifest (it is digested there), and the map is written here.
    """
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            source = Path(scratch) / file
            if not source.is_file():
                raise ExportError(f"the tokenizer did not save {file}; a fast tokenizer is needed")
            shutil.copyfile(source, directory / file)
    specials = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")
