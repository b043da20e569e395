"""The cache protocol. Implementations fail open: an outage is a miss, never a failed request."""

from __future__ import annotations

from typing import Any, Protocol


class CacheUnavailable(Exception):
    """A lookup could not be answered; the caller counts it as an error and scores the items."""


class ScoreCache(Protocol):
    backend: str

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """One round trip for all keys; raises CacheUnavailable when the cache cannot answer."""
        ...

    def put_many(self, entries: dict[str, bytes]) -> None:
        """Write entries off the request path; never raises."""
        ...

    def state(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...
