"""The items a reward model scores, in every shape the API takes, and the HH transcript.

Plain frozen dataclasses with no dependencies: the client builds them without the server stack, and the
server's formatter (``rmserve.formatting``) turns them into token ids.

A ``Message`` is one type from the API's edge to the chat template: OpenAI's (and transformers')
message shape, with ``content`` as text, text parts or nothing, an assistant's ``tool_calls``, and a
tool result's ``tool_call_id`` and ``name``. Where a rendering cannot show a tool call (an HH transcript,
a chat template without tool support), it is written into the turn's text in one documented form,
``<tool_call>`` JSON blocks (``tool_call_text``), never dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
# A tool's result (TRL's tool-calling GRPO appends {"role": "tool"} messages) gets a turn of its own.
_HH_ROLES = {
    "user": HUMAN,
    "human": HUMAN,
    "system": "\n\nSystem:",
    "assistant": ASSISTANT,
    "tool": "\n\nTool:",
    "ipython": "\n\nTool:",
}
# The roles of a tool's result: "tool" (OpenAI, Qwen, Mistral) and "ipython" (Llama 3.1).
TOOL_ROLES = ("tool", "ipython")


class FieldError(ValueError):
    """A value an item cannot take, at ``field`` within the item (``messages[2].role``)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# Text parts of one message, joined where a template reads content only as text (vLLM joins them the
# same way: vllm-project/vllm vllm/entrypoints/chat_utils.py, _parse_chat_message_content_parts).
PART_SEPARATOR = "\n"

TextParts = tuple[str, ...]


@dataclass(frozen=True)
class ToolCall:
    """One function call of an assistant turn (OpenAI: ``{"id", "type": "function", "function": {"name",
    "arguments"}}``). ``arguments`` is kept as given, a JSON string (OpenAI, veRL) or an object
    (transformers, TRL): chat templates render the two differently (a string as it is, an object
    through ``tojson``)."""

    name: str
    arguments: str | Mapping[str, Any]
    id: str | None = None


@dataclass(frozen=True)
class Message:
    """One turn. ``content`` is text, the text parts of a parts list, or None (an assistant turn that
    only calls tools)."""

    role: str
    content: str | TextParts | None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None

    @property
    def text(self) -> str:
        """The content as one text: parts joined, nothing as ``""``."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return PART_SEPARATOR.join(self.content)


Messages = tuple[Message, ...]


def arguments_text(arguments: str | Mapping[str, Any]) -> str:
    """Tool-call arguments as JSON text: a string as given, an object with its keys in order."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def arguments_value(arguments: str | Mapping[str, Any]) -> str | dict[str, Any]:
    """Tool-call arguments as a JSON value: the string, or the object as a plain dict."""
    return arguments if isinstance(arguments, str) else dict(arguments)


def tool_call_text(call: ToolCall) -> str:
    """A tool call written as text where the rendering has no markup for it: a ``<tool_call>`` block
    holding ``{"name": ..., "arguments": ...}``, the Hermes form Qwen2.5 and Qwen3 templates write."""
    name = json.dumps(call.name, ensure_ascii=False)
    return f'<tool_call>\n{{"name": {name}, "arguments": {arguments_text(call.arguments)}}}\n</tool_call>'


def written_text(message: Message) -> str:
    """The message's text with its tool calls written after it, one ``<tool_call>`` block a line."""
    return "\n".join([t for t in (message.text,) if t] + [tool_call_text(c) for c in message.tool_calls])


def tool_call_dict(call: ToolCall) -> dict[str, Any]:
    out: dict[str, Any] = {} if call.id is None else {"id": call.id}
    function = {"name": call.name, "arguments": arguments_value(call.arguments)}
    return out | {"type": "function", "function": function}


def message_dict(message: Message) -> dict[str, Any]:
    """The message in OpenAI's shape, as the API takes it; fields without a value are left out (as
    transformers' ``apply_chat_template`` leaves out None-valued keys)."""
    out: dict[str, Any] = {"role": message.role}
    if isinstance(message.content, tuple):
        out["content"] = [{"type": "text", "text": t} for t in message.content]
    elif message.content is not None:
        out["content"] = message.content
    if message.tool_calls:
        out["tool_calls"] = [tool_call_dict(c) for c in message.tool_calls]
    for key in ("tool_call_id", "name", "reasoning_content"):
        if getattr(message, key) is not None:
            out[key] = getattr(message, key)
    return out


@dataclass(frozen=True)
class PairItem:
    prompt: str | Messages
    response: str


@dataclass(frozen=True)
class ChatItem:
    messages: Messages
    # The functions the assistant may call (OpenAI's ``tools``: JSON schemas), for templates that
    # render them (``ChatTemplate.render``).
    tools: tuple[Mapping[str, Any], ...] | None = None


@dataclass(frozen=True)
class TextItem:
    text: str


