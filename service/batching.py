"""Cross-request dynamic batching: admission, one bounded queue, token-budget batches, deadlines.

Requests put tokenized items in one queue per model. Whenever one of the engine's streams is free
the loop plans the waiting items: sorted by length, cut into the batches that cost least (padded
tokens plus a fixed price per forward pass, each within the token budget), and the batch that holds
the oldest item runs on the engine's worker threads, off the event loop. The rest wait and are
planned again with whatever arrives meanwhile, so under load batches group items of like length
by themselves; ``max_wait_ms`` can add a short wait to fill them further. Every accepted item's
future is resolved: with its value (what the bundle kind's ``read`` takes from the item's row of
output: a score, or a process model's step values), or with the error that stopped it (deadline
passed, inference failed, shutting down).

Admission keeps the deadline a promise: a deadline shorter than the fastest forward pass measured
on the engine is refused before any work (422: no idle server could meet it); a request is refused
(429, with a ``Retry-After`` from the same estimate) when the work ahead of it, at the measured rate,
cannot end before its deadline; and each accepted request has a timer of its own that takes its
items out of the queue with a 504 when its deadline passes before they reach a forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rmserve.engines.base import Engine, EngineCrashed, pad_batch
from rmserve.engines.batches import Read
from rmserve.errors import DeadlineExceeded, InferenceFailed, InvalidRequest, NotReady, Overloaded
from rmserve.formatting import Encoded
from rmserve.kinds import NonFinite, read_score
from rmserve.metrics import Metrics
from rmserve.planning import batch_holding, shared_group

log = logging.getLogger("rmserve.batching")

# After this many failed forward passes in a row the engine is presumed broken and rebuilt.
CRASH_AFTER_FAILURES = 3


@dataclass(eq=False)
class Job:
    """One item waiting for the model."""

    encoded: Encoded
    deadline: float  # time.monotonic() by which it must be in a forward pass
    future: asyncio.Future[Any]  # the item's value, as ``read`` takes it from the output
    enqueued: float = field(default_factory=time.monotonic)
    taken: bool = False  # out of the queue (in a forward pass, or failed): its timer leaves it alone


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_tokens: int
    max_wait_s: float
    max_queue_items: int
    # The fixed cost of one forward pass, in padded tokens: how much padding is worth one call less.
    call_overhead_tokens: int = 64


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
        read: Read = read_score,
    ) -> None:
        self.model = model
        self._read = read
        self._rebuild = rebuild
        self._failures = 0
        self.engine = engine
        self.policy = policy
        self._pad_id = pad_id
        self._with_type_ids = with_type_ids
        self._metrics = metrics
        self._pending: deque[Job] = deque()  # oldest first
        self._running: dict[asyncio.Task[None], list[Job]] = {}  # forward passes in flight
        self._queued = 0  # items accepted and not yet taken into a forward pass
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()  # set whenever items leave the queue
        self._streams = max(1, engine.info.streams)
        self._executor = ThreadPoolExecutor(max_workers=self._streams, thread_name_prefix=f"engine-{model}")
        self._restart_needed = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._rate = 0.0  # items/s of recent forward passes: admission's estimate and Retry-After
        self.fastest_pass_s = 0.0  # the quickest forward pass seen: no deadline may be shorter
        self.healthy = True
        self.restarts = 0

    # -- admission -----------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def in_work(self) -> int:
        """Items accepted and not yet scored: queued, and in forward passes now."""
        return self._queued + sum(len(batch) for batch in self._running.values())

    def wait_estimate_s(self, extra: int = 0) -> float | None:
        """Seconds until ``extra`` more items would be scored behind the work queued and running now,
        at the recently measured rate; None before any forward pass has been measured."""
        if self._rate <= 0:
            return None
        return (self.in_work + extra) / self._rate

    def retry_after_s(self, extra: int = 0) -> float:
        """How long the queue (plus ``extra`` items) takes to drain at the recent rate."""
        return self.wait_estimate_s(extra) or 1.0

    def check_timeout(self, timeout_s: float) -> None:
        """InvalidRequest when a request asks for a deadline (``timeout_s`` after its arrival) shorter
        than the fastest forward pass this engine has made: not even an idle server could meet it."""
        if timeout_s < self.fastest_pass_s:
            raise InvalidRequest(
                f"a deadline of {timeout_s * 1000:.1f} ms is less than one forward pass of model "
                f"{self.model!r} takes (at least {self.fastest_pass_s * 1000:.1f} ms); give it more time"
            )

    def submit(self, items: list[Encoded], deadline: float) -> list[asyncio.Future[Any]]:
        """Queue items for scoring, all or none. Raises Overloaded when the queue is full, or when the
        work ahead cannot end before ``deadline`` (a ``time.monotonic()``)."""
        self._check_room(len(items), deadline)
        loop = asyncio.get_running_loop()
        jobs = [Job(enc, deadline, loop.create_future()) for enc in items]
        self._pending.extend(jobs)
        self._add_queued(len(jobs))
        # The request's own timer: at its deadline, items still waiting leave the queue with a 504.
        loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), self._expire, jobs)
        self._wakeup.set()
        return [job.future for job in jobs]

    async def admit(
        self, items: list[Encoded], deadline: float, *, wait_until: float | None = None
    ) -> list[asyncio.Future[Any]]:
        """``submit``, or with ``wait_until`` (a ``time.monotonic()``), wait until then for room in the
        queue before giving up with the same Overloaded that ``submit`` raises."""
        while True:
            try:
                return self.submit(items, deadline)
            except Overloaded:
                remaining = (wait_until or 0.0) - time.monotonic()
                if remaining <= 0 or self._closing:
                    raise
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), remaining)

    def _check_room(self, n: int, deadline: float) -> None:
        if self._closing or self._task is None:
            raise NotReady(f"model {self.model!r} is not accepting work")
        if self._queued + n > self.policy.max_queue_items:
            raise Overloaded(
                f"queue full: {self._queued} items waiting for model {self.model!r} "
                f"(limit {self.policy.max_queue_items})",
                retry_after_s=self.retry_after_s(n),
            )
        estimate = self.wait_estimate_s(n)
        remaining = deadline - time.monotonic()
        if estimate is not None and estimate > remaining:
            raise Overloaded(
                f"the work queued for model {self.model!r} takes about {estimate:.1f} s at "
                f"{self._rate:.0f} items/s; this request's deadline is {max(remaining, 0):.1f} s away",
                retry_after_s=estimate - remaining,
            )

    def _expire(self, jobs: list[Job]) -> None:
        late = {id(j) for j in jobs if not j.taken}
        if not late:
            return
        self._pending = deque(j for j in self._pending if id(j) not in late)
        self._add_queued(-len(late))
        for job in jobs:
            if id(job) in late and not job.future.done():
                job.future.set_exception(DeadlineExceeded("the request's deadline passed before scoring"))

    def _add_queued(self, delta: int) -> None:
        # One gauge for all models: each batcher adds its own change.
        self._queued += delta
        self._metrics.queue_depth.inc(delta)
        if delta < 0:
            self._room.set()

    # -- lifecycle -----------------------------------------------------------------------------

    async def warmup(self, max_length: int) -> None:
        """A forward pass on every stream at the largest shape the batcher builds, before ready; then
        one at the smallest (one token), timed: the fastest a request could ever be scored."""
        rows = max(1, self.policy.max_batch_tokens // max_length)
        type_ids = [None] * rows if self._with_type_ids else None
        batch = pad_batch([[self._pad_id] * max_length] * rows, self._pad_id, type_ids)
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._executor, self.engine.infer, batch) for _ in range(self._streams))
        )
        smallest = pad_batch([[self._pad_id]], self._pad_id, [None] if self._with_type_ids else None)
        for _ in range(2):  # a first pass at a new shape may allocate: the second one counts
            started = time.perf_counter()
            await loop.run_in_executor(self._executor, self.engine.infer, smallest)
            self.fastest_pass_s = time.perf_counter() - started

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
        self._restart_needed = False
        self.restarts += 1
        self.healthy = True
        log.info("engine for %s rebuilt (restart %d)", self.model, self.restarts)

    def _fail_pending(self, error: Exception) -> None:
        for job in [*(j for batch in self._running.values() for j in batch), *self._pending]:
            job.taken = True  # out of the queue: its deadline timer leaves it alone
            if not job.future.done():
                job.future.set_exception(error)
        self._pending.clear()
        self._add_queued(-self._queued)

    # -- the loop ------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if self._restart_needed:
                await self._settle()  # the other streams finish (or fail) first
                await self._restart_engine()
                continue
            if not self._pending:
                if self._closing:
                    await self._settle()
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._running) >= self._streams:
                await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                continue
            if self.policy.max_wait_s > 0:
                await self._fill()
            batch = self._take()
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running[task] = batch
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        batch = self._running.pop(task, [])
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("a batch of %s failed outside the engine", self.model, exc_info=error)
        # A bug in _run must not leave its callers waiting forever.
        for job in batch:
            if not job.future.done():
                job.future.set_exception(InferenceFailed("the batcher failed on this item's batch"))

    async def _settle(self) -> None:
        while self._running:
            await asyncio.wait(list(self._running))

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

    def _take(self) -> list[Job]:
        """Plan the waiting items and take out the batch that holds the oldest."""
        oldest = self._pending[0]
        jobs = sorted(self._pending, key=lambda j: len(j.encoded))
        budget, overhead = self.policy.max_batch_tokens, self.policy.call_overhead_tokens
        span = batch_holding([len(j.encoded) for j in jobs], jobs.index(oldest), budget, overhead)
        batch = jobs[span.start : span.stop]
        share = getattr(self.engine, "shared_prefix_tokens", 0)
        if share:  # the engine computes a shared prefix once: items sharing the oldest's go with it
            rest = [j for j in self._pending if j is not oldest and all(j is not b for b in batch)]
            ids = [j.encoded.ids for j in rest]
            batch += [rest[i] for i in shared_group(oldest.encoded.ids, ids, share, budget)]
        taken = set(map(id, batch))
        for job in batch:
            job.taken = True
        self._pending = deque(j for j in self._pending if id(j) not in taken)
        self._add_queued(-len(batch))
        return batch

    async def _run(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live: list[Job] = []
        for job in batch:
            if job.future.done():  # its caller went away
                continue
            if job.deadline <= now:
                job.future.set_exception(DeadlineExceeded("the request's deadline passed before scoring"))
                continue
            self._metrics.queue_wait.observe(now - job.enqueued)
            live.append(job)
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
                self._restart_needed = True
                self._wakeup.set()
            return
        self._failures = 0
        elapsed = time.perf_counter() - started
        self.fastest_pass_s = min(self.fastest_pass_s or elapsed, elapsed)
        self._metrics.inference_duration.observe(elapsed)
        self._metrics.items_scored.labels(model=self.model).inc(rows)
        rate = rows * self._streams / max(elapsed, 1e-6)  # every stream busy under load
        self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        for job, row in zip(live, scores, strict=True):
            if job.future.done():
                continue
            try:
                job.future.set_result(self._read(row, job.encoded, 0))
            except NonFinite as exc:
                job.future.set_exception(InferenceFailed(str(exc)))
