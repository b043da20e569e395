"""Cache keys and values.

A score is a pure function of (bundle version, format settings, backend, precision, item). The
namespace digests everything but the item; the key digests the namespace and a length-delimited
encoding of the item, so two different items can never share a key. A message is encoded whole
(``canonical_message``): its content (text, parts or none), tool calls and tool fields, so two
conversations that differ only in a tool call never share a key, and single-flight (which joins
items by key) never joins them.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

from rmserve.bundle import Manifest
from rmserve.items import ChatItem, Item, Message, PairItem, TextItem, arguments_value

_LEN = struct.Struct(">Q")
# The layout of the item encoding below, part of the namespace: a new layout never reads old entries.
_KEY_LAYOUT = 2
_VALUE = struct.Struct(">dIB")  # score (float64 holds the float32 exactly), tokens, truncated


def namespace(manifest: Manifest, provider: str, precision: str) -> bytes:
    meta = {
        "version": manifest.version,
        "digest": manifest.digest,
        "format": manifest.format.model_dump(mode="json"),
        "provider": provider,
        "precision": precision,
        "key_layout": _KEY_LAYOUT,
    }
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).digest()


def _field(out: list[bytes], value: str) -> None:
    raw = value.encode("utf-8", "surrogatepass")
    out.append(_LEN.pack(len(raw)))
    out.append(raw)


def canonical_message(m: Message) -> str:
    """One message as compact JSON with a fixed field order: content as text, a list of text parts or
    null; each tool call's arguments as given (a JSON string stays a string; an object keeps its key
    order, which the template's ``tojson`` keeps too)."""
    content = list(m.content) if isinstance(m.content, tuple) else m.content
    calls = [[c.id, c.name, arguments_value(c.arguments)] for c in m.tool_calls]
    fields = [m.role, content, calls, m.tool_call_id, m.name, m.reasoning_content]
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def _messages(out: list[bytes], messages: tuple[Message, ...]) -> None:
    out.append(_LEN.pack(len(messages)))
    for m in messages:
        _field(out, canonical_message(m))


def encode_item(item: Item) -> bytes:
    """A length-delimited, type-tagged encoding: injective over items."""
    out: list[bytes] = []
    if isinstance(item, PairItem):
        if isinstance(item.prompt, str):
            out.append(b"P")
            _field(out, item.prompt)
        else:
            out.append(b"M")
            _messages(out, item.prompt)
        _field(out, item.response)
    elif isinstance(item, ChatItem):
        out.append(b"C")
        _messages(out, item.messages)
    elif isinstance(item, TextItem):
        out.append(b"T")
        _field(out, item.text)
    else:  # pragma: no cover - the Item union is closed
        raise TypeError(f"not an item: {item!r}")
    return b"".join(out)


def item_key(ns: bytes, item: Item) -> str:
    return hashlib.sha256(ns + encode_item(item)).hexdigest()


@dataclass(frozen=True)
class Scored:
    """What the cache keeps for an item: enough to answer without tokenizing again."""

    score: float
    tokens: int
    truncated: bool

    def pack(self) -> bytes:
        return _VALUE.pack(self.score, self.tokens, int(self.truncated))

    @classmethod
    def unpack(cls, raw: bytes) -> Scored | None:
        if len(raw) != _VALUE.size:
            return None  # not ours, or an older layout: treat as a miss
        score, tokens, truncated = _VALUE.unpack(raw)
        return cls(score, tokens, bool(truncated))
