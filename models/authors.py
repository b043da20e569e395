"""The authors' reference at export: run the family's usage on the fixed conversations, decide the BOS
policy from it, and hold the served token ids and scores to it (parity calls ``compare``).

The token ids the server makes for each conversation must be identical to the reference's, and the
bundle's fp32 score within ``tolerance * max(1, |reference|)`` of the reference's.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rmserve.bundle import Bundle
from rmserve.engines.base import TokenBatch
from rmserve.engines.batches import engine_rows
from rmserve.errors import InvalidItem
from rmserve.formatting import Encoded
from rmserve.items import ChatItem, Item, Message, PairItem, TextItem, ToolCall
from rmserve.kinds import kind_of
from rmserve.models.families import Conversation, ModelFamily, Reference, ReferenceSettings
from rmserve.models.families.conversations import CONVERSATIONS
from rmserve.models.families.reference import question_answer
from rmserve.models.graph import ExportError

# The longest conversation the reference runs: its eager forward pass is quadratic in length, so a model
# trained for 128k tokens is checked near 8,192 of them, not near its max_length.
LONGEST_REFERENCE = 8192
# A template that reads the date: its rendering changes with the day unless the date is pinned.
_READS_DATE = re.compile(r"strftime_now")


@dataclass(frozen=True)
class AuthorsReference:
    """The family, its reference run, and the BOS count decided from it (None: as the text tokenizes)."""

    family: ModelFamily
    reference: Reference
    bos_tokens: int | None
    bos_source: str
    layerwise: bool = False  # the reference's model read layer by layer (ReferenceSettings.layerwise)

    def as_manifest(self) -> dict[str, Any]:
        out = {
            "name": self.family.name,
            "title": self.family.title,
            "head": self.family.head,
            "recipe": self.reference.recipe,
            "source": self.family.source,
            "bos_tokens": self.bos_tokens,
            "bos_decided_by": self.bos_source,
        }
        if self.layerwise:
            out["model_loaded"] = "its class, each decoder layer's float32 weights read as it runs"
        return out


def today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def template_date(tokenizer: Any, requested: str | None) -> str | None:
    """The date to pin: ``requested`` (``--template-date``) or today, for a template reading the date."""
    template = getattr(tokenizer, "chat_template", None)
    if requested is not None:
        dt.date.fromisoformat(requested)  # ValueError names a malformed date
    if not isinstance(template, str) or not _READS_DATE.search(template):
        return None
    return requested or today()


def run_reference(
    checkpoint: Path,
    family: ModelFamily,
    tokenizer: Any,
    *,
    max_length: int,
    trust_remote_code: bool,
    date: str | None,
    bos_override: int | None,
    layerwise: bool = False,
) -> AuthorsReference:
    """The family's reference on the fixed conversations, and the BOS policy it implies; ``layerwise``:
    its model read layer by layer (``ReferenceSettings.layerwise``)."""
    if family.reference is None:
        raise ExportError(f"{family.title} has no reference usage to check an export against")
    bos_id = tokenizer.bos_token_id
    if bos_override is not None and (bos_id is None or family.input_format != "chat_template"):
        raise ExportError(f"--bos-tokens {bos_override}: only a decoder whose tokenizer has BOS takes it")
    longest = min(max_length, LONGEST_REFERENCE)
    settings = ReferenceSettings(trust_remote_code, date or today(), longest, bos_override, layerwise)
    reference = family.reference(checkpoint, CONVERSATIONS, settings)
    if bos_override is not None:
        return AuthorsReference(family, reference, bos_override, "--bos-tokens", layerwise)
    if family.input_format != "chat_template" or bos_id is None:
        return AuthorsReference(family, reference, None, "no BOS policy (as the text tokenizes)", layerwise)
    # Per conversation: the BOS ids the reference starts with, and those the template's text alone gives.
    counts = [_lead(x, bos_id) for x in reference.ids]
    plain = [tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in reference.rendered]
    own = [_lead(ids, bos_id) for ids in plain]
    if counts == own:
        own_bos = f"the template's BOS ({max(own, default=0)})"
        return AuthorsReference(family, reference, None, own_bos, layerwise)
    if len(set(counts)) != 1:
        raise ExportError(f"the reference starts its conversations with {sorted(set(counts))} BOS tokens")
    wanted = counts[0]
    how = "the tokenizer's" if max(own, default=0) == 0 else "the template's and the tokenizer's"
    return AuthorsReference(family, reference, wanted, f"{how} BOS ({wanted})", layerwise)


def _lead(ids: tuple[int, ...], bos: int) -> int:
    return len(ids) - len(_strip(ids, bos))


def _strip(ids: tuple[int, ...], bos: int | None) -> tuple[int, ...]:
    k = 0
    while k < len(ids) and ids[k] == bos:
        k += 1
    return ids[k:]


def message(data: Mapping[str, Any]) -> Message:
    """An OpenAI-shaped message dict as the server's Message."""
    calls = tuple(
        ToolCall(c["function"]["name"], c["function"]["arguments"], c.get("id"))
        for c in data.get("tool_calls") or ()
    )
    return Message(
        str(data["role"]),
        data.get("content"),
        calls,
        tool_call_id=data.get("tool_call_id"),
        name=data.get("name"),
    )


def not_comparable(bundle: Bundle, formatter: Any, authors: AuthorsReference) -> dict[str, str]:
    """The conversations the reference cannot be compared on, and why: longer than the bundle's
    max_length (the reference does not truncate; the server does), or holding tool calls and results
    that the template does not render (the server writes them by its documented fallback,
    docs/api.md; the authors' template leaves them out)."""
    limit = bundle.manifest.format.max_length
    out = {}
    for conv, ids in zip(authors.reference.conversations, authors.reference.ids, strict=True):
        if len(ids) > limit:
            out[conv.name] = f"{len(ids)} tokens, over max_length {limit}"
        elif by_fallback(bundle, formatter, conv):
            out[conv.name] = TOOL_FALLBACK
    return out


