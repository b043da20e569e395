"""The data plane, independent of HTTP: cache lookup, tokenization, single-flight, batching.

A request walks: resolve the model -> its kind checks the items -> one cache lookup for all items ->
tokenize the misses (off the event loop) -> join identical items already in flight, submit the rest
to the batcher -> await -> write new values back to the cache off the request path -> the kind turns
the values into the answer (scores; a process model's step scores and their aggregates).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from rmserve.batching import Batcher
from rmserve.bundle import Bundle
from rmserve.cache.base import CacheUnavailable, ScoreCache
from rmserve.cache.keys import Scored, item_key
from rmserve.engines.base import Engine
from rmserve.errors import DeadlineExceeded, ItemTooLong, ModelNotFound, NotReady, TooLarge
from rmserve.formatting import Encoded, Formatter
from rmserve.items import Item
from rmserve.kinds import Aggregate, BundleKind
from rmserve.metrics import Metrics
from rmserve.served import Ask, ScoreResult, Served

log = logging.getLogger("rmserve.scoring")

_LINGER_S = 0.5  # how long a scored flight stays joinable after it lands


@dataclass
class ModelRuntime:
    """One served bundle with everything that scores for it."""

    name: str
    bundle: Bundle
    formatter: Formatter
    kind: BundleKind  # outcome or process: which items it takes, how they are read and answered
    batcher: Batcher  # owns the engine, which a rebuild replaces
    namespace: bytes
    # Why this backend/precision was chosen, and the quality gate's numbers for a reduced one.
    selection: dict[str, Any] = field(default_factory=dict)
    # Whether this bundle computes shared prefixes once on this engine, and why not (rmserve.engines.reuse).
    prefix_reuse: dict[str, Any] = field(default_factory=lambda: {"enabled": False, "reason": None})

    @property
    def version(self) -> str:
        return self.bundle.manifest.version

    @property
    def engine(self) -> Engine:
        """The engine serving now (the batcher's: a rebuilt engine replaces the old one there)."""
        return self.batcher.engine

    @property
    def max_queue_items(self) -> int:
        return self.batcher.policy.max_queue_items

    def check_timeout(self, timeout_s: float) -> None:
        self.batcher.check_timeout(timeout_s)

    async def score(self, scorer: Scorer, items: list[Item], ask: Ask) -> ScoreResult:
        # A bundle scores the items alone: labels never enter its scores or its cache keys.
        return await scorer.score_bundle(self, items, ask)

    def describe(self) -> dict[str, Any]:
        info = self.engine.info
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.bundle.path),
            "provider": info.provider,
            "precision": info.precision,
            "threads": info.threads,
            "streams": info.streams,
            "engine": info.detail,
            "selection": self.selection,
            "max_batch_tokens": self.batcher.policy.max_batch_tokens,
            "prefix_reuse": self.prefix_reuse,
            # How messages reach the model: what its chat template renders, and the fallbacks taken.
            "messages": self.formatter.rendering.describe(),
            **self.kind.describe(),
            # The model family export recognised and what its authors' reference showed (ids, scores).
            "family": self.bundle.manifest.model_family,
            "reference": self.bundle.manifest.parity.get("reference"),
            "manifest": self.bundle.manifest.model_dump(mode="json"),
        }


class _Abandoned(Exception):
    """The request leading a flight failed before its items reached the model; joiners retry."""


@dataclass(eq=False)
class _Flight:
    """An item being scored right now; identical items join it instead of scoring again.

    Registered before the leader tokenizes, so an identical item arriving meanwhile joins it.
    ``waiters`` counts the requests waiting for it: when all of them have gone away (their clients
    disconnected), the item is taken out of the model's queue instead of being scored for no one.
    """

    future: asyncio.Future[Scored]
    waiters: int = 0
    job: asyncio.Future[Any] | None = None  # the batcher's future, once submitted

    def release(self) -> None:
        self.waiters -= 1
        if self.waiters <= 0 and self.job is not None and not self.job.done():
            self.job.cancel()  # the batcher skips cancelled items


