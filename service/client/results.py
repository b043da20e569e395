"""What the client's calls return: frozen records, chunk answers merged into one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Usage:
    items: int = 0
    tokens: int = 0
    cache_hits: int = 0
    truncated: int = 0
    dropped_parts: int = 0  # content parts that are not text, left out of what was scored
    steps_dropped: int = 0  # process reward models: trailing steps truncation left out
    skipped: tuple[str, ...] = ()  # composites: components left out (on_error: skip), in any chunk

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.items + other.items,
            self.tokens + other.tokens,
            self.cache_hits + other.cache_hits,
            self.truncated + other.truncated,
            self.dropped_parts + other.dropped_parts,
            self.steps_dropped + other.steps_dropped,
            tuple(dict.fromkeys((*self.skipped, *other.skipped))),
        )


@dataclass(frozen=True)
class ScoreResult:
    """Scores in request order, summed usage, and every model version that answered (one, normally).

    From a process reward model, ``step_scores`` holds each item's step scores (one per step kept, in
    order) and ``scores`` each item's aggregate of them. From a composite, ``components`` holds each
    component's raw value per item and ``normalized`` the same as normalised (``scores`` combines them);
    a component skipped in some chunk of the call is absent from both."""

    scores: list[float]
    model: str | None
    model_versions: tuple[str, ...]
    usage: Usage
    requests: int
    step_scores: list[list[float]] | None = None
    components: dict[str, list[float]] | None = None
    normalized: dict[str, list[float]] | None = None

    @property
    def model_version(self) -> str | None:
        return self.model_versions[0] if len(self.model_versions) == 1 else None


@dataclass(frozen=True)
class RewardResult:
    """/get_reward's answer: rewards (what a trainer optimizes), scores, and per-item extra logs."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]
    step_scores: list[list[float]] | None = None  # a process reward model's, per query


@dataclass(frozen=True)
class Health:
    live: bool
    ready: bool
    status: str
    detail: dict[str, Any] = field(default_factory=dict)
