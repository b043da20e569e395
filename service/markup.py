"""Chat markup a policy rendered, read back into messages so a bundle can render them its own way.

OpenRLHF and slime send text the policy's tokenizer rendered: ChatML from a Qwen policy, Llama-3
headers, Mistral ``[INST]``, Gemma turns or an HH transcript. A decoder reward model trained on
another template would read markup it never saw. ``detect`` names the markup of a text, ``split``
cuts it into messages, and ``reread`` decides, for one bundle, whether a text is scored as given or
re-rendered from its messages:

- ``as_is``: the text already carries the bundle's own markup (or the bundle reads any text);
- ``retemplated``: another markup was recognised and split; the messages are scored instead;
- ``unrecognised``: no markup was recognised, or it could not be split into turns ending with
  the assistant's reply; the text is scored as given, and the caller reports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from rmserve.items import ChatItem, Item, Message, Messages, TextItem

Markup = Literal["chatml", "llama3", "mistral", "gemma", "hh"]
Outcome = Literal["as_is", "retemplated", "unrecognised"]

# End-of-text and padding markers of common policies: never part of a message's words.
POLICY_SPECIALS = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<end_of_turn>",
    "<pad>",
    "<|pad|>",
    "[PAD]",
    "[SEP]",
)

# The first sign found names the markup; HH (plain words) is tried last.
_SIGNS: tuple[tuple[Markup, str], ...] = (
    ("llama3", "<|start_header_id|>"),
    ("chatml", "<|im_start|>"),
    ("gemma", "<start_of_turn>"),
    ("mistral", "[INST]"),
)

_TURNS = {
    "chatml": re.compile(r"<\|im_start\|>(\w+)\n?(.*?)(?:<\|im_end\|>|(?=<\|im_start\|>)|$)", re.S),
    "llama3": re.compile(
        r"<\|start_header_id\|>(\w+)<\|end_header_id\|>(.*?)(?:<\|eot_id\|>|(?=<\|start_header_id\|>)|$)",
        re.S,
    ),
    "gemma": re.compile(r"<start_of_turn>(\w+)\n?(.*?)(?:<end_of_turn>|(?=<start_of_turn>)|$)", re.S),
}
_MISTRAL = re.compile(r"\[INST\](.*?)\[/INST\](.*?)(?=\[INST\]|$)", re.S)
_HH = re.compile(r"\n\n(Human|Assistant|System|Tool):", re.S)
_HH_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system", "Tool": "tool"}
_ROLES = {"system", "user", "assistant", "tool", "ipython", "model"}


def strip_trailing(text: str, tokens: tuple[str, ...]) -> str:
    """Remove any run of ``tokens`` (and whitespace between them) from the end of ``text``."""
    changed = True
    while changed:
        changed = False
        stripped = text.rstrip()
        for tok in tokens:
            if tok and stripped.endswith(tok):
                text = stripped[: -len(tok)]
                changed = True
    return text


def detect(text: str) -> Markup | None:
    """The chat markup ``text`` was rendered with, or None when it carries none we know."""
    for name, sign in _SIGNS:
        if sign in text:
            return name
    if ("\n\nHuman:" in text or text.startswith("Human:")) and "Assistant:" in text:
        return "hh"
    return None


def _clean(content: str) -> str:
    return strip_trailing(content, POLICY_SPECIALS).strip()


def split(text: str, markup: Markup) -> Messages | None:
    """The messages of a text rendered with ``markup``; None when it does not split into turns."""
    turns: list[tuple[str, str]] = []
    if markup in _TURNS:
        turns = [(role, _clean(content)) for role, content in _TURNS[markup].findall(text)]
    elif markup == "mistral":
        for user, reply in _MISTRAL.findall(text):
            turns += [("user", _clean(user)), ("assistant", _clean(reply))]
    else:
        body = "\n\n" + text if text.startswith("Human:") else text
        parts = _HH.split(body)
        turns = [(_HH_ROLES[parts[i]], _clean(parts[i + 1])) for i in range(1, len(parts) - 1, 2)]
    messages = [Message("assistant" if role == "model" else role, content) for role, content in turns]
    if not messages or any(m.role not in _ROLES for m in messages):
        return None
    return tuple(messages)


def prompt_messages(text: str, markup: Markup) -> Messages | None:
    """A rendered prompt's messages, without the empty assistant turn a generation prompt opens."""
    messages = split(text, markup)
    if messages and messages[-1].role == "assistant" and not messages[-1].content:
        messages = messages[:-1]
    if not messages or messages[-1].role == "assistant":
        return None
    return messages


@dataclass(frozen=True)
class Reading:
    """How one rendered text will be scored."""

    item: Item
    outcome: Outcome
    markup: Markup | None


def reread(text: str, own: Markup | None, *, enabled: bool = True) -> Reading:
    """Score ``text`` as given when it carries the bundle's markup ``own``, else from its messages."""
    found = detect(text)
    if not enabled or (found is not None and found == own):
        return Reading(TextItem(text), "as_is", found)
    messages = split(text, found) if found is not None else None
    if messages is None or messages[-1].role != "assistant":
        return Reading(TextItem(text), "unrecognised", found)
    return Reading(ChatItem(messages), "retemplated", found)


def reread_pair(prompt: str, response: str, own: Markup | None, *, enabled: bool = True) -> Reading | None:
    """A rendered prompt and its reply as messages, or None when the prompt carries no markup.

    ``outcome`` is ``as_is`` when the prompt already carries the bundle's own markup (its messages
    are still used: the reply is rendered with its end-of-turn marker, as the bundle expects).
    """
    found = detect(prompt)
    if not enabled or found is None:
        return None
    messages = prompt_messages(prompt, found)
    if messages is None:
        return Reading(TextItem(prompt + response), "unrecognised", found)
    outcome: Outcome = "as_is" if found == own else "retemplated"
    return Reading(ChatItem((*messages, Message("assistant", response))), outcome, found)