class Scorer:
    def __init__(
        self,
        models: dict[str, ModelRuntime],
        *,
        cache: ScoreCache | None,
        metrics: Metrics,
        tokenize_pool: Executor,
        max_tokens_per_request: int,
        composites: Mapping[str, Served] | None = None,
        default_model: str | None = None,
    ) -> None:
        self.models = models
        self.composites = dict(composites or {})
        self.default_model = default_model
        self.cache = cache
        self._metrics = metrics
        self._pool = tokenize_pool
        self._max_tokens = max_tokens_per_request
        self._inflight: dict[str, _Flight] = {}

    def served(self) -> dict[str, Served]:
        """Every name a request may give: the bundles, then the composites."""
        return {**self.models, **self.composites}

    def runtime(self, model: str | None) -> Served:
        """The served model ``model`` names; without a name, the default model (``default_model``, else
        the bundle named ``default``, else the only bundle)."""
        if model is None:
            if self.default_model is not None:
                return self.runtime(self.default_model)
            if "default" in self.models:
                return self.models["default"]
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise ModelNotFound(f"several models are served ({', '.join(self.models)}); name one")
        served = self.models.get(model) or self.composites.get(model)
        if served is None:
            shown = model if len(model) <= 64 else model[:64] + "..."
            raise ModelNotFound(f"model {shown!r} is not served; served: {', '.join(sorted(self.served()))}")
        return served

    async def score(
        self,
        model: str | None,
        items: list[Item],
        *,
        strict: bool,
        deadline: float,
        wait_until: float | None = None,
        aggregate: Aggregate | None = None,
        labels: Sequence[Any] | None = None,
    ) -> ScoreResult:
        """Scores of ``items``, ended by ``deadline`` (a ``time.monotonic()``). A full queue is a 429 at
        once, or with ``wait_until`` a wait for room until then (Batcher.admit). ``aggregate``: how a
        process model's step scores become an item's score (its default when None). ``labels``: each
        item's label (rules of a composite read them; a bundle never does)."""
        ask = Ask(strict, deadline, wait_until, aggregate, labels)
        return await self.runtime(model).score(self, items, ask)

    async def score_bundle(self, rt: ModelRuntime, items: list[Item], ask: Ask) -> ScoreResult:
        """A bundle's scores of ``items``: its cache, single-flight and batcher."""
        strict, deadline, wait_until, aggregate = ask.strict, ask.deadline, ask.wait_until, ask.aggregate
        rt.kind.check(items, aggregate)
        keys = [item_key(rt.namespace, item) for item in items]
        results: list[Scored | None] = await self._lookup(keys)
        hits = sum(r is not None for r in results)
        await self._check_strict(rt, items, results, strict)
        todo = [i for i, r in enumerate(results) if r is None]
        loop = asyncio.get_running_loop()
        try:
            # The request ends by its deadline, wherever its items are (queued, or joined to another
            # request's flight); the batcher takes its own queued items out at the same moment.
            async with asyncio.timeout_at(loop.time() + max(0.0, deadline - time.monotonic())):
                while todo:  # again only for items whose leader gave up before scoring them
                    todo = await self._score_misses(
                        rt, items, keys, todo, results, strict, deadline, wait_until
                    )
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed before its items were scored") from None
        # Again: a joined flight may have been led without strict.
        await self._check_strict(rt, items, results, strict)
        final = [r for r in results if r is not None]
        assert len(final) == len(items)
        info = rt.engine.info  # cached scores are keyed by provider and precision too: the same engine
        answer = rt.kind.answer([r.value for r in final], aggregate)
        return ScoreResult(
            model=rt.name,
            version=rt.version,
            backend=info.provider,
            precision=info.precision,
            scores=answer.scores,
            item_tokens=[r.tokens for r in final],
            item_truncated=[r.truncated for r in final],
            cache_hits=hits,
            step_scores=answer.step_scores,
            item_dropped=[r.dropped for r in final],
        )

    async def _check_strict(
        self, rt: ModelRuntime, items: list[Item], results: list[Scored | None], strict: bool
    ) -> None:
        """A strict request refuses an item that was scored truncated (a cache hit, or a flight led
        without strict). What was kept is the truncated length, so the item is encoded again, whole,
        for the 413 to state its own length."""
        cut = [i for i, r in enumerate(results) if r is not None and r.truncated] if strict else []
        if not cut:
            return
        await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: rt.kind.encode([items[i] for i in cut], strict=True, positions=cut)
        )
        first = results[cut[0]]
        assert first is not None
        raise ItemTooLong(cut[0], first.tokens, rt.bundle.manifest.format.max_length)  # encode raised first

    async def _score_misses(
        self,
        rt: ModelRuntime,
        items: list[Item],
        keys: list[str],
        todo: list[int],
        results: list[Scored | None],
        strict: bool,
        deadline: float,
        wait_until: float | None,
    ) -> list[int]:
        """Join an identical item in flight, or lead a new one; returns the items to try again."""
        loop = asyncio.get_running_loop()
        waits: dict[int, _Flight] = {}
        leaders: dict[str, int] = {}  # key -> first position in this request
        for i in todo:
            key = keys[i]
            flight = self._inflight.get(key)
            if flight is None:
                flight = self._inflight[key] = _Flight(loop.create_future())
                leaders[key] = i
            waits[i] = flight
        for i in todo:
            waits[i].waiters += 1
        try:
            if leaders:
                # A task of its own, shielded: a caller that goes away must not cancel work others share.
                lead = loop.create_task(self._lead(rt, items, keys, leaders, strict, deadline, wait_until))
                lead.add_done_callback(_retrieve)
                await asyncio.shield(lead)  # this request's own errors (413, 422, 429, 504) surface here
            outcomes = await asyncio.gather(
                *(asyncio.shield(waits[i].future) for i in todo), return_exceptions=True
            )
        finally:
            for i in todo:
                waits[i].release()
        again: list[int] = []
        for i, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, Scored):
                results[i] = outcome
            elif isinstance(outcome, _Abandoned) or (
                isinstance(outcome, DeadlineExceeded) and time.monotonic() < deadline  # the leader's deadline
            ):
                again.append(i)
            else:
                raise outcome
        return again

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
        strict: bool,
        deadline: float,
        wait_until: float | None,
    ) -> None:
        flights = {key: self._inflight[key] for key in leaders}
        positions = list(leaders.values())
        try:
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            encoded = await loop.run_in_executor(
                self._pool,
                lambda: rt.kind.encode([items[i] for i in positions], strict=strict, positions=positions),
            )
            self._metrics.tokenize_duration.observe(time.perf_counter() - started)
            total = sum(len(e) for e in encoded)
            if total > self._max_tokens:
                raise TooLarge(
                    f"request has {total} tokens after truncation; the limit is {self._max_tokens}"
                )
            if time.monotonic() >= deadline:
                raise DeadlineExceeded("the request's deadline passed before scoring")
            if not rt.batcher.healthy:
                raise NotReady(f"model {rt.name!r} is restarting")
            futures = await rt.batcher.admit(encoded, deadline, wait_until=wait_until)
        except BaseException:
            for key, flight in flights.items():
                self._settle(key, flight, _Abandoned())
            raise
        for key, enc, fut in zip(leaders, encoded, futures, strict=True):
            flight = flights[key]
            flight.job = fut
            fut.add_done_callback(functools.partial(self._land, key, flight, enc))
            if flight.waiters <= 0:  # everyone left while this request was being tokenized
                fut.cancel()

    def _land(self, key: str, flight: _Flight, enc: Encoded, done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            self._settle(key, flight, _Abandoned())
            return
        error = done.exception()
        if error is not None:
            self._settle(key, flight, error)
            return
        scored = Scored(done.result(), len(enc), enc.truncated, enc.dropped)
        if self.cache is not None:
            # Before the flight ends, so a lookup that misses the flight finds the cache entry.
            self.cache.put_many({key: scored.pack()})
        self._settle(key, flight, scored)

    def _settle(self, key: str, flight: _Flight, outcome: Scored | BaseException) -> None:
        if isinstance(outcome, Scored):
            # A landed flight stays joinable a moment: requests of the same burst whose cache lookup
            # started before the write-back (or failed: Redis slow or down) still find it.
            asyncio.get_running_loop().call_later(_LINGER_S, self._forget, key, flight)
        else:
            self._forget(key, flight)
        if flight.future.done():
            return
        if isinstance(outcome, Scored):
            flight.future.set_result(outcome)
        else:
            flight.future.set_exception(outcome)
            flight.future.exception()  # mark retrieved: its joiners may all have gone away

    def _forget(self, key: str, flight: _Flight) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # the leading request may have gone away; its error needs no log line
