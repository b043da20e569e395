"""Build the score cache the settings ask for."""

from __future__ import annotations

from rmserve.cache.base import ScoreCache
from rmserve.cache.memory import MemoryCache
from rmserve.config import Settings
from rmserve.metrics import Metrics


def make_cache(settings: Settings, metrics: Metrics | None = None) -> ScoreCache | None:
    backend = settings.cache_backend()
    if backend == "off":
        return None
    if backend == "memory":
        return MemoryCache(settings.cache_max_items)
    from rmserve.cache.redis import RedisCache, RedisOptions  # redis is only imported when asked for

    assert settings.redis_url is not None
    options = RedisOptions(
        ttl_s=settings.cache_ttl_s,
        prefix=settings.cache_prefix,
        timeout_s=settings.cache_timeout_ms / 1000,
        connect_timeout_s=settings.cache_connect_timeout_ms / 1000,
        pool_size=settings.cache_pool_size,
        write_buffer_items=settings.cache_write_buffer,
        breaker_failures=settings.cache_breaker_failures,
        breaker_cooldown_s=settings.cache_breaker_cooldown_s,
    )
    url = settings.redis_url.get_secret_value()
    if metrics is None:
        return RedisCache.from_url(url, options)
    dropped = metrics.cache_dropped_writes

    def count_dropped(reason: str, n: int) -> None:
        dropped.labels(reason=reason).inc(n)

    return RedisCache.from_url(url, options, count_dropped)
