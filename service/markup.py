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

Tool calls are read back too, so another template can render them its own way: ChatML's (Qwen2.5,
Qwen3, Hermes) ``<tool_call>`` JSON blocks in an assistant turn become its ``tool_calls`` and a user
turn of ``<tool_response>`` blocks becomes one tool message per block; Llama 3.1's JSON call
``{"name", "parameters"}`` as an assistant turn becomes a tool call, and its ``ipython`` turns tool
results. A turn whose blocks do not parse as calls stays text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from rmserve.items import ChatItem, Item, Message, Messages, TextItem, ToolCall

Markup = Literal["chatml", "llama3", "mistral", "gemma", "hh"]
Outcome = Literal["as_is", "retemplated", "unrecognised"]

# End-of-text and padding markers of common policies: never part of a message's words.
POLICY_SPECIALS = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
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
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_TOOL_RESPONSE = re.compile(r"<tool_response>\n?(.*?)\n?</tool_response>", re.S)


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
    read = _chatml_turn if markup == "chatml" else _llama3_turn if markup == "llama3" else _plain_turn
    messages = [m for role, content in turns for m in read("assistant" if role == "model" else role, content)]
    if not messages or any(m.role not in _ROLES for m in messages):
        return None
    return tuple(messages)


def _call(value: Any, arguments_key: str) -> ToolCall | None:
    """A call written as JSON (``{"name", "arguments"}`` or Llama's ``{"name", "parameters"}``)."""
    if not isinstance(value, dict) or set(value) != {"name", arguments_key}:
        return None
    name, arguments = value["name"], value[arguments_key]
    if not isinstance(name, str) or not isinstance(arguments, dict | str):
        return None
    return ToolCall(name, arguments)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _plain_turn(role: str, content: str) -> list[Message]:
    return [Message(role, content)]


def _chatml_turn(role: str, content: str) -> list[Message]:
    """ChatML's tool markup: ``<tool_call>`` blocks after an assistant's text, ``<tool_response>`` turns."""
    if role == "assistant" and "<tool_call>" in content:
        text = content[: content.index("<tool_call>")].strip()
        calls = [_call(_json(block), "arguments") for block in _TOOL_CALL.findall(content)]
        rest = _TOOL_CALL.sub("", content).strip()
        if rest == text and calls and all(c is not None for c in calls):
            return [Message("assistant", text or None, tuple(c for c in calls if c is not None))]
    if role == "user" and content.startswith("<tool_response>") and content.endswith("</tool_response>"):
        results = _TOOL_RESPONSE.findall(content)
        if _TOOL_RESPONSE.sub("", content).strip() == "":
            return [Message("tool", r) for r in results]
    return [Message(role, content)]


def _llama3_turn(role: str, content: str) -> list[Message]:
    """Llama 3.1's tool markup: an assistant turn that is one JSON call, ``ipython`` results."""
    if role == "assistant" and content.startswith("{"):
        call = _call(_json(content), "parameters")
        if call is not None:
            return [Message("assistant", None, (call,))]
    return [Message(role, content)]


def prompt_messages(text: str, markup: Markup) -> Messages | None:
    """A rendered prompt's messages, without the empty assistant turn a generation prompt opens."""
    messages = split(text, markup)
    if (
        messages
        and messages[-1].role == "assistant"
        and not (messages[-1].content or messages[-1].tool_calls)
    ):
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
