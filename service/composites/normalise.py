"""A component's normalisation: ``none``, a fixed ``affine`` (``scale * x + shift``), or a running ``zscore``.

The running z-score keeps the last ``window`` raw values of a component. A request's values join the window
first; each is then ``(x - mean) / std`` over the window (the population standard deviation; 0.0 while the
window's values are all equal). The window lives in Redis when the server has a Redis URL, so every replica
pushes to and reads the same window; otherwise in this process. In Redis one Lua script appends the values,
drops the oldest beyond the window and updates the running sums, atomically, so replicas never lose each
other's values; the keys (``<cache_prefix>norm:{composite/component}``, one hash slot on a Cluster) expire
after the cache TTL without traffic.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rmserve.composites.spec import Normalize


@dataclass(frozen=True)
class WindowStats:
    count: int
    total: float
    squares: float

    def z(self, x: float) -> float:
        mean = self.total / self.count
        var = max(0.0, self.squares / self.count - mean * mean)
        std = math.sqrt(var)
        return (x - mean) / std if std > 1e-12 * max(1.0, abs(mean)) else 0.0


class Windows(Protocol):
    backend: str

    async def push(self, key: str, values: Sequence[float], window: int) -> WindowStats:
        """Append ``values`` to the window ``key``, keep its last ``window``; its statistics after."""
        ...

    async def close(self) -> None: ...


class MemoryWindows:
    """Windows held by this process (no Redis configured): each replica normalises by its own traffic."""

    backend = "memory"

    def __init__(self) -> None:
        self._windows: dict[str, tuple[deque[float], list[float]]] = {}

    async def push(self, key: str, values: Sequence[float], window: int) -> WindowStats:
        held, sums = self._windows.setdefault(key, (deque(), [0.0, 0.0]))
        for x in values:
            held.append(x)
            sums[0] += x
            sums[1] += x * x
        while len(held) > window:
            old = held.popleft()
            sums[0] -= old
            sums[1] -= old * old
        return WindowStats(len(held), sums[0], sums[1])

    async def close(self) -> None:
        return None


# KEYS[1]: the window's list, KEYS[2]: its sums. ARGV: window, ttl in ms, then the values (as Python wrote
# them, so the list holds them exactly). Sums are written with 17 significant digits: doubles round-trip.
_PUSH = """
local window = tonumber(ARGV[1])
local total = tonumber(redis.call('HGET', KEYS[2], 't') or '0')
local squares = tonumber(redis.call('HGET', KEYS[2], 'q') or '0')
for i = 3, #ARGV do
  local x = tonumber(ARGV[i])
  redis.call('RPUSH', KEYS[1], ARGV[i])
  total = total + x
  squares = squares + x * x
end
local n = redis.call('LLEN', KEYS[1])
while n > window do
  local old = tonumber(redis.call('LPOP', KEYS[1]))
  total = total - old
  squares = squares - old * old
  n = n - 1
end
local t = string.format('%.17g', total)
local q = string.format('%.17g', squares)
redis.call('HSET', KEYS[2], 't', t, 'q', q)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {n, t, q}
"""


class RedisWindows:
    """Windows in Redis, shared by every replica that has the same Redis URL and key prefix."""

    backend = "redis"

    def __init__(self, client: Any, prefix: str, ttl_s: float) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_ms = int(ttl_s * 1000)
        self._script = client.register_script(_PUSH)

    async def push(self, key: str, values: Sequence[float], window: int) -> WindowStats:
        base = f"{self._prefix}norm:{{{key}}}"
        n, total, squares = await self._script(
            keys=[base, base + ":sums"], args=[window, self._ttl_ms, *(repr(float(x)) for x in values)]
        )
        return WindowStats(int(n), float(total), float(squares))

    async def close(self) -> None:
        await self._client.aclose()


async def normalised(spec: Normalize, key: str, values: Sequence[float], windows: Windows) -> list[float]:
    """``values`` as ``spec`` normalises them; a zscore's window ``key`` takes them in first."""
    if spec.kind == "affine":
        return [spec.scale * x + spec.shift for x in values]
    if spec.kind == "zscore":
        if not values:
            return []
        stats = await windows.push(key, values, spec.window)
        return [stats.z(x) for x in values]
    return list(values)
