"""What the app knows about itself: its settings, its models once loaded, and its phase."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from rmserve.config import Settings
from rmserve.errors import NotReady
from rmserve.metrics import Metrics
from rmserve.scoring import Scorer

Phase = Literal["starting", "ready", "draining", "failed"]


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    phase: Phase = "starting"
    scorer: Scorer | None = None
    failure: str | None = None
    started: float = field(default_factory=time.time)

    def ready_scorer(self) -> Scorer:
        """The scorer once the server is ready; NotReady (503) while it is starting, draining or failed.
        (A model whose engine is being rebuilt is refused per request, in ``rmserve.scoring``.)"""
        if self.phase != "ready" or self.scorer is None:
            raise NotReady(f"the server is {self.phase}")
        return self.scorer

    def begin_drain(self) -> None:
        """Not ready from now on: new work gets 503, accepted work finishes."""
        if self.phase != "failed":
            self.phase = "draining"
        self.metrics.ready.set(0)

    def is_ready(self) -> bool:
        if self.phase != "ready" or self.scorer is None:
            return False
        return all(rt.batcher.healthy for rt in self.scorer.models.values())

    def items_in_work(self) -> int:
        """Items accepted and not yet scored, over every model: the load a replica reports to Ray."""
        if self.scorer is None:
            return 0
        return sum(rt.batcher.in_work for rt in self.scorer.models.values())
