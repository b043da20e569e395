"""The Redis score cache, shared by every replica, and never a reason for a request to fail.

Reads are on the request path: one MGET for all of a request's items (on a Cluster, one MGET per
slot, pipelined per node: redis-py's ``mget_nonatomic``), under a tight deadline, no retries, and
at most ``pool_size`` at once. Any problem is a ``CacheUnavailable`` (the scorer counts the
lookups as errors and scores the items), and a circuit breaker stops calling a Redis that keeps
failing, then lets one probe through until it answers again.

Writes are off the request path: ``put_many`` only adds to a bounded buffer (full: the entries
are dropped and counted); one background task drains it in pipelined ``SET key value PX ttl``
batches, each TTL shortened by up to 10% at random so entries written together do not expire
together. Entries waiting in the buffer answer lookups, so an item scored a moment ago is a hit
here even before Redis has it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import OutOfMemoryError
from redis.utils import HIREDIS_AVAILABLE

from rmserve.cache.base import CacheUnavailable
from rmserve.cache.breaker import CircuitBreaker
from rmserve.cache.redis_url import RedisTarget, parse_redis_url
from rmserve.config import redact_url

log = logging.getLogger("rmserve.cache")

_TTL_JITTER = 0.10
_WRITE_BATCH = 512  # entries per pipelined write
_WRITE_CONNECTIONS = 2
_FULL_WARNING_EVERY_S = 60.0  # a full Redis is logged at most this often
_CLOSE_FLUSH_S = 2.0  # on shutdown, how long buffered writes may take to reach Redis


@dataclass(frozen=True)
class RedisOptions:
    ttl_s: float
    prefix: str = "rmserve:"
    timeout_s: float = 0.05  # a whole lookup: pool wait + connect + MGET
    connect_timeout_s: float = 0.05
    write_timeout_s: float = 1.0  # one pipelined write batch, off the request path
    pool_size: int = 32
    write_buffer_items: int = 65536
    breaker_failures: int = 5
    breaker_cooldown_s: float = 5.0


def _client(target: RedisTarget, opts: RedisOptions, *, timeout_s: float, connections: int) -> Any:
    """A redis.asyncio client for the target, with no retries: the caller decides what a failure means."""
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": opts.connect_timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if target.mode == "single":
        pool = BlockingConnectionPool.from_url(
            target.url, max_connections=connections, timeout=timeout_s, **common
        )
        return Redis.from_pool(pool)
    if target.mode == "sentinel":
        assert target.service_name is not None
        sentinel_auth = {"username": target.sentinel_username, "password": target.sentinel_password}
        sentinel = Sentinel(list(target.hosts), sentinel_kwargs={**common, **sentinel_auth})
        return sentinel.master_for(
            target.service_name,
            db=target.db,
            username=target.username,
            password=target.password,
            ssl=target.tls,
            max_connections=connections,
            **common,
        )
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
        username=target.username,
        password=target.password,
        ssl=target.tls,
        max_connections=connections,
        require_full_coverage=False,
        **common,
    )


def connect(url: str, timeout_s: float, connections: int = 4) -> Any:
    """A redis.asyncio client for ``url`` (any form RMSERVE_REDIS_URL takes), with no retries; connects
    nothing until first used."""
    options = RedisOptions(ttl_s=1.0, timeout_s=timeout_s, connect_timeout_s=timeout_s)
    return _client(parse_redis_url(url), options, timeout_s=timeout_s, connections=connections)


class RedisCache:
    backend = "redis"

    def __init__(
        self,
        target: RedisTarget,
        reader: Any,
        writer: Any,
        opts: RedisOptions,
        on_drop: Callable[[str, int], None] | None = None,
    ) -> None:
        self.target = target
        self._on_drop = on_drop  # (reason, entries): the service's dropped-writes metric
        self.options = opts
        self._reader = reader
        self._writer_client = writer
        self._cluster = target.mode == "cluster"
        self._prefix = opts.prefix
        self._breaker = CircuitBreaker(opts.breaker_failures, opts.breaker_cooldown_s)
        self._permits = asyncio.Semaphore(opts.pool_size)
        self._buffer: dict[str, bytes] = {}  # waiting for the writer, oldest first
        self._writing: dict[str, bytes] = {}  # the batch being written now
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._rng = random.Random()
        # Counters for /info; Prometheus counts lookups by result in the scorer.
        self.read_errors = 0
        self.reads_skipped = 0  # refused by the open breaker, or no connection free in time
        self.writes = 0
        self.write_errors = 0
        self.dropped_writes = 0
        self.full_warned_at: float | None = None

    @classmethod
    def from_url(
        cls, url: str, opts: RedisOptions, on_drop: Callable[[str, int], None] | None = None
    ) -> RedisCache:
        """Build the clients; connects nothing (readiness never waits on Redis)."""
        target = parse_redis_url(url)
        reader = _client(target, opts, timeout_s=opts.timeout_s, connections=opts.pool_size)
        writer = _client(target, opts, timeout_s=opts.write_timeout_s, connections=_WRITE_CONNECTIONS)
        return cls(target, reader, writer, opts, on_drop)

    # -- reads (request path) ------------------------------------------------------------------

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        if not self._breaker.allow():
            self.reads_skipped += 1
            raise CacheUnavailable("redis circuit is open")
        deadline = asyncio.get_running_loop().time() + self.options.timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                await self._permits.acquire()
        except TimeoutError:
            self._breaker.release()  # not Redis's fault: this process has too many lookups at once
            self.reads_skipped += 1
            raise CacheUnavailable("no redis connection free in time") from None
        try:
            names = [self._prefix + k for k in keys]
            async with asyncio.timeout_at(deadline):
                raw: list[bytes | None] = await (
                    self._reader.mget_nonatomic(names) if self._cluster else self._reader.mget(names)
                )
        except asyncio.CancelledError:
            self._breaker.release()
            raise
        except Exception as exc:
            self.read_errors += 1
            self._failed("lookup", exc)
            raise CacheUnavailable(f"redis lookup failed: {type(exc).__name__}") from None
        else:
            self._succeeded()
        finally:
            self._permits.release()
        # Read after the await: an entry buffered meanwhile is not yet in Redis, but it is here.
        return [v if v is not None else self._buffered(k) for k, v in zip(keys, raw, strict=True)]

    def _buffered(self, key: str) -> bytes | None:
        value = self._buffer.get(key)
        return value if value is not None else self._writing.get(key)

    # -- writes (off the request path) ---------------------------------------------------------

    def put_many(self, entries: dict[str, bytes]) -> None:
        if not entries or self._closing:
            return
        if len(self._buffer) + len(entries) > self.options.write_buffer_items:
            self._dropped("buffer_full", len(entries))
            return
        self._buffer.update(entries)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name="rmserve-cache-writer"
            )
        self._wake.set()

    async def _write_loop(self) -> None:
        while True:
            if not self._buffer:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            names = list(itertools.islice(self._buffer, _WRITE_BATCH))
            self._writing = {k: self._buffer.pop(k) for k in names}
            try:
                await self._write(self._writing)
            finally:
                self._writing = {}

    async def _write(self, batch: dict[str, bytes]) -> None:
        if not self._breaker.allow():
            self._dropped("circuit_open", len(batch))
            return
        ttl_ms = self.options.ttl_s * 1000
        try:
            async with asyncio.timeout(self.options.write_timeout_s):
                # One round trip (one per node on a Cluster); SET ... PX sets value and TTL atomically.
                pipe = (
                    self._writer_client.pipeline() if self._cluster else self._writer_client.pipeline(False)
                )
                for key, value in batch.items():
                    jitter = 1.0 - _TTL_JITTER * self._rng.random()
                    pipe.set(self._prefix + key, value, px=max(1, int(ttl_ms * jitter)))
                await pipe.execute()
        except asyncio.CancelledError:
            self._breaker.release()
            raise
        except OutOfMemoryError:
            self.write_errors += 1
            # Full (maxmemory with a noeviction policy): Redis still answers reads, so the circuit
            # stays closed; the drop is counted and said, at most once a minute.
            self._succeeded()
            self._dropped("redis_full", len(batch))
            now = time.monotonic()
            if self.full_warned_at is None or now - self.full_warned_at >= _FULL_WARNING_EVERY_S:
                self.full_warned_at = now
                log.warning("redis is full (maxmemory reached): score cache writes are dropped")
        except Exception as exc:
            self.write_errors += 1
            self._dropped("error", len(batch))
            self._failed("write", exc)
        else:
            self.writes += len(batch)
            self._succeeded()

    def _dropped(self, reason: str, n: int) -> None:
        self.dropped_writes += n
        if self._on_drop is not None:
            self._on_drop(reason, n)

    # -- breaker bookkeeping -------------------------------------------------------------------

    def _failed(self, what: str, exc: Exception) -> None:
        before = self._breaker.state
        self._breaker.failure()
        if before != "open" and self._breaker.state == "open":
            log.warning(
                "redis %s failed (%s: %s); circuit open, cache bypassed for %.1f s",
                what,
                type(exc).__name__,
                exc,
                self.options.breaker_cooldown_s,
            )

    def _succeeded(self) -> None:
        if self._breaker.state != "closed":
            log.warning("redis answers again; circuit closed")
        self._breaker.success()

    # -- lifecycle and /info -------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "mode": self.target.mode,
            "url": redact_url(self.target.url),
            "state": self._breaker.state,
            "parser": "hiredis" if HIREDIS_AVAILABLE else "python",
            "prefix": self._prefix,
            "ttl_s": self.options.ttl_s,
            "timeout_ms": self.options.timeout_s * 1000,
            "pool_size": self.options.pool_size,
            "breaker": {
                "failures": self.options.breaker_failures,
                "cooldown_s": self.options.breaker_cooldown_s,
                "opened": self._breaker.opened,
            },
            "read_errors": self.read_errors,
            "reads_skipped": self.reads_skipped,
            "writes": self.writes,
            "write_errors": self.write_errors,
            "dropped_writes": self.dropped_writes,
            "buffered_writes": len(self._buffer) + len(self._writing),
        }

    async def close(self) -> None:
        """Flush buffered writes for a moment, then close the connections."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            try:
                await asyncio.wait_for(self._writer, _CLOSE_FLUSH_S)
            except TimeoutError:
                self.dropped_writes += len(self._buffer)
        clients = [self._reader, self._writer_client]
        if self.target.mode == "sentinel":
            for client in (self._reader, self._writer_client):
                clients += client.connection_pool.sentinel_manager.sentinels
        for client in clients:
            try:
                await client.aclose()
            except Exception:  # closing a client of a dead Redis must not fail the shutdown
                log.debug("closing a redis client failed", exc_info=True)
