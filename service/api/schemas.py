"""The HTTP edge: pydantic models for requests and responses, and their conversion to items (the
messages inside them: ``rmserve.api.messages``)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from rmserve.api.messages import MessageIn, Text, to_messages
from rmserve.errors import BadRequest, InvalidItem, TooLarge
from rmserve.items import ChatItem, Item, PairItem, StepsItem, TextItem
from rmserve.kinds import Aggregate

# The shortest deadline a request may ask for (X-Request-Timeout, timeout_s). A request's own way
# through rmserve (HTTP, validation, tokenizing, the queue, one forward pass of a small model) takes
# about a millisecond on an idle 2-core machine, but tens of milliseconds when its cores are busy:
# below this floor a deadline is met or missed by scheduling noise, not by the work ahead, so it is
# refused at once as invalid (422) rather than accepted to end in a 504. Trainers ask for seconds.
# A model slower than this has a floor of its own, its fastest forward pass (``Batcher.check_timeout``).
MIN_TIMEOUT_S = 0.1


def timeout_problem(value: float) -> str | None:
    """Why ``value`` (seconds) is not a deadline a request may ask for; None when it is one."""
    if math.isfinite(value) and value >= MIN_TIMEOUT_S:
        return None
    return f"{value} is not a deadline rmserve can meet; give a number of seconds of at least {MIN_TIMEOUT_S}"


def _prompt_shape(value: Any) -> str:
    return "messages" if isinstance(value, list) else "text"


# One branch is tried, chosen by the value's JSON type, so an error names one problem, not two.
Prompt = Annotated[
    Annotated[Text, Tag("text")] | Annotated[list[MessageIn], Tag("messages")], Discriminator(_prompt_shape)
]


class ScoreItemIn(BaseModel):
    """One item, in one of four shapes: prompt + response, messages, text, or (for a process reward
    model) prompt + steps."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "What is 2+2?", "response": "4"},
                {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
                {"text": "\n\nHuman: Hi\n\nAssistant: Hello!"},
                {"prompt": "What is 2+3*4?", "steps": ["3*4 = 12.", "2 + 12 = 14."]},
            ]
        },
    )

    prompt: Prompt | None = Field(None, description="text, or a list of messages")
    response: Text | None = None
    messages: list[MessageIn] | None = Field(
        None, min_length=1, description="ends with the assistant's reply"
    )
    text: Text | None = Field(None, description="already formatted text")
    tools: list[dict[str, Any]] | None = Field(
        None, description="with messages: the functions the assistant may call (JSON schemas)"
    )
    steps: list[Text] | None = Field(
        None, min_length=1, description="a solution's steps, for a process reward model (with prompt)"
    )
    label: Any = Field(
        None,
        description="the dataset's label (any JSON): read by a composite's label_match rule; "
        "never part of a bundle's score or cache key",
    )

    @model_validator(mode="after")
    def _one_shape(self) -> ScoreItemIn:
        for name in ("prompt", "response", "messages", "text", "steps", "tools"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} is null; give its value or leave the field out")
        if self.steps is not None:
            if self.prompt is None or self.response is not None or self.messages or self.text is not None:
                raise ValueError("steps go with a prompt, and with no response, messages or text")
            return self
        if self.tools is not None and self.messages is None:
            raise ValueError("tools go with messages")
        pair = self.prompt is not None or self.response is not None
        shapes = sum([pair, self.messages is not None, self.text is not None])
        if shapes != 1:
            raise ValueError("give exactly one of: prompt and response, messages, or text")
        if pair and (self.prompt is None or self.response is None):
            # Named at the field, as pydantic names any missing field: items[3].response: Field required
            missing = "response" if self.response is None else "prompt"
            given = self.model_dump(exclude_unset=True)
            raise ValidationError.from_exception_data(
                "ScoreItemIn", [InitErrorDetails(type="missing", loc=(missing,), input=given)]
            )
        return self

    def to_item(self) -> Item:
        if self.steps is not None:
            assert self.prompt is not None
            prompt = self.prompt if isinstance(self.prompt, str) else to_messages(self.prompt)
            return StepsItem(prompt, tuple(self.steps))
        if self.messages is not None:
            tools = None if self.tools is None else tuple(self.tools)
            return ChatItem(to_messages(self.messages), tools)
        if self.text is not None:
            return TextItem(self.text)
        assert self.prompt is not None and self.response is not None
        if isinstance(self.prompt, str):
            return PairItem(self.prompt, self.response)
        return PairItem(to_messages(self.prompt), self.response)

    def message_fields(self) -> list[tuple[str, MessageIn]]:
        """("messages[1]", message) for each message the item holds, named as in the API."""
        field = "messages" if self.messages is not None else "prompt"
        given = self.messages if self.messages is not None else self.prompt
        return [(f"{field}[{j}]", m) for j, m in enumerate(given)] if isinstance(given, list) else []

    def chars(self) -> int:
        texts = [self.response, self.text, self.prompt if isinstance(self.prompt, str) else None]
        texts += self.steps or []
        return sum(len(t) for t in texts if t) + sum(m.chars() for _, m in self.message_fields())


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[Text, Field(max_length=256)] | None = Field(
        None,
        description="name of a served bundle or composite (default: RMSERVE_DEFAULT_MODEL, else the only "
        "or 'default' bundle)",
    )
    items: list[ScoreItemIn] = Field(description="items to score, answered in order")
    truncation: Literal["auto", "error"] = Field(
        "auto", description='"auto" truncates an item over max_length (reported in usage); "error" gives 413'
    )
    timeout_s: float | None = Field(
        None,
        description=f"deadline for this request, in seconds (at least {MIN_TIMEOUT_S}; at most the server's)",
        json_schema_extra={"minimum": MIN_TIMEOUT_S},
    )
    non_text_parts: Literal["drop", "error"] = Field(
        "drop",
        description='content parts that are not text (images, audio): "drop" scores the text without them '
        '(counted in usage.dropped_parts); "error" refuses the item with 422',
    )
    step_aggregate: Aggregate | None = Field(
        None, description="process reward models: how an item's step scores become its score (default min)"
    )

    @field_validator("timeout_s")
    @classmethod
    def _meetable_deadline(cls, value: float | None) -> float | None:
        problem = None if value is None else timeout_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class Usage(BaseModel):
    items: int
    tokens: int
    cache_hits: int
    truncated: int
    dropped_parts: int = Field(0, description="content parts that are not text, left out of what was scored")
    steps_dropped: int | None = Field(
        None, description="process reward models: trailing steps left out by truncation, in all items"
    )
    skipped: list[str] | None = Field(
        None, description="composites: components that failed and were left out (on_error: skip)"
    )