@dataclass(frozen=True)
class StepsItem:
    """A solution in steps, for a process reward model: each step gets a reward of its own."""

    prompt: str | Messages
    steps: tuple[str, ...]


Item = PairItem | ChatItem | TextItem | StepsItem
# A blank line between steps, as the Qwen PRM model cards split a solution.
STEP_SEPARATOR = "\n\n"


def split_steps(text: str, separator: str = STEP_SEPARATOR) -> tuple[str, ...]:
    """A solution's steps: ``text`` cut at ``separator``, each step stripped, empty ones left out.
    Text with no step in it is one (possibly empty) step, so every solution gets a reward."""
    steps = tuple(s.strip() for s in text.split(separator) if s.strip()) if separator else ()
    return steps or (text.strip(),)


def render_hh(messages: Messages, field: str = "messages") -> str:
    """Messages as an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ..."); a role it cannot
    show is a FieldError at ``field[j].role``."""
    parts = []
    for j, m in enumerate(messages):
        marker = _HH_ROLES.get(m.role)
        if marker is None:
            raise FieldError(
                f"{field}[{j}].role", f"unknown role {m.role!r}; allowed roles: {', '.join(_HH_ROLES)}"
            )
        parts.append(f"{marker} {written_text(m)}")
    return "".join(parts)


def split_hh(text: str) -> tuple[str, str] | None:
    """Split an HH transcript at its last Assistant turn: (prompt ending in the marker, response)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        return None
    return text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT) :].strip()


def as_pair(item: Item) -> tuple[str, str] | None:
    """The (prompt, response) of an item for a text_pair model; None when the item is one text."""
    if isinstance(item, StepsItem):
        raise ValueError("steps are scored by process reward models, not as a (prompt, response) pair")
    if isinstance(item, PairItem):
        prompt = item.prompt if isinstance(item.prompt, str) else render_hh(item.prompt, "prompt") + ASSISTANT
        return prompt, item.response
    if isinstance(item, ChatItem):
        *context, last = item.messages
        if last.role != "assistant":
            raise FieldError(
                f"messages[{len(context)}].role",
                f"the last message must be the assistant's response (role 'assistant'), not {last.role!r}",
            )
        return render_hh(tuple(context)) + ASSISTANT, written_text(last)
    return split_hh(item.text)


def as_messages(item: PairItem | ChatItem) -> Messages:
    """The conversation of an item: its messages, or its prompt's followed by the response's turn."""
    if isinstance(item, ChatItem):
        return item.messages
    context = (Message("user", item.prompt),) if isinstance(item.prompt, str) else item.prompt
    return (*context, Message("assistant", item.response))


def text_problem(text: str) -> str | None:
    """Why a tokenizer cannot take ``text``, or None when it can.

    Text must be valid Unicode: JSON's ``\\ud800`` escapes decode to lone UTF-16 surrogates, which no
    UTF-8 tokenizer (nor any UTF-8 body) can carry. NUL and other control characters are valid text
    and are tokenized like any other character.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"has a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start} "
            "(text must be valid Unicode)"
        )
    return None


def item_texts(item: Item) -> Iterator[tuple[str, str]]:
    """(field, text) of every text an item carries, fields named as in the API's item shapes."""
    if isinstance(item, TextItem):
        yield "text", item.text
        return
    messages = item.messages if isinstance(item, ChatItem) else item.prompt
    field = "messages" if isinstance(item, ChatItem) else "prompt"
    if isinstance(messages, str):
        yield "prompt", messages
    else:
        for i, m in enumerate(messages):
            yield from message_texts(f"{field}[{i}]", m)
    if isinstance(item, PairItem):
        yield "response", item.response
    if isinstance(item, StepsItem):
        for i, step in enumerate(item.steps):
            yield f"steps[{i}]", step


def message_texts(where: str, message: Message) -> Iterator[tuple[str, str]]:
    """(field, text) of every text a message carries, tool calls' names and arguments included."""
    yield f"{where}.role", message.role
    if isinstance(message.content, tuple):
        for j, part in enumerate(message.content):
            yield f"{where}.content[{j}].text", part
    elif message.content is not None:
        yield f"{where}.content", message.content
    for j, call in enumerate(message.tool_calls):
        yield f"{where}.tool_calls[{j}].function.name", call.name
        yield f"{where}.tool_calls[{j}].function.arguments", arguments_text(call.arguments)
        if call.id is not None:
            yield f"{where}.tool_calls[{j}].id", call.id
    for key in ("tool_call_id", "name", "reasoning_content"):
        value = getattr(message, key)
        if value is not None:
            yield f"{where}.{key}", value


def item_problem(item: Item) -> str | None:
    """``"<field> <why>"`` for the first text of ``item`` a tokenizer cannot take, or None."""
    for field, text in item_texts(item):
        problem = text_problem(text)
        if problem is not None:
            return f"{field} {problem}"
    return None
