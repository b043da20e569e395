"""Build the score cache the settings ask for."""

from __future__ import annotations

from service.cache.base import ScoreCache
from service.cache.memory import MemoryCache
from service.config import Settings


def make_cache(settings: Settings) -> ScoreCache | None:
    backend = settings.cache_backend()
    if backend == "off":
        return None
    if backend == "memory":
        return MemoryCache(settings.cache_max_items)
    from service.cache.redis import RedisCache  # redis is only imported when asked for

    assert settings.redis_url is not None
    return RedisCache.from_url(settings.redis_url.get_secret_value(), ttl_s=settings.cache_ttl_s)
