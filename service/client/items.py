"""Items in every shape a caller holds -> the API's JSON item.

The server's own item types (``rmserve.items``: ``PairItem``, ``ChatItem``, ``TextItem``,
``StepsItem``) are accepted as they are, so code that already holds them (``rmserve eval``) sends
them unconverted. A process reward model's item is ``(prompt, [step, ...])``, a dict with ``prompt``
(or ProcessBench's ``problem``) and ``steps``, a ``StepsItem``, or text carrying the step token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rmserve.items import ChatItem, Item, Message, PairItem, StepsItem, TextItem

MessageLike = Mapping[str, Any]
# What ``score`` accepts per item: (prompt, response), (prompt, [step, ...]), an API-shaped dict, a
# message list, text, or one of the server's item types.
ItemLike = (
    tuple[Any, str] | tuple[Any, Sequence[str]] | Mapping[str, Any] | Sequence[MessageLike] | str | Item
)


def message_text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a multimodal content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = [p for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
        return "".join(str(p.get("text", "")) for p in parts)
    raise TypeError(f"message content must be text or a list of parts, not {type(content).__name__}")


def _message_dict(message: MessageLike | Message, where: str) -> dict[str, str]:
    if isinstance(message, Message):
        return {"role": message.role, "content": message.content}
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise TypeError(f"{where}: a message is a mapping with 'role' and 'content'")
    return {"role": str(message["role"]), "content": message_text(message["content"])}


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and all(isinstance(m, Mapping) for m in value)
    )


def _server_item(item: Item, where: str) -> dict[str, Any]:
    """One of the server's items as JSON: the inverse of the API's ``ScoreItemIn.to_item``."""
    if isinstance(item, TextItem):
        return {"text": item.text}
    if isinstance(item, ChatItem):
        return {"messages": [_message_dict(m, where) for m in item.messages]}
    prompt = item.prompt if isinstance(item.prompt, str) else [_message_dict(m, where) for m in item.prompt]
    if isinstance(item, StepsItem):
        return {"prompt": prompt, "steps": list(item.steps)}
    return {"prompt": prompt, "response": item.response}


def _steps(prompt: Any, steps: Any, where: str) -> dict[str, Any]:
    if isinstance(steps, str) or not all(isinstance(s, str) for s in steps):
        raise TypeError(f"{where}: steps are a list of texts")
    shown = [_message_dict(m, where) for m in prompt] if _is_messages(prompt) else prompt
    if not isinstance(shown, str | list):
        raise TypeError(f"{where}: a prompt is text or a message list, not {type(prompt).__name__}")
    return {"prompt": shown, "steps": list(steps)}


def to_item(value: ItemLike, index: int = 0) -> dict[str, Any]:
    """One item in any accepted shape -> the API's JSON item."""
    where = f"items[{index}]"
    v: Any = value  # checked shape by shape below
    if isinstance(v, str):
        return {"text": value}
    if isinstance(v, PairItem | ChatItem | TextItem | StepsItem):
        return _server_item(v, where)
    if isinstance(v, Mapping):
        if "steps" in v and ("prompt" in v or "problem" in v):
            return _steps(v.get("prompt", v.get("problem")), v["steps"], where)
        if "messages" in v:
            return {"messages": [_message_dict(m, where) for m in v["messages"]]}
        if "text" in v:
            return {"text": v["text"]}
        if "prompt" in v and ("response" in v or "completion" in v):
            return to_item((v["prompt"], v.get("response", v.get("completion"))), index)
        raise TypeError(
            f"{where}: a dict item has 'prompt' and 'response' (or 'steps'), 'messages', or 'text'"
        )
    if _is_messages(v):
        return {"messages": [_message_dict(m, where) for m in v]}
    if isinstance(v, Sequence) and len(v) == 2:
        prompt, response = v
        steps = not isinstance(response, str) and isinstance(response, Sequence) and bool(response)
        if steps and all(isinstance(s, str) for s in response):  # (prompt, [step, ...]): a solution in steps
            return _steps(prompt, response, where)
        if _is_messages(response):  # a conversational completion: [{"role": "assistant", ...}]
            prompt_msgs = prompt if _is_messages(prompt) else [{"role": "user", "content": prompt}]
            return {"messages": [_message_dict(m, where) for m in [*prompt_msgs, *response]]}
        if not isinstance(response, str):
            raise TypeError(f"{where}: a response is text, not {type(response).__name__}")
        if _is_messages(prompt):
            return {"prompt": [_message_dict(m, where) for m in prompt], "response": response}
        if isinstance(prompt, str):
            return {"prompt": prompt, "response": response}
    raise TypeError(
        f"{where}: expected (prompt, response), a dict, a message list or text, not {type(value).__name__}"
    )
