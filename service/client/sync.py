"""``RewardClient``: the blocking mirror. Chunks of a long call run on threads."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

import httpx

from rmserve.client.base import DEFAULT_LIMITS, DEFAULT_TIMEOUT, DEFAULT_URL, BaseRewardClient
from rmserve.client.items import ItemLike
from rmserve.client.results import Health, RewardResult, ScoreResult
from rmserve.client.steps import Call, Gather, Operation, Outcome, Send, Sleep, reply_of

T = TypeVar("T")


class RewardClient(BaseRewardClient):
    """Blocking client. Long lists go out in chunks, up to ``max_concurrency`` at a time (threads)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        limits: httpx.Limits = DEFAULT_LIMITS,
        transport: httpx.BaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=timeout, limits=limits, transport=transport
        )

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- carrying out the steps

    def _send(self, call: Call) -> Outcome:
        try:
            return reply_of(
                self._http.request(call.method, call.path, json=call.body, headers=dict(call.headers))
            )
        except httpx.TransportError as exc:
            return exc

    def _gather(self, step: Gather[T]) -> list[T]:
        def one(call: Call) -> T:
            return step.parse(call, self._run(self._exchange(call)))

        if len(step.calls) <= 1 or self.max_concurrency == 1:
            return [one(c) for c in step.calls]
        with ThreadPoolExecutor(min(self.max_concurrency, len(step.calls)), "rmserve-client") as pool:
            return list(pool.map(one, step.calls))

    def _run(self, operation: Operation[T]) -> T:
        step = next(operation)
        try:
            while True:
                if isinstance(step, Send):
                    step = operation.send(self._send(step.call))
                elif isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    step = operation.send(None)
                else:
                    step = operation.send(self._gather(step))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    # -- the API

    def score_result(
        self, items: Iterable[ItemLike], *, model: str | None = None, truncation: str | None = None
    ) -> ScoreResult:
        return self._run(self._score(items, model, truncation))

    def score(
        self, items: Iterable[ItemLike], *, model: str | None = None, truncation: str | None = None
    ) -> list[float]:
        """One reward per item, in order: the raw score, or as the bundle's score map serves it."""
        return self.score_result(items, model=model, truncation=truncation).scores

    def score_steps(
        self,
        items: Iterable[ItemLike],
        *,
        model: str | None = None,
        truncation: str | None = None,
        aggregate: str | None = None,
    ) -> ScoreResult:
        """A process reward model's answer: ``step_scores`` (one list per item, a score per step) and
        ``scores`` (each item's aggregate: ``aggregate`` = min, last, mean or prod; the server's default
        is min). An item is ``(prompt, [step, ...])``, ``{"prompt", "steps"}`` or ``{"text"}`` carrying
        the step token. ProtocolError when the model answers no step scores (an outcome model)."""
        return self._run(self._score_steps(items, model, truncation, aggregate))

    def get_reward_result(
        self,
        queries: Sequence[str],
        prompts: Sequence[str] | None = None,
        labels: Sequence[Any] | None = None,
    ) -> RewardResult:
        return self._run(self._get_reward(queries, prompts, labels))

    def get_reward(
        self,
        queries: Sequence[str],
        prompts: Sequence[str] | None = None,
        labels: Sequence[Any] | None = None,
    ) -> list[float]:
        """OpenRLHF's protocol: one reward per full policy-rendered query, in order."""
        return self.get_reward_result(queries, prompts, labels).rewards

    def models(self) -> list[dict[str, Any]]:
        return self._run(self._models())

    def health(self) -> Health:
        """Live and ready, as the server answers them now (no retries)."""
        return self._run(self._health())

    def wait_until_ready(self, timeout_s: float = 120.0, poll_s: float = 0.25) -> Health:
        return self._run(self._wait_until_ready(timeout_s, poll_s))
