"""Cache keys and values.

A score is a pure function of (bundle version, format settings, backend, precision, item). The
namespace digests everything but the item; the key digests the namespace and a length-delimited
encoding of the item, so two different items can never share a key. A message is encoded whole
(``canonical_message``): its content (text, parts or none), tool calls and tool fields, so two
conversations that differ only in a tool call never share a key, and single-flight (which joins
items by key) never joins them.

A process model's value is an item's step rewards (the prompt, encoded as any item's prompt is, and
every step are in the key); the aggregate a request asks for is computed from them per response, so
one entry serves every aggregate.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

from rmserve.bundle import Manifest
from rmserve.items import ChatItem, Item, Message, PairItem, StepsItem, TextItem, arguments_value

_LEN = struct.Struct(">Q")
# The layout of the item encoding below, part of the namespace: a new layout never reads old entries.
_KEY_LAYOUT = 2
_VALUE = struct.Struct(">dIB")  # score (float64 holds the float32 exactly), tokens, truncated
# A step value: b"S", tokens, truncated, steps dropped, then one float64 per step kept.
_STEPS = struct.Struct(">cIBI")


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


def _prompt(out: list[bytes], prompt: str | tuple[Message, ...], tags: tuple[bytes, bytes]) -> None:
    """A prompt under the item's tag for text (``tags[0]``) or for messages (``tags[1]``)."""
    if isinstance(prompt, str):
        out.append(tags[0])
        _field(out, prompt)
    else:
        out.append(tags[1])
        _messages(out, prompt)


def encode_item(item: Item) -> bytes:
    """A length-delimited, type-tagged encoding: injective over items."""
    out: list[bytes] = []
    if isinstance(item, PairItem):
        _prompt(out, item.prompt, (b"P", b"M"))
        _field(out, item.response)
    elif isinstance(item, ChatItem):
        out.append(b"C")
        _messages(out, item.messages)
        if item.tools is not None:  # absent from the key when not given, so such keys never changed
            out.append(b"t")
            _field(out, json.dumps(list(item.tools), sort_keys=True, separators=(",", ":"), default=str))
    elif isinstance(item, TextItem):
        out.append(b"T")
        _field(out, item.text)
    elif isinstance(item, StepsItem):
        _prompt(out, item.prompt, (b"S", b"N"))
        out.append(_LEN.pack(len(item.steps)))
        for step in item.steps:
            _field(out, step)
    else:  # pragma: no cover - the Item union is closed
        raise TypeError(f"not an item: {item!r}")
    return b"".join(out)


def item_key(ns: bytes, item: Item) -> str:
    return hashlib.sha256(ns + encode_item(item)).hexdigest()


@dataclass(frozen=True)
class Scored:
    """What the cache keeps for an item: enough to answer without tokenizing again.

    ``value`` is an outcome model's score, or a process model's step rewards (``rmserve.kinds``);
    ``dropped`` counts the trailing steps truncation left out.
    """

    value: float | tuple[float, ...]
    tokens: int
    truncated: bool
    dropped: int = 0

    def pack(self) -> bytes:
        if isinstance(self.value, tuple):
            head = _STEPS.pack(b"S", self.tokens, int(self.truncated), self.dropped)
            return head + struct.pack(f">{len(self.value)}d", *self.value)
        return _VALUE.pack(self.value, self.tokens, int(self.truncated))

    @classmethod
    def unpack(cls, raw: bytes) -> Scored | None:
        if len(raw) == _VALUE.size:
            score, tokens, truncated = _VALUE.unpack(raw)
            return cls(score, tokens, bool(truncated))
        n, rest = divmod(len(raw) - _STEPS.size, 8)
        if raw[:1] == b"S" and n > 0 and rest == 0:
            _, tokens, truncated, dropped = _STEPS.unpack(raw[: _STEPS.size])
            steps = struct.unpack(f">{n}d", raw[_STEPS.size :])
            return cls(tuple(steps), tokens, bool(truncated), dropped)
        return None  # not ours, or an older layout: treat as a miss
