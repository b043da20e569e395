"""The in-process LRU cache: the default when no Redis URL is set."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class MemoryCache:
    backend = "memory"

    def __init__(self, max_items: int) -> None:
        self._max = max_items
        self._data: OrderedDict[str, bytes] = OrderedDict()

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            out.append(value)
        return out

    def put_many(self, entries: dict[str, bytes]) -> None:
        for key, value in entries.items():
            self._data[key] = value
            self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def state(self) -> dict[str, Any]:
        return {"backend": self.backend, "state": "ok", "items": len(self._data), "max_items": self._max}

    async def close(self) -> None:
        self._data.clear()
