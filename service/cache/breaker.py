"""A circuit breaker for the cache: stop calling a dead Redis, probe until it is back.

closed: calls go through; ``failures`` consecutive failures open it.
open: calls are refused (the cache answers "unavailable" at once) for ``cooldown_s``.
half-open: one call (the probe) goes through; success closes the breaker, failure opens it again.
A probe whose caller never reports (it was cancelled) expires after ``cooldown_s``, so a lost
probe cannot hold the breaker half-open forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    def __init__(
        self, failures: int, cooldown_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if failures < 1:
            raise ValueError("failures must be at least 1")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_at: float | None = None  # when the half-open probe was let through
        self.opened = 0  # times the breaker opened, for /info

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
            return "half-open"
        return self._state

    def allow(self) -> bool:
        """May the caller call Redis now? In half-open, only the one probe may."""
        now = self._clock()
        if self._state == "closed":
            return True
        if self._state == "open":
            if now - self._opened_at < self.cooldown_s:
                return False
            self._state = "half-open"
            self._probe_at = None
        if self._probe_at is None or now - self._probe_at >= self.cooldown_s:
            self._probe_at = now
            return True
        return False

    def success(self) -> None:
        self._consecutive = 0
        self._state = "closed"
        self._probe_at = None

    def failure(self) -> None:
        self._consecutive += 1
        if self._state == "half-open" or self._consecutive >= self.failures:
            if self._state != "open":
                self.opened += 1
            self._state = "open"
            self._opened_at = self._clock()
            self._probe_at = None

    def release(self) -> None:
        """The caller was let through but gave no verdict (cancelled): free the probe slot."""
        if self._state == "half-open":
            self._probe_at = None
