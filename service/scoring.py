"""The data plane, independent of HTTP: cache lookup, tokenization, single-flight, batching.

A request walks: resolve the model -> one cache lookup for all items -> tokenize the misses (off
the event loop) -> join identical items already in flight, submit the rest to the batcher ->
await -> write new scores back to the cache off the request path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from service.batching import Batcher
from service.bundle import Bundle
from service.cache.base import CacheUnavailable, ScoreCache
from service.cache.keys import Scored, item_key
from service.engines.base import Engine
from service.errors import DeadlineExceeded, ItemTooLong, ModelNotFound, NotReady, TooLarge
from service.formatting import Formatter, Item
from service.metrics import Metrics

log = logging.getLogger("rmserve.scoring")


@dataclass
class ModelRuntime:
    """One served bundle with everything that scores for it."""

    name: str
    bundle: Bundle
    formatter: Formatter
    engine: Engine
    batcher: Batcher
    namespace: bytes
    # Why this backend/precision was chosen, and the quality gate's numbers for a reduced one.
    selection: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.bundle.manifest.version

    def describe(self) -> dict[str, Any]:
        info = self.engine.info
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.bundle.path),
            "provider": info.provider,
            "precision": info.precision,
            "threads": info.threads,
            "engine": info.detail,
            "selection": self.selection,
            "max_batch_tokens": self.batcher.policy.max_batch_tokens,
            "manifest": self.bundle.manifest.model_dump(mode="json"),
        }


@dataclass(frozen=True)
class ScoreResult:
    model: str
    version: str
    scores: list[float]
    item_tokens: list[int]
    item_truncated: list[bool]
    cache_hits: int

    @property
    def tokens(self) -> int:
        return sum(self.item_tokens)

    @property
    def truncated(self) -> int:
        return sum(self.item_truncated)


@dataclass(frozen=True)
class _Flight:
    """An item being scored right now; identical items join it instead of scoring again."""

    future: asyncio.Future[float]
    tokens: int
    truncated: bool


class Scorer:
    def __init__(
        self,
        models: dict[str, ModelRuntime],
        *,
        cache: ScoreCache | None,
        metrics: Metrics,
        tokenize_pool: Executor,
        max_tokens_per_request: int,
    ) -> None:
        self.models = models
        self.cache = cache
        self._metrics = metrics
        self._pool = tokenize_pool
        self._max_tokens = max_tokens_per_request
        self._inflight: dict[str, _Flight] = {}

    def runtime(self, model: str | None) -> ModelRuntime:
        if model is None:
            if "default" in self.models:
                return self.models["default"]
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise ModelNotFound(f"several models are served ({', '.join(self.models)}); name one")
        rt = self.models.get(model)
        if rt is None:
            raise ModelNotFound(f"model {model!r} is not served; served: {', '.join(sorted(self.models))}")
        return rt

    async def score(self, model: str | None, items: list[Item], *, strict: bool, deadline: float) -> ScoreResult:
        rt = self.runtime(model)
        keys = [item_key(rt.namespace, item) for item in items]
        results: list[Scored | None] = await self._lookup(keys)
        hits = sum(r is not None for r in results)
        for i, r in enumerate(results):
            if r is not None and strict and r.truncated:
                raise ItemTooLong(i, r.tokens, rt.bundle.manifest.format.max_length)

        # Misses: join an identical item in flight, or lead a new one (first occurrence only).
        waits: dict[int, _Flight] = {}
        leaders: dict[str, int] = {}
        for i, key in enumerate(keys):
            if results[i] is not None:
                continue
            flight = self._inflight.get(key)
            if flight is not None:
                waits[i] = flight
            elif key not in leaders:
                leaders[key] = i
        if leaders:
            await self._lead(rt, items, keys, leaders, waits, strict, deadline)
        for i, key in enumerate(keys):  # duplicates of a leader inside this request
            if results[i] is None and i not in waits:
                waits[i] = waits[leaders[key]]

        new: dict[str, bytes] = {}
        if waits:
            # shield: a caller that goes away must not cancel work that others share.
            order = list(waits)
            led = set(leaders.values())
            scores = await asyncio.gather(*(asyncio.shield(waits[i].future) for i in order))
            for i, score in zip(order, scores, strict=True):
                flight = waits[i]
                results[i] = Scored(score, flight.tokens, flight.truncated)
                if i in led:
                    new[keys[i]] = results[i].pack()  # type: ignore[union-attr]
        if new and self.cache is not None:
            self.cache.put_many(new)
        final = [r for r in results if r is not None]
        assert len(final) == len(items)
        return ScoreResult(
            model=rt.name,
            version=rt.version,
            scores=[r.score for r in final],
            item_tokens=[r.tokens for r in final],
            item_truncated=[r.truncated for r in final],
            cache_hits=hits,
        )

    async def _lookup(self, keys: list[str]) -> list[Scored | None]:
        if self.cache is None:
            return [None] * len(keys)
        try:
            raw = await self.cache.get_many(keys)
        except CacheUnavailable:
            self._metrics.cache_lookups.labels(result="error").inc(len(keys))
            return [None] * len(keys)
        found = [Scored.unpack(v) if v is not None else None for v in raw]
        n_hit = sum(f is not None for f in found)
        self._metrics.cache_lookups.labels(result="hit").inc(n_hit)
        self._metrics.cache_lookups.labels(result="miss").inc(len(keys) - n_hit)
        return found

    async def _lead(
        self,
        rt: ModelRuntime,
        items: list[Item],
        keys: list[str],
        leaders: dict[str, int],
        waits: dict[int, _Flight],
        strict: bool,
        deadline: float,
    ) -> None:
        positions = list(leaders.values())
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(
            self._pool, lambda: rt.formatter.encode([items[i] for i in positions], strict=strict, positions=positions)
        )
        self._metrics.tokenize_duration.observe(time.perf_counter() - started)
        total = sum(len(e) for e in encoded)
        if total > self._max_tokens:
            raise TooLarge(f"request has {total} tokens after truncation; the limit is {self._max_tokens}")
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("the request's deadline passed before scoring")
        if not rt.batcher.healthy:
            raise NotReady(f"model {rt.name!r} is restarting")
        futures = rt.batcher.submit(encoded, deadline)
        for i, enc, fut in zip(positions, encoded, futures, strict=True):
            flight = _Flight(fut, len(enc), enc.truncated)
            key = keys[i]
            self._inflight[key] = flight
            fut.add_done_callback(lambda _f, k=key, fl=flight: self._land(k, fl))
            waits[i] = flight

    def _land(self, key: str, flight: _Flight) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        if not flight.future.cancelled():
            flight.future.exception()  # mark retrieved: followers may all have gone away
