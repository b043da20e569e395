"""The items a reward model scores, in every shape the API takes, and the HH transcript.

Plain frozen dataclasses with no dependencies: the client builds them without the server stack, and the
server's formatter (``rmserve.formatting``) turns them into token ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Message:
    role: str
    content: str


Messages = tuple[Message, ...]


@dataclass(frozen=True)
class PairItem:
    prompt: str | Messages
    response: str


@dataclass(frozen=True)
class ChatItem:
    messages: Messages


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


def render_hh(messages: Messages) -> str:
    """Messages as an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...")."""
    parts = []
    for m in messages:
        marker = _HH_ROLES.get(m.role)
        if marker is None:
            raise ValueError(f"unknown role {m.role!r}")
        parts.append(f"{marker} {m.content}")
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
        prompt = item.prompt if isinstance(item.prompt, str) else render_hh(item.prompt) + ASSISTANT
        return prompt, item.response
    if isinstance(item, ChatItem):
        *context, last = item.messages
        if last.role != "assistant":
            raise ValueError("the last message must be the assistant's response")
        return render_hh(tuple(context)) + ASSISTANT, last.content
    return split_hh(item.text)


def as_messages(item: PairItem | ChatItem) -> list[dict[str, str]]:
    if isinstance(item, ChatItem):
        return [{"role": m.role, "content": m.content} for m in item.messages]
    if isinstance(item.prompt, str):
        context = [{"role": "user", "content": item.prompt}]
    else:
        context = [{"role": m.role, "content": m.content} for m in item.prompt]
    return [*context, {"role": "assistant", "content": item.response}]


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
            yield f"{field}[{i}].role", m.role
            yield f"{field}[{i}].content", m.content
    if isinstance(item, PairItem):
        yield "response", item.response
    if isinstance(item, StepsItem):
        for i, step in enumerate(item.steps):
            yield f"steps[{i}]", step


def item_problem(item: Item) -> str | None:
    """``"<field> <why>"`` for the first text of ``item`` a tokenizer cannot take, or None."""
    for field, text in item_texts(item):
        problem = text_problem(text)
        if problem is not None:
            return f"{field} {problem}"
    return None
