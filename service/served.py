"""What a served model is to the routes: a name that scores items, whatever it is made of.

The registry of served models (``rmserve.scoring.Scorer``) answers a name with a ``Served``: a bundle
(``rmserve.scoring.ModelRuntime``) or a model made of others (a composite, ``rmserve.composites``). A
request's wishes travel as one ``Ask``; the answer is a ``ScoreResult``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from rmserve.formatting import Formatter
from rmserve.items import Item
from rmserve.kinds import Aggregate, BundleKind

if TYPE_CHECKING:
    from rmserve.scoring import Scorer


@dataclass(frozen=True)
class Ask:
    """How a request wants its items scored: ended by ``deadline`` (a ``time.monotonic()``); with
    ``strict`` an item over max_length is a 413; ``wait_until``: how long a full queue is waited out;
    ``aggregate``: a process model's step aggregate; ``labels``: each item's label (a composite's rules
    read them, a bundle never does)."""

    strict: bool
    deadline: float
    wait_until: float | None = None
    aggregate: Aggregate | None = None
    labels: Sequence[Any] | None = None


@dataclass(frozen=True)
class ScoreResult:
    model: str
    version: str
    backend: str  # the engine's provider: cpu, openvino, cuda
    precision: str
    scores: list[float]  # a process model's: each item's aggregate of its step scores
    item_tokens: list[int]
    item_truncated: list[bool]
    cache_hits: int
    step_scores: list[list[float]] | None = None  # process models only
    item_dropped: list[int] = field(default_factory=list)  # trailing steps truncation left out
    # Models with several outputs (composites): each component's raw values, and as normalised.
    components: dict[str, list[float]] | None = None
    normalized: dict[str, list[float]] | None = None
    skipped: tuple[str, ...] = ()  # components left out of this answer (on_error: skip)

    @property
    def tokens(self) -> int:
        return sum(self.item_tokens)

    @property
    def truncated(self) -> int:
        return sum(self.item_truncated)

    @property
    def steps_dropped(self) -> int | None:
        return sum(self.item_dropped) if self.step_scores is not None else None

    @classmethod
    def joined(cls, parts: Sequence[ScoreResult]) -> ScoreResult:
        """The answers of consecutive parts of one request's items, as one answer."""
        first = parts[0]

        def per_item(name: str) -> dict[str, list[float]] | None:
            found = [getattr(p, name) for p in parts]
            if any(f is None for f in found):
                return None
            keys = [k for k in found[0] if all(k in f for f in found)]
            return {k: [v for f in found for v in f[k]] for k in keys}

        steps = [p.step_scores for p in parts]
        return cls(
            model=first.model,
            version=first.version,
            backend=first.backend,
            precision=first.precision,
            scores=[s for p in parts for s in p.scores],
            item_tokens=[t for p in parts for t in p.item_tokens],
            item_truncated=[t for p in parts for t in p.item_truncated],
            cache_hits=sum(p.cache_hits for p in parts),
            step_scores=[s for part in steps for s in part or []] if steps[0] is not None else None,
            item_dropped=[d for p in parts for d in p.item_dropped],
            components=per_item("components"),
            normalized=per_item("normalized"),
            skipped=tuple(dict.fromkeys(s for p in parts for s in p.skipped)),
        )


class Served(Protocol):
    """What the registry of served models answers a name with: a bundle (``ModelRuntime``) or a model
    made of others (a composite, ``rmserve.composites``). Trainer routes read their inputs with its
    ``formatter`` and ``kind``."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def formatter(self) -> Formatter: ...

    @property
    def kind(self) -> BundleKind: ...

    @property
    def max_queue_items(self) -> int: ...

    def check_timeout(self, timeout_s: float) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    async def score(self, scorer: Scorer, items: list[Item], ask: Ask) -> ScoreResult: ...