TOOL_FALLBACK = "the template does not render tool calls or results itself"


def by_fallback(bundle: Bundle, formatter: Any, conv: Conversation) -> bool:
    """Whether the server writes ``conv``'s tool calls or results by its documented fallback (docs/api.md:
    calls into the assistant's text, results as another role's turns) rather than by the template."""
    r = formatter.rendering
    chat = bundle.manifest.format.input_format == "chat_template"
    fallback = chat and (r.tool_calls != "template" or r.tool_role != "tool")
    return fallback and any(m.get("tool_calls") or m.get("role") == "tool" for m in conv.messages)


def _only(reference: Reference, keep: list[int]) -> Reference:
    from dataclasses import replace

    return replace(
        reference,
        conversations=tuple(reference.conversations[k] for k in keep),
        rendered=tuple(reference.rendered[k] for k in keep),
        ids=tuple(reference.ids[k] for k in keep),
        scores=tuple(reference.scores[k] for k in keep),
    )


def _served_accepts(kind: Any, bundle: Bundle, conv: Conversation) -> bool:
    """Whether the server encodes ``conv`` rather than refusing it (a 422)."""
    item = ChatItem(tuple(message(m) for m in conv.messages), conv.tools)
    if bundle.manifest.format.input_format != "chat_template":
        return False  # plain text is the caller's rendering; nothing to refuse
    try:
        kind.encode([item])
    except InvalidItem:
        return False
    return True


def served_items(bundle: Bundle, authors: AuthorsReference) -> list[Item]:
    """The reference's conversations as requests to the bundle: messages for a chat template, the
    rendered text for plain input, the (question, answer) pair for a text pair."""
    fmt = bundle.manifest.format.input_format
    ref = authors.reference
    if fmt == "text_pair":
        return [PairItem(*question_answer(c)) for c in ref.conversations]
    if fmt == "plain":
        return [TextItem(text) for text in ref.rendered]
    return [ChatItem(tuple(message(m) for m in c.messages), c.tools) for c in ref.conversations]


class Scorer(Protocol):
    """What scores token batches: the bundle's ONNX Runtime engine, or the float32 reference forward
    where no fp32 graph is written (a streamed reduced-precision export)."""

    def infer(self, batch: TokenBatch) -> np.ndarray: ...


def compare(
    bundle: Bundle, engine: Scorer, authors: AuthorsReference, tolerance: float
) -> tuple[dict[str, Any], list[str]]:
    """The served token ids and scores against the reference's: what was measured, and the problems."""
    from rmserve.formatting import Formatter

    formatter = Formatter(bundle)
    kind = kind_of(bundle.manifest.name, bundle, formatter)
    skipped = not_comparable(bundle, formatter, authors)
    keep = [k for k, c in enumerate(authors.reference.conversations) if c.name not in skipped]
    ref = _only(authors.reference, keep)
    items = served_items(bundle, authors)
    encoded: list[Encoded] = kind.encode([items[k] for k in keep])
    problems = [] if keep else ["no reference conversation fits max_length to compare on"]
    for conv in CONVERSATIONS:
        if conv.name in authors.reference.refused:
            skipped[conv.name] = authors.reference.refused[conv.name]
            if by_fallback(bundle, formatter, conv):
                # Gemma-2's template raises on a tool turn (roles must alternate); the server's fallback
                # gives it the result as a user turn, which that template renders.
                skipped[conv.name] += f"; the server scores it by its fallback ({TOOL_FALLBACK})"
            elif _served_accepts(kind, bundle, conv):
                problems.append(f"the authors' template refuses {conv.name!r}, but the server scores it")
    for conv, enc, ids in zip(ref.conversations, encoded, ref.ids, strict=True):
        if enc.ids != ids:
            pairs = enumerate(zip(enc.ids, ids, strict=False))
            at = next((k for k, (a, b) in pairs if a != b), min(len(enc.ids), len(ids)))
            problems.append(
                f"token ids differ from the reference's on {conv.name!r} at position {at}: served "
                f"{list(enc.ids[at : at + 4])} ({len(enc.ids)} ids), reference {list(ids[at : at + 4])} "
                f"({len(ids)} ids)"
            )
    pad = bundle.manifest.format.pad_token_id
    served = engine_rows(encoded, engine, pad, batch_items=1, read=kind.values)
    expected = np.asarray(ref.scores, dtype=np.float64)
    diff = np.abs(served - expected) / np.maximum(1.0, np.abs(expected))
    worst = float(diff.max()) if diff.size else 0.0
    if not np.isfinite(served).all() or worst > tolerance:
        name = ref.conversations[int(np.nan_to_num(diff, nan=np.inf).argmax())].name
        problems.append(
            f"the served score differs from the reference's by up to {worst:.3g} (scaled, on {name!r}), "
            f"over the tolerance {tolerance:g}"
        )
    result = {
        **authors.as_manifest(),
        "conversations": [c.name for c in ref.conversations],
        "not_compared": skipped,
        "tokens": [len(x) for x in ref.ids],
        "token_ids": "identical" if not any("token ids" in p for p in problems) else "differ",
        "max_diff": worst,
        "tolerance": tolerance,
        "rule": "served ids == reference ids; |served - reference| <= tolerance * max(1, |reference|)",
    }
    return result, problems
