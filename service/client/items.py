"""Items in the documented shapes a caller holds -> the API's JSON item.

The shapes: ``(prompt, response)`` (a prompt is text or a message list; a response is text, or the
assistant's messages of a conversational completion), the API's own dicts (``{"prompt",
"response"}``, ``{"messages"}``, ``{"text"}``), a message list, and the server's item types
(``rmserve.items``: ``PairItem``, ``ChatItem``, ``TextItem``), so code that already holds them
(``rmserve eval``) sends them unconverted. Anything else is refused with ``BadRequestError`` naming
the item, before any request: a bare string is not taken for formatted text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rmserve.client.errors import BadRequestError
from rmserve.items import ChatItem, Item, Message, PairItem, TextItem

MessageLike = Mapping[str, Any]
# What ``score`` accepts per item: (prompt, response), an API-shaped dict, a message list, or one of
# the server's item types.
ItemLike = tuple[Any, Any] | Mapping[str, Any] | Sequence[MessageLike] | Item


def _refused(message: str) -> BadRequestError:
    return BadRequestError(message, type="invalid_request")


def message_text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a multimodal content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = [p for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
        return "".join(str(p.get("text", "")) for p in parts)
    raise _refused(f"message content must be text or a list of parts, not {type(content).__name__}")


def _message_dict(message: MessageLike | Message, where: str) -> dict[str, str]:
    if isinstance(message, Message):
        return {"role": message.role, "content": message.content}
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise _refused(f"{where}: a message is a mapping with 'role' and 'content'")
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
    return {"prompt": prompt, "response": item.response}


def to_item(value: ItemLike, index: int = 0) -> dict[str, Any]:
    """One item in any accepted shape -> the API's JSON item."""
    where = f"items[{index}]"
    v: Any = value  # checked shape by shape below
    if isinstance(v, str):
        raise _refused(
            f"{where}: a bare string is not an item; send (prompt, response), or "
            '{"text": ...} for text already formatted for the model'
        )
    if isinstance(v, PairItem | ChatItem | TextItem):
        return _server_item(v, where)
    if isinstance(v, Mapping):
        if "messages" in v:
            return {"messages": [_message_dict(m, where) for m in v["messages"]]}
        if "text" in v:
            return {"text": v["text"]}
        if "prompt" in v or "response" in v:  # the API's pair: the missing one named as the server does
            missing = "response" if "prompt" in v else "prompt"
            if missing not in v:
                raise _refused(f"{where}.{missing}: Field required")
            return to_item((v["prompt"], v["response"]), index)
        raise _refused(f"{where}: a dict item has 'prompt' and 'response', 'messages', or 'text'")
    if _is_messages(v):
        return {"messages": [_message_dict(m, where) for m in v]}
    if isinstance(v, Sequence) and len(v) == 2:
        prompt, response = v
        if _is_messages(response):  # a conversational completion: [{"role": "assistant", ...}]
            prompt_msgs = prompt if _is_messages(prompt) else [{"role": "user", "content": prompt}]
            return {"messages": [_message_dict(m, where) for m in [*prompt_msgs, *response]]}
        if not isinstance(response, str):
            raise _refused(f"{where}: a response is text, not {type(response).__name__}")
        if _is_messages(prompt):
            return {"prompt": [_message_dict(m, where) for m in prompt], "response": response}
        if isinstance(prompt, str):
            return {"prompt": prompt, "response": response}
    raise _refused(
        f"{where}: expected (prompt, response), a dict, a message list or one of rmserve.items' types, "
        f"not {type(value).__name__}"
    )
