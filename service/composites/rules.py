"""Rule components of a composite: values computed from the response text, no model.

- ``length``: ``-slope * |tokens - target| / target``, the response's tokens counted by a served bundle's
  tokenizer (no special tokens added);
- ``regex``: 1.0 when ``pattern`` is found in the response (``re.search``), else 0.0; with ``match: false``
  the other way round;
- ``label_match``: 1.0 when the answer taken from the response equals the item's ``label``, else 0.0. The
  answer is (``extract``) the content of the last ``\\boxed{...}`` (braces balanced), the last number
  (``-1,234.5`` reads as -1234.5), or the whole response (``text``), stripped. When both the answer and the
  label read as numbers they are compared as numbers (``42``, ``42.0`` and ``4.2e1`` are equal); otherwise
  as text. No answer found is 0.0; an item without a label is a 422.

The response of an item: a pair's ``response``; the last message of a conversation; a text's last turn
when it carries chat markup (any policy's, ``rmserve.markup``) or an HH transcript, else the whole text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer

from rmserve.errors import InvalidItem
from rmserve.items import ChatItem, Item, PairItem, StepsItem, TextItem, split_hh, written_text
from rmserve.markup import detect, split

_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")
_BOXED = "\\boxed{"


def response_text(item: Item) -> str:
    if isinstance(item, PairItem):
        return item.response
    if isinstance(item, ChatItem):
        return written_text(item.messages[-1])
    if isinstance(item, StepsItem):
        return "\n\n".join(item.steps)
    assert isinstance(item, TextItem)
    markup = detect(item.text)
    if markup is not None and markup != "hh":
        messages = split(item.text, markup)
        if messages and messages[-1].role == "assistant":
            return written_text(messages[-1])
    pair = split_hh(item.text)
    return pair[1] if pair is not None else item.text


def length_values(items: Sequence[Item], tokenizer: Tokenizer, target: int, slope: float) -> list[float]:
    encodings = tokenizer.encode_batch([response_text(i) for i in items], add_special_tokens=False)
    return [-slope * abs(len(e.ids) - target) / target for e in encodings]


def regex_values(items: Sequence[Item], pattern: str, match: bool) -> list[float]:
    found = re.compile(pattern)
    return [float((found.search(response_text(i)) is not None) == match) for i in items]


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, nested braces kept; None when there is none closed."""
    start = text.rfind(_BOXED)
    while start >= 0:
        depth, i = 1, start + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(_BOXED) : i - 1].strip()
        start = text.rfind(_BOXED, 0, start)
    return None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def extract_answer(text: str, how: str) -> str | None:
    if how == "boxed":
        return last_boxed(text)
    if how == "last_number":
        return last_number(text)
    return text.strip()


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip().replace(",", "")
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def same_answer(answer: str, label: Any) -> bool:
    a, b = _as_number(answer), _as_number(label)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return answer.strip() == str(label).strip()


def label_values(items: Sequence[Item], labels: Sequence[Any] | None, extract: str) -> list[float]:
    out = []
    for i, item in enumerate(items):
        label = labels[i] if labels is not None else None
        if label is None:
            raise InvalidItem(i, "has no label; this composite compares the answer with the item's label")
        answer = extract_answer(response_text(item), extract)
        out.append(float(answer is not None and same_answer(answer, label)))
    return out