class ScoreResponse(BaseModel):
    model: str
    model_version: str
    scores: list[float]
    step_scores: list[list[float]] | None = Field(
        None, description="process reward models: one list per item, one score per step kept, in order"
    )
    components: dict[str, list[float]] | None = Field(
        None, description="models with several outputs (composites): each component's raw value per item"
    )
    normalized: dict[str, list[float]] | None = Field(
        None, description="composites: each component's value per item as normalised, before weighting"
    )
    usage: Usage


class RewardRequest(BaseModel):
    """OpenRLHF's remote reward model protocol: any number of queries, scored all or none."""

    query: list[Text] = Field(description="full texts rendered by the policy, special tokens included")
    prompts: list[Text] | None = Field(None, description="each query's prompt (a prefix of the query)")
    labels: list[Any] | None = Field(
        None, description="the dataset's label column, any JSON; read only by a composite's label_match rule"
    )


class RewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]
    step_scores: list[list[float]] | None = Field(
        None, description="process reward models: each query's step scores (rewards are their minimum)"
    )


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


def labels_of(items: list[ScoreItemIn]) -> list[Any] | None:
    """Each item's label, or None when no item has one."""
    labels = [item.label for item in items]
    return labels if any(label is not None for label in labels) else None


def dropped_parts(items: list[ScoreItemIn], *, refuse: bool) -> int:
    """How many content parts that are not text the items hold; with ``refuse``, the first is a 422."""
    n = 0
    for i, item in enumerate(items):
        for where, message in item.message_fields():
            for k, kind in message.other_parts():
                if refuse:
                    raise InvalidItem(
                        i,
                        f"{where}.content[{k}] is a part of type {kind!r}; only text parts are scored "
                        '(send non_text_parts: "drop" to score the text without it)',
                    )
                n += 1
    return n


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {code: {"model": ErrorResponse} for code in codes}


class SlimeRewardRequest(BaseModel):
    """slime's ``remote_rm`` payload: one sample per request."""

    prompt: Text | list[MessageIn] = Field(description="the prompt as the policy rendered it, or messages")
    response: Text = Field(description="the decoded response")
    label: Any = Field(
        None, description="the sample's label, any JSON; read only by a composite's label_match rule"
    )


class ClassifyRequest(BaseModel):
    """vLLM's classify request for a single-label reward model; vLLM's other fields are ignored."""

    model: str | None = Field(None, description="a served bundle's name; any other name means the default")
    input: Text | list[Text] | list[int] | list[list[int]] | None = Field(
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
