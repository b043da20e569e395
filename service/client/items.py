"""Items in the documented shapes a caller holds -> the API's JSON item.

The shapes: ``(prompt, response)`` (a prompt is text or a message list; a response is text, or the
assistant's messages of a conversational completion), the API's own dicts (``{"prompt",
"response"}``, ``{"messages"}``, ``{"text"}``), a message list, and the server's item types
(``rmserve.items``: ``PairItem``, ``ChatItem``, ``TextItem``, ``StepsItem``), so code that already
holds them (``rmserve eval``) sends them unconverted. A process reward model's item is ``(prompt,
[step, ...])``, a dict with ``prompt`` (or ProcessBench's ``problem``) and ``steps``, a ``StepsItem``,
or ``{"text"}`` carrying the step token. Anything else is refused with ``BadRequestError`` naming the
item, before any request: a bare string is not taken for formatted text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rmserve.client.errors import BadRequestError
from rmserve.items import PART_SEPARATOR, ChatItem, Item, Message, PairItem, StepsItem, TextItem, message_dict

MessageLike = Mapping[str, Any]
# What ``score`` accepts per item: (prompt, response), (prompt, [step, ...]), an API-shaped dict, a
# message list, or one of the server's item types.
ItemLike = tuple[Any, Any] | Mapping[str, Any] | Sequence[MessageLike] | Item


def _refused(message: str) -> BadRequestError:
    return BadRequestError(message, type="invalid_request")


# Where a message's reasoning may be found: transformers reads all three names
# (huggingface/transformers src/transformers/utils/chat_template_utils.py, _REASONING_FIELDS).
_REASONING = ("reasoning_content", "thinking", "reasoning")


def _listed(value: Any, where: str) -> list[Any]:
    """A list-like value as a list: a list, a tuple, or a numpy array (parquet rows hold those)."""
    if not isinstance(value, str | bytes | Mapping):
        if isinstance(value, Sequence):
            return list(value)
        tolist = getattr(value, "tolist", None)
        if callable(tolist):
            return list(tolist())
    raise _refused(f"{where}: expected a list, not {type(value).__name__}")


def message_text(content: Any) -> str:
    """A message's content as text: a string, the text parts of a parts list (joined by a newline, as
    the server joins them), or ``""`` for none."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = _listed(content, "message content")
    return PART_SEPARATOR.join(
        str(p.get("text", "")) for p in parts if isinstance(p, Mapping) and p.get("type") == "text"
    )


def _part(part: Any, where: str) -> dict[str, Any]:
    if not isinstance(part, Mapping) or "type" not in part:
        raise _refused(f"{where}: a content part is a mapping with 'type'")
    if part["type"] == "text":
        return {"type": "text", "text": part.get("text")}
    # What another part holds (an image, audio) is never scored: its type is enough for the server to
    # count it (usage.dropped_parts) or refuse it (non_text_parts="error").
    return {"type": str(part["type"])}


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise _refused(f"{where}: a tool call is a mapping with 'function'")
    function = call.get("function", call)  # OpenAI's nesting, or the function's fields alone
    if not isinstance(function, Mapping) or "name" not in function:
        raise _refused(f"{where}: a tool call's function is a mapping with 'name' and 'arguments'")
    arguments = function.get("arguments")
    out: dict[str, Any] = {} if call.get("id") is None else {"id": call["id"]}
    return out | {
        "type": call.get("type") or "function",
        "function": {"name": function["name"], "arguments": {} if arguments is None else arguments},
    }


def _message_dict(message: MessageLike | Message, where: str) -> dict[str, Any]:
    """A message in OpenAI's shape, its structure kept: tool calls, tool fields, content parts.

    Keys whose value is None are left out (a parquet row of messages carries every key of every
    message, None where unset); a key the API does not know is sent, for the server to name it.
    """
    if isinstance(message, Message):
        return message_dict(message)
    if not isinstance(message, Mapping) or "role" not in message:
        raise _refused(f"{where}: a message is a mapping with 'role' and 'content'")
    out: dict[str, Any] = {"role": str(message["role"])}
    for key, value in message.items():
        if value is None or key == "role":
            continue
        if key == "content":
            out[key] = value if isinstance(value, str) else [_part(p, where) for p in _listed(value, where)]
        elif key == "tool_calls":
            calls = [_tool_call(c, where) for c in _listed(value, where)]
            if calls:  # an empty list is no calls (Llama 3.1's template refuses one)
                out[key] = calls
        elif key not in _REASONING:
            out[str(key)] = value
    reasoning = next((message[k] for k in _REASONING if message.get(k) is not None), None)
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    return out


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
        tools = {} if item.tools is None else {"tools": [dict(t) for t in item.tools]}
        return {"messages": [_message_dict(m, where) for m in item.messages], **tools}
    prompt = item.prompt if isinstance(item.prompt, str) else [_message_dict(m, where) for m in item.prompt]
    if isinstance(item, StepsItem):
        return {"prompt": prompt, "steps": list(item.steps)}
    return {"prompt": prompt, "response": item.response}


def _steps(prompt: Any, steps: Any, where: str) -> dict[str, Any]:
    texts = _listed(steps, f"{where}: steps")
    if not all(isinstance(s, str) for s in texts):
        raise _refused(f"{where}: steps are a list of texts")
    shown = [_message_dict(m, where) for m in prompt] if _is_messages(prompt) else prompt
    if not isinstance(shown, str | list):
        raise _refused(f"{where}: a prompt is text or a message list, not {type(prompt).__name__}")
    return {"prompt": shown, "steps": texts}


def to_item(value: ItemLike, index: int = 0) -> dict[str, Any]:
    """One item in any accepted shape -> the API's JSON item. A dict item's ``label`` (the dataset's
    answer, read by a composite's label_match rule) goes with it."""
    item = _item(value, index)
    if isinstance(value, Mapping) and value.get("label") is not None:
        item["label"] = value["label"]
    return item


def _item(value: ItemLike, index: int) -> dict[str, Any]:
    where = f"items[{index}]"
    v: Any = value  # checked shape by shape below
    if isinstance(v, str):
        raise _refused(
            f"{where}: a bare string is not an item; send (prompt, response), or "
            '{"text": ...} for text already formatted for the model'
        )
    if isinstance(v, PairItem | ChatItem | TextItem | StepsItem):
        return _server_item(v, where)
    if isinstance(v, Mapping):
        if "steps" in v and ("prompt" in v or "problem" in v):
            return _steps(v.get("prompt", v.get("problem")), v["steps"], where)
        if "messages" in v:
            tools = {"tools": list(v["tools"])} if v.get("tools") is not None else {}
            return {"messages": [_message_dict(m, where) for m in v["messages"]], **tools}
        if "text" in v:
            return {"text": v["text"]}
        if "prompt" in v or "response" in v:  # the API's pair: the missing one named as the server does
            missing = "response" if "prompt" in v else "prompt"
            if missing not in v:
                raise _refused(f"{where}.{missing}: Field required")
            return to_item((v["prompt"], v["response"]), index)
        raise _refused(
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
            raise _refused(f"{where}: a response is text, not {type(response).__name__}")
        if _is_messages(prompt):
            return {"prompt": [_message_dict(m, where) for m in prompt], "response": response}
        if isinstance(prompt, str):
            return {"prompt": prompt, "response": response}
    raise _refused(
        f"{where}: expected (prompt, response), a dict, a message list or one of rmserve.items' types, "
        f"not {type(value).__name__}"
    )
