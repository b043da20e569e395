"""TRL reward functions backed by rmserve: ``reward_funcs=[trl_reward_func("http://rm:8000")]``.

GRPOTrainer calls a reward function as ``f(prompts=..., completions=..., **columns)`` and wants one
float per completion. Prompts and completions are either text (standard datasets) or message lists
(conversational datasets); both are scored as the API's items:

- text prompt + text completion        -> ``{"prompt": p, "response": c}``
- messages + ``[{"role": "assistant", ...}]`` -> ``{"messages": prompt + completion}``
- messages + text completion           -> ``{"prompt": messages, "response": c}``

Messages go as TRL holds them, structure kept: tool-calling GRPO's assistant turns with ``tool_calls``
(``content`` empty), ``{"role": "tool", "name", "content"}`` results, content parts, reasoning; the
server renders them with the reward model's own chat template (docs/trainers.md).
When TRL passes ``log_metric`` (TRL >= 1.0), the share of completions the server truncated to the
model's ``max_length`` is logged as ``<name>/truncated``.

``trl_reward_func`` gives a callable object: it pickles (TRL and accelerate may copy it to other
processes), and the HTTP client is made on first use in each process. ``async_trl_reward_func``
gives a real ``async def`` function: TRL 1.0-1.13 detect async reward functions with
``inspect.iscoroutinefunction`` and later releases with ``asyncio.iscoroutinefunction`` or a check
of ``__call__``; a coroutine function passes all three (an object with ``async __call__`` passes only
the last). TRL awaits it on its own event loop, concurrently with other async reward functions.
TRL names a reward function by its ``__name__`` in its logs (``rewards/<name>/mean``): ``rmserve``
or ``rmserve_<model>``.

With ``steps=True`` (or ``steps=StepScoring(...)``) the served model is a process reward model: each
completion is cut into steps at ``separator`` (default a blank line, as the Qwen PRM model cards split
solutions) and scored as ``{"prompt", "steps"}``; the trainer gets each completion's aggregate of its
step scores (``aggregate``: the server's default ``min``, or ``last``, ``mean``, ``prod``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from rmserve.client import DEFAULT_URL, AsyncRewardClient, ItemLike, RewardClient, ScoreResult, message_text
from rmserve.items import STEP_SEPARATOR, Message, ToolCall, split_steps, written_text

AsyncRewardFunc = Callable[..., Coroutine[Any, Any, list[float]]]

__all__ = [
    "AsyncTRLRewardFunction",
    "StepScoring",
    "TRLRewardFunction",
    "async_trl_reward_func",
    "trl_items",
    "trl_reward_func",
    "trl_step_items",
]


def trl_items(prompts: list[Any], completions: list[Any]) -> list[ItemLike]:
    """TRL's (prompt, completion) columns -> client items, one per completion, in order."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    items: list[ItemLike] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        if isinstance(completion, list):  # conversational: the completion is the assistant's message(s)
            messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            items.append({"messages": [*messages, *completion]})
        elif isinstance(prompt, list):
            items.append((list(prompt), str(completion)))
        else:
            items.append((str(prompt), str(completion)))
    return items


@dataclass(frozen=True)
class StepScoring:
    """How completions are scored by a process reward model: cut at ``separator``, each completion's
    step scores reduced by ``aggregate`` (None: the server's default, ``min``)."""

    separator: str = STEP_SEPARATOR
    aggregate: str | None = None


