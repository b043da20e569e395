"""The HTTP edge: pydantic models for requests and responses, and their conversion to items."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rmserve.errors import BadRequest, TooLarge
from rmserve.items import ChatItem, Item, Message, PairItem, TextItem


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Annotated[str, Field(min_length=1, max_length=64, examples=["user"])]
    content: str


class ScoreItemIn(BaseModel):
    """One item, in one of three shapes: prompt + response, messages, or text."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "What is 2+2?", "response": "4"},
                {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
                {"text": "\n\nHuman: Hi\n\nAssistant: Hello!"},
            ]
        },
    )

    prompt: str | list[MessageIn] | None = Field(None, description="text, or a list of messages")
    response: str | None = None
    messages: list[MessageIn] | None = Field(
        None, min_length=1, description="ends with the assistant's reply"
    )
    text: str | None = Field(None, description="already formatted text")

    @model_validator(mode="after")
    def _one_shape(self) -> ScoreItemIn:
        pair = self.prompt is not None or self.response is not None
        shapes = sum([pair, self.messages is not None, self.text is not None])
        if shapes != 1:
            raise ValueError("give exactly one of: prompt and response, messages, or text")
        if pair and (self.prompt is None or self.response is None):
            raise ValueError("prompt and response go together")
        return self

    def to_item(self) -> Item:
        if self.messages is not None:
            return ChatItem(tuple(Message(m.role, m.content) for m in self.messages))
        if self.text is not None:
            return TextItem(self.text)
        assert self.prompt is not None and self.response is not None
        if isinstance(self.prompt, str):
            return PairItem(self.prompt, self.response)
        return PairItem(tuple(Message(m.role, m.content) for m in self.prompt), self.response)

    def chars(self) -> int:
        msgs = (self.messages or []) + (self.prompt if isinstance(self.prompt, list) else [])
        texts = [self.response, self.text, self.prompt if isinstance(self.prompt, str) else None]
        return sum(len(t) for t in texts if t) + sum(len(m.content) + len(m.role) for m in msgs)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="name of a loaded bundle (default: the only or 'default' one)"
    )
    items: list[ScoreItemIn] = Field(description="items to score, answered in order")
    truncation: Literal["auto", "error"] = Field(
        "auto", description='"auto" truncates an item over max_length (reported in usage); "error" gives 413'
    )
    timeout_s: float | None = Field(
        None, gt=0, description="deadline for this request (at most the server's)"
    )


class Usage(BaseModel):
    items: int
    tokens: int
    cache_hits: int
    truncated: int


class ScoreResponse(BaseModel):
    model: str
    model_version: str
    scores: list[float]
    usage: Usage


class RewardRequest(BaseModel):
    """OpenRLHF's remote reward model protocol: any number of queries, scored all or none."""

    query: list[str] = Field(description="full texts rendered by the policy, special tokens included")
    prompts: list[str] | None = Field(None, description="each query's prompt (a prefix of the query)")
    labels: list[Any] | None = Field(
        None, description="the dataset's label column, any JSON; not used by the model"
    )


class RewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class ErrorBody(BaseModel):
    type: str
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def to_items(items: list[ScoreItemIn], max_chars: int) -> list[Item]:
    out: list[Item] = []
    for i, item in enumerate(items):
        n = item.chars()
        if n > max_chars:
            raise TooLarge(f"items[{i}]: {n} characters is over the limit of {max_chars} per item")
        out.append(item.to_item())
    return out


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {code: {"model": ErrorResponse} for code in codes}


class SlimeRewardRequest(BaseModel):
    """slime's ``remote_rm`` payload: one sample per request."""

    prompt: str | list[MessageIn] = Field(description="the prompt as the policy rendered it, or messages")
    response: str = Field(description="the decoded response")
    label: Any = Field(None, description="the sample's label, any JSON; not used by the model")


class ClassifyRequest(BaseModel):
    """vLLM's classify request for a single-label reward model; vLLM's other fields are ignored."""

    model: str | None = Field(None, description="a served bundle's name; any other name means the default")
    input: str | list[str] | list[int] | list[list[int]] | None = Field(
        None, description="text or texts, already rendered (token ids are not accepted)"
    )
    messages: list[MessageIn] | None = Field(None, min_length=1, description="ends with the reply")
    use_activation: bool | None = Field(None, description="sigmoid of the score (default true); false: raw")
    activation: bool | None = Field(None, description="deprecated name of use_activation")
    softmax: bool | None = Field(None, description="deprecated name of use_activation")
    add_special_tokens: bool = Field(True, description="input: add the model's BOS when the text lacks it")

    @model_validator(mode="after")
    def _one_input(self) -> ClassifyRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of: input, messages")
        return self

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        if self.input is None or not all(isinstance(t, str) for t in self.input):
            raise BadRequest("input: token ids are not accepted; send text (or messages)")
        return [str(t) for t in self.input]

    def applies_activation(self) -> bool:
        for value in (self.use_activation, self.activation, self.softmax):
            if value is not None:
                return value
        return True
