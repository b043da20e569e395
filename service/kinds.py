"""A bundle's kind, outcome or process: the one object, chosen from the manifest at load, that owns what
the kind changes.

* which items it takes (a ``steps`` item on an outcome model, or an item without steps on a process
  model, is a 422 naming the model's kind);
* how items become token ids (``Formatter``, or ``StepEncoder`` with the step positions);
* what a row of the engine's output becomes: one float (outcome graphs emit ``[batch]``), the
  values at the item's step-token positions (process graphs emit ``[batch, length]``), or a score
  with its objectives' values (a head with several outputs: the engine's ``[batch, 1 + objectives]``);
  an outcome bundle's score leaves mapped by its ``score_scale`` and ``score_shift`` (``ScoreMap``);
* the answer: ``scores``, for a process model ``step_scores`` with each item's aggregate of its
  step values as its score (``min`` by default, ``last``, ``mean`` or ``prod``), and for a head with
  several outputs ``components``, one list per objective.

The batcher, the queue and the cache carry a kind's values without looking inside them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import numpy as np

from rmserve.bundle import Bundle, ProcessSettings
from rmserve.errors import InvalidItem, InvalidRequest
from rmserve.formatting import Encoded, Formatter
from rmserve.items import Item, StepsItem, TextItem
from rmserve.steps import StepEncoder


@dataclass(frozen=True)
class Objectives:
    """One item's value from a head with several outputs: its combined score and each objective's."""

    score: float
    components: tuple[float, ...]


# One item's value: an outcome model's score, a process model's reward per step, or a score with its
# objectives' values.
Value = float | tuple[float, ...] | Objectives
Aggregate = Literal["min", "last", "mean", "prod"]
AGGREGATES: tuple[Aggregate, ...] = get_args(Aggregate)
DEFAULT_AGGREGATE: Aggregate = "min"


class NonFinite(ValueError):
    """The model gave a NaN or infinite value for an item."""


@dataclass(frozen=True)
class Answer:
    """What a request's values become in a response."""

    scores: list[float]
    step_scores: list[list[float]] | None = None
    components: dict[str, list[float]] | None = None


class BundleKind(Protocol):
    @property
    def name(self) -> str:
        """outcome or process, as the manifest says."""
        ...

    @property
    def step_token(self) -> str | None:
        """What marks a step's end in text; None for outcome models."""
        ...

    def check(self, items: Sequence[Item], aggregate: Aggregate | None) -> None:
        """Raise InvalidItem / InvalidRequest for what this kind of model cannot score."""
        ...

    def encode(
        self, items: Sequence[Item], *, strict: bool = False, positions: list[int] | None = None
    ) -> list[Encoded]: ...

    def values(self, row: np.ndarray, encoded: Encoded, start: int = 0) -> np.ndarray:
        """An item's values, unchecked, from its row of the engine's output (or PyTorch's); ``start``
        is where the item's tokens begin in the row (left padding)."""
        ...

    def read(self, row: np.ndarray, encoded: Encoded, start: int = 0) -> Value:
        """``values`` as the item's answer; raises NonFinite."""
        ...

    def answer(self, values: Sequence[Value], aggregate: Aggregate | None) -> Answer: ...

    def describe(self) -> dict[str, Any]: ...


def _finite(values: np.ndarray) -> list[float]:
    if not np.isfinite(values).all():
        raise NonFinite("the model returned a non-finite score")
    return [float(v) for v in values]


def read_score(row: np.ndarray, encoded: Encoded, start: int = 0) -> float:
    """An outcome model's score: the row's one value."""
    return _finite(np.asarray(row).reshape(1))[0]


@dataclass(frozen=True)
class ScoreMap:
    """An outcome bundle's ``score_scale * raw + score_shift`` (its format settings): applied where a
    value is read for an answer, so routes, the cache, composites and eval all carry the mapped score;
    ``values`` (what parity compares with PyTorch) stays raw."""

    scale: float = 1.0
    shift: float = 0.0

    def __call__(self, score: float) -> float:
        return score if (self.scale, self.shift) == (1.0, 0.0) else self.scale * score + self.shift


@dataclass(frozen=True)
class OutcomeKind:
    """One reward per item: the graph's score for the row."""

    model: str
    formatter: Formatter
    score_map: ScoreMap = ScoreMap()
    name: str = "outcome"
    step_token: str | None = None

    def check(self, items: Sequence[Item], aggregate: Aggregate | None) -> None:
        for i, item in enumerate(items):
            if isinstance(item, StepsItem):
                raise InvalidItem(
                    i,
                    f"steps are scored by process reward models; model {self.model!r} is an outcome model "
                    "(one reward per item): send prompt and response, messages, or text",
                )
        if aggregate is not None:
            raise InvalidRequest(
                f"step_aggregate: model {self.model!r} is an outcome model (one reward per item); "
                "step_aggregate applies to process reward models"
            )

    def encode(
        self, items: Sequence[Item], *, strict: bool = False, positions: list[int] | None = None
    ) -> list[Encoded]:
        return self.formatter.encode(list(items), strict=strict, positions=positions)

    def values(self, row: np.ndarray, encoded: Encoded, start: int = 0) -> np.ndarray:
        return np.asarray(row).reshape(1)

    def read(self, row: np.ndarray, encoded: Encoded, start: int = 0) -> float:
        return self.score_map(read_score(row, encoded, start))

    def answer(self, values: Sequence[Value], aggregate: Aggregate | None) -> Answer:
        scores = [v for v in values if isinstance(v, float)]
        assert len(scores) == len(values), "an outcome model's values are floats"
        return Answer(scores)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name}


