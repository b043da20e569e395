"""A bundle's chat template: compiled as transformers compiles it, and told at load what it can render.

The template runs in a sandbox set up like transformers' ``apply_chat_template`` (huggingface/transformers
``src/transformers/utils/chat_template_utils.py``, ``_cached_compile_jinja_template``): ``tojson`` keeps
key order and does not escape HTML, loop controls are on, ``raise_exception`` raises. Messages reach it in
OpenAI's shape, fields without a value left out (as transformers' ``_normalize_chat_messages`` does), so
a template renders a conversation as it did for the model's training data.

``probe`` renders a few fixed conversations once, at load, to learn what the template shows, and
``Rendering`` records the answer (shown in ``/v1/models``). What the template cannot show takes a
documented fallback, never a silent drop:

- ``tool_calls``: ``template`` when the template writes a call's name; else ``content``: the calls are
  written into the assistant's text as ``<tool_call>`` blocks (``rmserve.items.tool_call_text``);
- ``tool_role`` / ``ipython_role``: the role a tool's result is given to the template: its own when
  the template renders it, else the other tool role when that one renders, else ``user`` (the result
  becomes a user turn of its text);
- ``parts``: ``template`` when the template renders a list of text parts; else ``joined``: the parts
  reach it as one text, joined by a newline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date
from typing import Any, Literal

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rmserve.items import (
    TOOL_ROLES,
    Message,
    Messages,
    ToolCall,
    message_dict,
    written_text,
)

# Markers no real conversation holds, to find in a probe's rendering.
_FN, _RESULT = "rmserve_probe_fn", "rmserve_probe_result"
_PART_A, _PART_B = "rmserve_part_a", "rmserve_part_b"
_CALL_ID = "rmprobe01"  # nine characters: Mistral templates refuse any other length
_USER = Message("user", "probe")
_REPLY = Message("assistant", "reply")


@dataclass(frozen=True)
class Rendering:
    """What a bundle's template renders itself, and the fallback taken for what it does not."""

    tool_calls: Literal["template", "content"]
    tool_role: str
    ipython_role: str
    parts: Literal["template", "joined"]

    def describe(self) -> dict[str, str]:
        return asdict(self)


# Bundles without a chat template render messages as an HH transcript (``rmserve.items.render_hh``):
# tool calls written into the assistant's text, both tool roles as "Tool:" turns, parts joined.
TRANSCRIPT = Rendering(tool_calls="content", tool_role="tool", ipython_role="tool", parts="joined")


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class Generation(Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks the assistant's tokens with it
    (``AssistantTracker``); a reward model reads the whole text, so the block renders its body."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def pinned_strftime(day: str) -> Any:
    """``strftime_now`` as transformers defines it, but on the fixed ``day`` (ISO), at midnight."""
    fixed = date.fromisoformat(day)

    def strftime_now(fmt: str) -> str:
        return fixed.strftime(fmt)

    return strftime_now


class ChatTemplate:
    """One compiled chat template, rendering Messages with the fallbacks its probe decided.

    ``template_date`` pins ``strftime_now`` (transformers' calls ``datetime.now()``) so a rendering
    does not change from day to day; without it the template sees no ``strftime_now`` at all.
    """

    def __init__(
        self,
        source: str,
        *,
        bos_token: str | None,
        eos_token: str | None,
        template_date: str | None = None,
    ) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        if template_date is not None:
            env.globals["strftime_now"] = pinned_strftime(template_date)
        self._template = env.from_string(source)
        self._specials = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        self.rendering = probe(self)

    def render(self, messages: Messages, tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The conversation as the template renders it, with the probe's fallbacks applied; ``tools``
        (JSON schemas of the functions the assistant may call) reach the template as transformers
        passes them."""
        return self.render_dicts([self._dict(m) for m in messages], tools)

    def render_dicts(
        self, messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> str:
        """The template on messages already in its shape (no fallbacks). As in transformers'
        ``render_jinja_template``, ``tools`` and ``documents`` are always passed, None when absent."""
        schemas = None if tools is None else [dict(t) for t in tools]
        return str(
            self._template.render(
                messages=messages,
                tools=schemas,
                documents=None,
                add_generation_prompt=False,
                **self._specials,
            )
        )

    def _dict(self, message: Message) -> dict[str, Any]:
        r = self.rendering
        role = {"tool": r.tool_role, "ipython": r.ipython_role}.get(message.role, message.role)
        if role == "user" and message.role in TOOL_ROLES:
            return {"role": "user", "content": message.text}
        out = message_dict(replace(message, role=role))
        if isinstance(message.content, tuple) and r.parts == "joined":
            out["content"] = message.text
        if message.tool_calls and r.tool_calls == "content":
            out["content"] = written_text(message)
            del out["tool_calls"]
        if message.reasoning_content is not None:
            out["thinking"] = message.reasoning_content  # transformers' alias, read by some templates
        return out


def _shows(template: ChatTemplate, messages: list[dict[str, Any]], *marks: str) -> bool:
    try:
        out = template.render_dicts(messages)
    except Exception:  # a template's raise_exception or a Jinja error: it cannot render this
        return False
    return all(mark in out for mark in marks)


def probe(template: ChatTemplate) -> Rendering:
    """Render a tool call, each tool role and text parts once to learn which the template shows."""
    user, reply = message_dict(_USER), message_dict(_REPLY)
    call = Message("assistant", None, (ToolCall(_FN, {"x": 1}, _CALL_ID),))
    calls = _shows(template, [user, message_dict(call)], _FN)

    def native(role: str) -> bool:
        result = {"role": role, "content": _RESULT, "tool_call_id": _CALL_ID, "name": _FN}
        return _shows(template, [user, result, reply], _RESULT)

    shown = {role: native(role) for role in TOOL_ROLES}

    def role_for(role: str) -> str:
        if shown[role]:
            return role
        other = next(r for r in TOOL_ROLES if r != role)
        return other if shown[other] else "user"

    parts_msg = {"role": "user", "content": [{"type": "text", "text": t} for t in (_PART_A, _PART_B)]}
    # A template that prints the list itself (Python's or JSON's form of it) does not read parts.
    parts = _shows(template, [parts_msg, reply], _PART_A, _PART_B) and not any(
        key in template.render_dicts([parts_msg, reply]) for key in ("'text'", '"text"')
    )
    return Rendering(
        tool_calls="template" if calls else "content",
        tool_role=role_for("tool"),
        ipython_role=role_for("ipython"),
        parts="template" if parts else "joined",
    )