def trl_step_items(
    prompts: list[Any], completions: list[Any], separator: str = STEP_SEPARATOR
) -> list[ItemLike]:
    """TRL's columns -> process items ``(prompt, [step, ...])``: each completion's text (a conversational
    completion's last message; its earlier messages, structure kept, join the prompt) cut into steps
    at ``separator``."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    items: list[ItemLike] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        context: Any = list(prompt) if isinstance(prompt, list) else str(prompt)
        if isinstance(completion, list):  # conversational: the last message is the solution
            *before, last = completion
            if before:
                context = [
                    *(context if isinstance(context, list) else [{"role": "user", "content": context}]),
                    *before,
                ]
            text = _solution_text(last)
        else:
            text = message_text(completion)
        items.append((context, list(split_steps(text, separator))))
    return items


def _solution_text(message: dict[str, Any]) -> str:
    """A solution message's text, any tool calls written after it as ``<tool_call>`` blocks (the form
    the server writes where a template has no tool markup): a step's text holds no structure, and
    nothing the policy wrote is left out of what is scored."""
    calls = [c.get("function", c) for c in message.get("tool_calls") or []]
    written = Message(
        "assistant",
        message_text(message.get("content")),
        tuple(ToolCall(str(c["name"]), c.get("arguments") or {}) for c in calls),
    )
    return written_text(written)


class _Base:
    def __init__(
        self,
        url_or_client: str | RewardClient | AsyncRewardClient | None = None,
        *,
        model: str | None = None,
        api_key: str | None = None,
        name: str | None = None,
        steps: bool | StepScoring = False,
        **client_options: Any,
    ) -> None:
        if isinstance(url_or_client, (RewardClient, AsyncRewardClient)):
            self._given: RewardClient | AsyncRewardClient | None = url_or_client
            self.url = url_or_client.base_url
            model = model or url_or_client.model
        else:
            self._given = None
            self.url = url_or_client or os.environ.get("RMSERVE_URL", DEFAULT_URL)
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("RMSERVE_API_KEY")
        self.steps: StepScoring | None = None
        if isinstance(steps, StepScoring):
            self.steps = steps
        elif steps:
            self.steps = StepScoring()
        self.client_options = client_options
        self.__name__ = name or ("rmserve" if not model else f"rmserve_{model}")

    def _options(self) -> dict[str, Any]:
        return {"model": self.model, "api_key": self.api_key, **self.client_options}

    def __getstate__(self) -> dict[str, Any]:
        # Clients hold sockets (and, async, an event loop): each process makes its own.
        if self._given is not None:
            raise TypeError("a reward function built on a client object does not pickle; pass a URL instead")
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_client")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, model={self.model!r}, name={self.__name__!r})"

    def _items(self, prompts: list[Any], completions: list[Any]) -> list[ItemLike]:
        if self.steps:
            return trl_step_items(prompts, completions, self.steps.separator)
        return trl_items(prompts, completions)

    def _report(self, result: ScoreResult, kwargs: dict[str, Any]) -> list[float]:
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and result.scores:
            log_metric(f"{self.__name__}/truncated", result.usage.truncated / len(result.scores))
            if self.steps:
                log_metric(f"{self.__name__}/steps_dropped", result.usage.steps_dropped / len(result.scores))
        return result.scores


class TRLRewardFunction(_Base):
    """A blocking TRL reward function: one chunked /v1/score call per generation batch."""

    _client: RewardClient | None = None

    def client(self) -> RewardClient:
        if isinstance(self._given, RewardClient):
            return self._given
        if self._client is None:
            self._client = RewardClient(self.url, **self._options())
        return self._client

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        items = self._items(prompts, completions)
        client = self.client()
        if self.steps:
            return self._report(client.score_steps(items, aggregate=self.steps.aggregate), kwargs)
        return self._report(client.score_result(items), kwargs)


class AsyncTRLRewardFunction(_Base):
    """The async mirror, as an object; ``async_trl_reward_func`` wraps it in a coroutine function."""

    _client: AsyncRewardClient | None = None
    _client_loop: asyncio.AbstractEventLoop | None = None

    async def client(self) -> AsyncRewardClient:
        if isinstance(self._given, AsyncRewardClient):
            return self._given
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            # An httpx.AsyncClient's pool belongs to the loop it first ran on.
            self._client, self._client_loop = AsyncRewardClient(self.url, **self._options()), loop
        return self._client

    async def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        items = self._items(prompts, completions)
        client = await self.client()
        if self.steps:
            return self._report(await client.score_steps(items, aggregate=self.steps.aggregate), kwargs)
        return self._report(await client.score_result(items), kwargs)


def trl_reward_func(
    url_or_client: str | RewardClient | None = None,
    *,
    model: str | None = None,
    api_key: str | None = None,
    name: str | None = None,
    steps: bool | StepScoring = False,
    **client_options: Any,
) -> TRLRewardFunction:
    """A TRL ``reward_funcs`` entry scoring with rmserve at ``url`` (default: $RMSERVE_URL or local).

    ``api_key`` defaults to $RMSERVE_API_KEY; ``client_options`` go to ``RewardClient`` (chunk_size,
    max_concurrency, max_retries, timeout, ...). ``steps``: a process reward model scores each
    completion's steps (see the module docstring).
    """
    return TRLRewardFunction(
        url_or_client, model=model, api_key=api_key, name=name, steps=steps, **client_options
    )


def async_trl_reward_func(
    url_or_client: str | AsyncRewardClient | None = None,
    *,
    model: str | None = None,
    api_key: str | None = None,
    name: str | None = None,
    steps: bool | StepScoring = False,
    **client_options: Any,
) -> AsyncRewardFunc:
    """Like ``trl_reward_func``, as an ``async def`` reward function (``AsyncRewardClient`` underneath).

    The function's ``rmserve`` attribute is the ``AsyncTRLRewardFunction`` it calls.
    """
    scorer = AsyncTRLRewardFunction(
        url_or_client, model=model, api_key=api_key, name=name, steps=steps, **client_options
    )

    async def reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        return await scorer(prompts, completions, **kwargs)

    reward.__name__ = reward.__qualname__ = scorer.__name__
    reward.rmserve = scorer  # type: ignore[attr-defined]
    return reward
