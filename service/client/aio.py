"""``AsyncRewardClient``: the asyncio mirror of ``RewardClient``. Chunks run under a semaphore."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from rmserve.client.base import DEFAULT_LIMITS, DEFAULT_TIMEOUT, DEFAULT_URL, BaseRewardClient
from rmserve.client.items import ItemLike
from rmserve.client.results import Health, RewardResult, ScoreResult
from rmserve.client.steps import Call, Gather, Operation, Outcome, Send, Sleep, reply_of

T = TypeVar("T")


class AsyncRewardClient(BaseRewardClient):
    """The asyncio mirror of ``RewardClient``: chunks run concurrently under a semaphore."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        limits: httpx.Limits = DEFAULT_LIMITS,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=timeout, limits=limits, transport=transport
        )

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- carrying out the steps

    async def _send(self, call: Call) -> Outcome:
        try:
            return reply_of(
                await self._http.request(call.method, call.path, json=call.body, headers=dict(call.headers))
            )
        except httpx.TransportError as exc:
            return exc

    async def _gather(self, step: Gather[T]) -> list[T]:
        # A semaphore per call, not per client: asyncio primitives bind to one event loop.
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(call: Call) -> T:
            async with gate:
                return step.parse(call, await self._run(self._exchange(call)))

        tasks = [asyncio.ensure_future(one(c)) for c in step.calls]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()  # one chunk failed: the call fails, the rest need not finish
            raise

    async def _run(self, operation: Operation[T]) -> T:
        step = next(operation)
        try:
            while True:
                if isinstance(step, Send):
                    step = operation.send(await self._send(step.call))
                elif isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    step = operation.send(None)
                else:
                    step = operation.send(await self._gather(step))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    # -- the API

    async def score_result(
        self, items: Iterable[ItemLike], *, model: str | None = None, truncation: str | None = None
    ) -> ScoreResult:
        return await self._run(self._score(items, model, truncation))

    async def score(
        self, items: Iterable[ItemLike], *, model: str | None = None, truncation: str | None = None
    ) -> list[float]:
        return (await self.score_result(items, model=model, truncation=truncation)).scores

    async def score_steps(
        self,
        items: Iterable[ItemLike],
        *,
        model: str | None = None,
        truncation: str | None = None,
        aggregate: str | None = None,
    ) -> ScoreResult:
        """The async mirror of ``RewardClient.score_steps``."""
        return await self._run(self._score_steps(items, model, truncation, aggregate))

    async def get_reward_result(
        self,
        queries: Sequence[str],
        prompts: Sequence[str] | None = None,
        labels: Sequence[Any] | None = None,
    ) -> RewardResult:
        return await self._run(self._get_reward(queries, prompts, labels))

    async def get_reward(
        self,
        queries: Sequence[str],
        prompts: Sequence[str] | None = None,
        labels: Sequence[Any] | None = None,
    ) -> list[float]:
        return (await self.get_reward_result(queries, prompts, labels)).rewards

    async def models(self) -> list[dict[str, Any]]:
        return await self._run(self._models())

    async def health(self) -> Health:
        return await self._run(self._health())

    async def wait_until_ready(self, timeout_s: float = 120.0, poll_s: float = 0.25) -> Health:
        return await self._run(self._wait_until_ready(timeout_s, poll_s))
