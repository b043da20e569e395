"""Messages at the HTTP edge: OpenAI's message shape (text or parts content, tool calls, tool results)
as pydantic models, each text checked where it enters, and their conversion to ``rmserve.items``'
``Message``. Every route that takes messages uses these (``rmserve.api.schemas``)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from rmserve.items import Message, ToolCall, message_texts, text_problem


def _tokenizable(text: str) -> str:
    problem = text_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


# Every text a tokenizer reads is checked where it enters: a lone surrogate is a 422 naming its field.
Text = Annotated[str, AfterValidator(_tokenizable)]


class TextPartIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class OtherPartIn(BaseModel):
    """A content part of another type (``image_url``, ``input_audio``, ...): never scored; its fields
    are not read."""

    model_config = ConfigDict(extra="allow")

    type: str


def _part_kind(value: Any) -> str:
    return "text" if isinstance(value, dict) and value.get("type") == "text" else "other"


Part = Annotated[
    Annotated[TextPartIn, Tag("text")] | Annotated[OtherPartIn, Tag("other")], Discriminator(_part_kind)
]


# One branch is tried, chosen by the value's JSON type, so an error names one problem, not two.
def _list_or_text(value: Any) -> str:
    return "list" if isinstance(value, list) else "text"


def _dict_or_text(value: Any) -> str:
    return "dict" if isinstance(value, dict) else "text"


Content = Annotated[
    Annotated[Text, Tag("text")] | Annotated[list[Part], Tag("list")], Discriminator(_list_or_text)
]


class FunctionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[Text, Field(min_length=1, examples=["get_weather"])]
    arguments: Annotated[
        Annotated[Text, Tag("text")] | Annotated[dict[str, Any], Tag("dict")], Discriminator(_dict_or_text)
    ] = Field(description="a JSON string (OpenAI) or an object (transformers, TRL); rendered as given")

    @field_validator("arguments")
    @classmethod
    def _tokenizable_arguments(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        if isinstance(value, dict):
            problem = text_problem(json.dumps(value, ensure_ascii=False))
            if problem is not None:
                raise ValueError(problem)
        return value


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionIn


class MessageIn(BaseModel):
    """A message in OpenAI's shape: a tool-calling assistant turn, a tool's result, parts content."""

    model_config = ConfigDict(extra="forbid")

    role: Annotated[Text, Field(min_length=1, max_length=64, examples=["user"])]
    content: Content | None = Field(
        None, description="text, a list of content parts (text parts are scored), or null beside tool_calls"
    )
    tool_calls: list[ToolCallIn] | None = Field(None, description="an assistant's function calls")
    tool_call_id: Text | None = Field(None, description="a tool result: the call it answers")
    name: Text | None = Field(None, description="a tool result: the tool's name")
    reasoning_content: Text | None = Field(
        None, description="an assistant's reasoning, where its template shows it"
    )

    @model_validator(mode="after")
    def _said_something(self) -> MessageIn:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls belong to an assistant turn, not to a {self.role!r} one")
        if self.content is None and not self.tool_calls:
            raise ValueError(
                "content is null or missing; only an assistant turn that makes tool_calls may omit it"
            )
        return self

    def to_message(self) -> Message:
        if isinstance(self.content, list):
            content: str | tuple[str, ...] | None = tuple(
                p.text for p in self.content if isinstance(p, TextPartIn)
            )
        else:
            content = self.content
        calls = tuple(ToolCall(c.function.name, c.function.arguments, c.id) for c in self.tool_calls or [])
        return Message(self.role, content, calls, self.tool_call_id, self.name, self.reasoning_content)

    def other_parts(self) -> list[tuple[int, str]]:
        """(index, type) of each content part that is not text: dropped from what is scored."""
        if not isinstance(self.content, list):
            return []
        return [(i, p.type) for i, p in enumerate(self.content) if isinstance(p, OtherPartIn)]

    def chars(self) -> int:
        return sum(len(text) for _, text in message_texts("", self.to_message()))


def to_messages(messages: list[MessageIn]) -> tuple[Message, ...]:
    return tuple(m.to_message() for m in messages)
