"""Cross-request dynamic batching: admission, one bounded queue, token-budget batches, deadlines.

Requests put tokenized items in one queue per model. A single loop takes everything waiting (a
window), sorts it by length, cuts it into batches whose padded size fits the token budget, and
runs them one at a time on the engine's own thread, off the event loop. Items arriving meanwhile
form the next window, so under load batches fill by themselves; ``max_wait_ms`` can add a short
wait to fill them further. Every accepted item's future is resolved: with its score, or with the
error that stopped it (deadline passed, inference failed, shutting down).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from service.engines.base import Engine, EngineCrashed, pad_batch
from service.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded
from service.formatting import Encoded
from service.metrics import Metrics

log = logging.getLogger("rmserve.batching")

# After this many failed forward passes in a row the engine is presumed broken and rebuilt.
CRASH_AFTER_FAILURES = 3


@dataclass(eq=False)
class Job:
    """One item waiting for the model."""

    encoded: Encoded
    deadline: float  # time.monotonic() by which it must be in a forward pass
    future: asyncio.Future[float]
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_tokens: int
    max_wait_s: float
    max_queue_items: int


class Batcher:
    """Batches items for one engine. Create, ``await warmup()``, then ``start()``."""

    def __init__(
        self,
        model: str,
        engine: Engine,
        policy: BatchPolicy,
        *,
        pad_id: int,
        with_type_ids: bool,
        metrics: Metrics,
        rebuild: Callable[[], Engine] | None = None,
    ) -> None:
        self.model = model
        self._rebuild = rebuild
        self._failures = 0
        self.engine = engine
        self.policy = policy
        self._pad_id = pad_id
        self._with_type_ids = with_type_ids
        self._metrics = metrics
        self._pending: deque[Job] = deque()
        self._window: list[Job] = []  # taken from the queue, not yet resolved
        self._queued = 0  # items accepted and not yet taken into a forward pass
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{model}")
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._rate = 0.0  # items/s of recent forward passes, for Retry-After
        self.healthy = True
        self.restarts = 0

    # -- admission -----------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._queued

    def retry_after_s(self, extra: int = 0) -> float:
        """How long the queue (plus ``extra`` items) takes to drain at the recent rate."""
        rate = self._rate or 1.0
        return (self._queued + extra) / rate

    def submit(self, items: list[Encoded], deadline: float) -> list[asyncio.Future[float]]:
        """Queue items for scoring, all or none; raises Overloaded when the queue is full."""
        if self._closing or self._task is None:
            raise NotReady(f"model {self.model!r} is not accepting work")
        if self._queued + len(items) > self.policy.max_queue_items:
            raise Overloaded(
                f"queue full: {self._queued} items waiting for model {self.model!r} "
                f"(limit {self.policy.max_queue_items})",
                retry_after_s=self.retry_after_s(len(items)),
            )
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[float]] = []
        for enc in items:
            fut: asyncio.Future[float] = loop.create_future()
            self._pending.append(Job(enc, deadline, fut))
            futures.append(fut)
        self._add_queued(len(items))
        self._wakeup.set()
        return futures

    def _add_queued(self, delta: int) -> None:
        # One gauge for all models: each batcher adds its own change.
        self._queued += delta
        self._metrics.queue_depth.inc(delta)

    # -- lifecycle -----------------------------------------------------------------------------

    async def warmup(self, max_length: int) -> None:
        """One forward pass at the largest shape the batcher will build, before ready turns green."""
        rows = max(1, self.policy.max_batch_tokens // max_length)
        batch = pad_batch(
            [[self._pad_id] * max_length] * rows, self._pad_id, [None] * rows if self._with_type_ids else None
        )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.engine.infer, batch)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"batcher-{self.model}")

    async def stop(self) -> None:
        """Finish what was accepted, then stop the loop and the engine thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
        self.engine.close()

    async def _supervise(self) -> None:
        # The loop only ends when closing; a bug in it must not leave callers waiting forever.
        while True:
            try:
                await self._loop()
                return
            except Exception:
                log.exception("batcher loop for %s failed; failing its queue and restarting", self.model)
                self.healthy = False
                self._fail_pending(InferenceFailed("the batcher failed"))
                await asyncio.sleep(0.05)
                self.healthy = True

    async def _restart_engine(self) -> None:
        """Rebuild a broken engine while readiness reports the model as restarting.

        Items already queued wait for the new engine; new requests get 503 meanwhile.
        """
        if self._rebuild is None:
            return
        self.healthy = False
        log.error("engine for %s is presumed broken; rebuilding it", self.model)
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                fresh = await loop.run_in_executor(self._executor, self._rebuild)
            except Exception:
                log.exception("rebuilding the engine for %s failed; retrying", self.model)
                await asyncio.sleep(1.0)
                continue
            old, self.engine = self.engine, fresh
            try:
                old.close()
            except Exception:  # a broken engine may fail to close; it is dropped either way
                log.warning("closing the broken engine for %s failed", self.model)
            break
        self._failures = 0
        self.restarts += 1
        self.healthy = True
        log.info("engine for %s rebuilt (restart %d)", self.model, self.restarts)

    def _fail_pending(self, error: Exception) -> None:
        for job in [*self._window, *self._pending]:
            if not job.future.done():
                job.future.set_exception(error)
        self._window = []
        self._pending.clear()
        self._add_queued(-self._queued)

    # -- the loop ------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.policy.max_wait_s > 0:
                await self._fill()
            self._window = list(self._pending)
            self._pending.clear()
            for batch in self._cut(self._window):
                await self._run(batch)
            self._window = []

    async def _fill(self) -> None:
        """Wait until the budget is full or the oldest item has waited max_wait."""
        until = self._pending[0].enqueued + self.policy.max_wait_s
        while not self._closing:
            tokens = sum(len(j.encoded) for j in self._pending)
            remaining = until - time.monotonic()
            if tokens >= self.policy.max_batch_tokens or remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _cut(self, window: list[Job]) -> list[list[Job]]:
        """Sort by length and cut into batches whose padded size fits the budget."""
        window.sort(key=lambda j: len(j.encoded))
        batches: list[list[Job]] = []
        current: list[Job] = []
        for job in window:
            # Sorted ascending, so this job's length is the padded width of the batch.
            if current and (len(current) + 1) * len(job.encoded) > self.policy.max_batch_tokens:
                batches.append(current)
                current = []
            current.append(job)
        if current:
            batches.append(current)
        return batches

    async def _run(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live: list[Job] = []
        try:
            for job in batch:
                if job.future.done():  # its caller went away
                    continue
                if job.deadline <= now:
                    job.future.set_exception(DeadlineExceeded("the request's deadline passed before scoring"))
                    continue
                self._metrics.queue_wait.observe(now - job.enqueued)
                live.append(job)
        finally:
            self._add_queued(-len(batch))
        if not live:
            return
        tensors = pad_batch(
            [j.encoded.ids for j in live],
            self._pad_id,
            [j.encoded.type_ids for j in live] if self._with_type_ids else None,
        )
        rows, width = tensors.shape
        self._metrics.batch_size.observe(rows)
        self._metrics.batch_tokens.observe(rows * width)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            scores = await loop.run_in_executor(self._executor, self.engine.infer, tensors)
        except Exception as exc:
            log.exception("inference failed on a batch of %d items for %s", rows, self.model)
            self._metrics.inference_errors.labels(model=self.model).inc()
            for job in live:
                if not job.future.done():
                    job.future.set_exception(InferenceFailed("inference failed on this item's batch"))
            self._failures += 1
            if isinstance(exc, EngineCrashed) or self._failures >= CRASH_AFTER_FAILURES:
                await self._restart_engine()
            return
        self._failures = 0
        elapsed = time.perf_counter() - started
        self._metrics.inference_duration.observe(elapsed)
        self._metrics.items_scored.labels(model=self.model).inc(rows)
        rate = rows / max(elapsed, 1e-6)
        self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        for job, score in zip(live, scores.tolist(), strict=True):
            if job.future.done():
                continue
            if math.isfinite(score):
                job.future.set_result(score)
            else:
                job.future.set_exception(InferenceFailed("the model returned a non-finite score"))