@dataclass(frozen=True)
class ObjectivesKind:
    """An outcome model whose head has several outputs (ArmoRM's gating head): a row of the engine's
    output is the combined score, then one value per objective, in the manifest's order."""

    model: str
    formatter: Formatter
    objectives: tuple[str, ...]
    score_map: ScoreMap = ScoreMap()  # the combined score's; the objectives' values are served raw
    name: str = "outcome"
    step_token: str | None = None

    def check(self, items: Sequence[Item], aggregate: Aggregate | None) -> None:
        OutcomeKind(self.model, self.formatter).check(items, aggregate)

    def encode(
        self, items: Sequence[Item], *, strict: bool = False, positions: list[int] | None = None
    ) -> list[Encoded]:
        return self.formatter.encode(list(items), strict=strict, positions=positions)

    def values(self, row: np.ndarray, encoded: Encoded, start: int = 0) -> np.ndarray:
        return np.asarray(row).reshape(-1)[:1]  # the combined score, as parity compares it

    def read(self, row: np.ndarray, encoded: Encoded, start: int = 0) -> Objectives:
        values = _finite(np.asarray(row).reshape(-1))
        assert len(values) == 1 + len(self.objectives), "the engine returns the score, then each objective"
        return Objectives(self.score_map(values[0]), tuple(values[1:]))

    def answer(self, values: Sequence[Value], aggregate: Aggregate | None) -> Answer:
        rows = [v for v in values if isinstance(v, Objectives)]
        assert len(rows) == len(values), "a head with several outputs gives Objectives values"
        components = {name: [r.components[k] for r in rows] for k, name in enumerate(self.objectives)}
        return Answer([r.score for r in rows], components=components)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "components": list(self.objectives)}


def aggregate_steps(steps: Sequence[float], how: Aggregate) -> float:
    """One reward for a solution from its step rewards."""
    if how == "min":
        return min(steps)
    if how == "last":
        return steps[-1]
    if how == "mean":
        return math.fsum(steps) / len(steps)
    return math.prod(steps)


@dataclass(frozen=True)
class ProcessKind:
    """A reward per step: the graph's values at the item's step-token positions."""

    model: str
    settings: ProcessSettings
    steps: StepEncoder
    name: str = "process"

    @property
    def step_token(self) -> str:
        return self.settings.step_token

    def check(self, items: Sequence[Item], aggregate: Aggregate | None) -> None:
        token = self.settings.step_token
        for i, item in enumerate(items):
            carries = isinstance(item, StepsItem) or (isinstance(item, TextItem) and token in item.text)
            if not carries:
                raise InvalidItem(
                    i,
                    f"model {self.model!r} is a process reward model (a reward per step, marked by the "
                    f"step token {token!r}): send prompt and steps, or text carrying the step token "
                    "after each step",
                )

    def encode(
        self, items: Sequence[Item], *, strict: bool = False, positions: list[int] | None = None
    ) -> list[Encoded]:
        return self.steps.encode(items, strict=strict, positions=positions)

    def values(self, row: np.ndarray, encoded: Encoded, start: int = 0) -> np.ndarray:
        return np.asarray(row)[start + np.asarray(encoded.positions, dtype=np.int64)]

    def read(self, row: np.ndarray, encoded: Encoded, start: int = 0) -> tuple[float, ...]:
        return tuple(_finite(self.values(row, encoded, start)))

    def answer(self, values: Sequence[Value], aggregate: Aggregate | None) -> Answer:
        how = aggregate or DEFAULT_AGGREGATE
        steps = [list(v) for v in values if isinstance(v, tuple)]
        assert len(steps) == len(values), "a process model's values are step tuples"
        return Answer([aggregate_steps(s, how) for s in steps], steps)

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "kind": self.name,
            "step_token": s.step_token,
            "step_rule": s.rule,
            "step_head": s.head,
            "step_layout": s.layout,
            "step_aggregates": list(AGGREGATES),
            "default_step_aggregate": DEFAULT_AGGREGATE,
        }


def kind_of(model: str, bundle: Bundle, formatter: Formatter) -> BundleKind:
    """The kind object for a loaded bundle; ``model`` is the name it is served under."""
    process = bundle.manifest.process
    settings = bundle.manifest.format
    score_map = ScoreMap(settings.score_scale, settings.score_shift)  # a process bundle has none (Manifest)
    if process is None and bundle.manifest.components:
        return ObjectivesKind(model, formatter, bundle.manifest.components, score_map)
    if process is None:
        return OutcomeKind(model, formatter, score_map)
    return ProcessKind(model, process, StepEncoder(formatter, process))
