"""A composite served: one request, every component at once, then normalised, weighted and combined.

A bundle component is scored through the scorer by its name, so it goes through that bundle's own
cache, single-flight and batcher (a composite component through its own components); the components of
one request run concurrently. Rules run beside them. Once every component has answered, each one's raw
values are normalised (``rmserve.composites.normalise``) and combined:

- ``sum``: the sum over components of ``weight * normalised value``;
- ``min``: the least ``weight * normalised value``;
- ``gate``: the ``sum``, or ``floor`` when a component with a ``threshold`` has its normalised value below it.

A component that fails fails the request with an error naming the composite and the component (the
status of the failure it met: a full queue stays a 429, a passed deadline a 504). With ``on_error: skip``
it is left out instead: the others are combined and the response says which were skipped. A request whose
components all failed fails. Nothing is pushed into a running window by a request that fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer

from rmserve.composites.normalise import Windows, normalised
from rmserve.composites.rules import label_values, length_values, regex_values
from rmserve.composites.spec import Component, Composite, CompositeError
from rmserve.errors import ComponentFailed, InvalidItem, InvalidRequest, RMServeError
from rmserve.formatting import Formatter
from rmserve.items import Item, StepsItem
from rmserve.kinds import BundleKind
from rmserve.scoring import ModelRuntime, Scorer
from rmserve.served import Ask, ScoreResult, Served

log = logging.getLogger("rmserve.composites")


@dataclass(frozen=True)
class _Raw:
    values: list[float]
    result: ScoreResult | None = None  # a model component's answer (its tokens, cache hits)


@dataclass
class CompositeRuntime:
    """A composite by name, scoring items as any served model does (``rmserve.scoring.Served``)."""

    name: str
    spec: Composite
    parts: dict[str, Served]  # component name -> the served model it names (bundle components)
    tokenizers: dict[str, Tokenizer]  # component name -> the tokenizer a length rule counts with
    reader: ModelRuntime  # the bundle whose format reads trainer-shaped input (its first bundle)
    windows: Windows
    version: str = field(init=False)

    def __post_init__(self) -> None:
        parts = {n: p.version for n, p in self.parts.items()}
        text = json.dumps([self.spec.model_dump(mode="json"), parts], sort_keys=True)
        self.version = hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def components(self) -> list[str]:
        return [c.name for c in self.spec.components]

    @property
    def formatter(self) -> Formatter:
        return self.reader.formatter

    @property
    def kind(self) -> BundleKind:
        return self.reader.kind

    @property
    def max_queue_items(self) -> int:
        return min((p.max_queue_items for p in self.parts.values()), default=self.reader.max_queue_items)

    def check_timeout(self, timeout_s: float) -> None:
        for part in self.parts.values():
            part.check_timeout(timeout_s)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "kind": "composite",
            "combine": self.spec.combine,
            **({"floor": self.spec.floor} if self.spec.floor is not None else {}),
            "components": [c.model_dump(mode="json", exclude_defaults=True) for c in self.spec.components],
            "normalize_state": self.windows.backend,
            "reads_input_as": self.reader.name,
        }

    async def score(self, scorer: Scorer, items: list[Item], ask: Ask) -> ScoreResult:
        if ask.aggregate is not None:
            raise InvalidRequest(
                f"step_aggregate: model {self.name!r} is a composite; it takes no step_aggregate"
            )
        for i, item in enumerate(items):
            if isinstance(item, StepsItem):
                raise InvalidItem(
                    i, f"steps are scored by process reward models; {self.name!r} is a composite"
                )

        async def run(c: Component) -> _Raw:
            part = self.parts.get(c.name)
            if part is not None:  # through the served model's own score: its cache and batcher
                result = await part.score(scorer, items, ask)
                return _Raw(result.scores, result)
            if c.rule == "length":
                assert c.target is not None
                tok = self.tokenizers[c.name]
                return _Raw(await asyncio.to_thread(length_values, items, tok, c.target, c.slope))
            if c.rule == "regex":
                assert c.pattern is not None
                return _Raw(regex_values(items, c.pattern, c.match))
            return _Raw(label_values(items, ask.labels, c.extract))

        outcomes = await asyncio.gather(*(run(c) for c in self.spec.components), return_exceptions=True)
        raws: dict[str, _Raw] = {}
        skipped: list[str] = []
        for c, outcome in zip(self.spec.components, outcomes, strict=True):
            if isinstance(outcome, _Raw):
                raws[c.name] = outcome
            elif isinstance(outcome, asyncio.CancelledError):
                raise outcome
            elif c.on_error == "skip" and isinstance(outcome, Exception):
                skipped.append(c.name)
            else:
                raise _failed(self.name, c.name, outcome)
        if not raws:
            raise ComponentFailed(self.name, skipped[0], outcomes[0])  # type: ignore[arg-type]
        norms: dict[str, list[float]] = {}
        for c in self.spec.components:
            if c.name in raws:
                try:
                    norms[c.name] = await normalised(
                        c.normalize, f"{self.name}/{c.name}", raws[c.name].values, self.windows
                    )
                except Exception as exc:
                    raise _failed(self.name, c.name, exc) from exc
        return self._result(items, raws, norms, skipped)

    def combine(self, norms: dict[str, list[float]], n: int) -> list[float]:
        used = [c for c in self.spec.components if c.name in norms]
        out = []
        for i in range(n):
            weighted = [c.weight * norms[c.name][i] for c in used]
            if self.spec.combine == "min":
                out.append(min(weighted))
                continue
            total = sum(weighted)
            gated = any(c.threshold is not None and norms[c.name][i] < c.threshold for c in used)
            out.append(self.spec.floor if gated and self.spec.floor is not None else total)
        return out

    def _result(
        self, items: list[Item], raws: dict[str, _Raw], norms: dict[str, list[float]], skipped: list[str]
    ) -> ScoreResult:
        n = len(items)
        answers = [r.result for r in raws.values() if r.result is not None]
        info = answers[0] if answers else None
        engine = self.reader.engine.info
        return ScoreResult(
            model=self.name,
            version=self.version,
            backend=info.backend if info else engine.provider,
            precision=info.precision if info else engine.precision,
            scores=self.combine(norms, n),
            item_tokens=[sum(a.item_tokens[i] for a in answers) for i in range(n)],
            item_truncated=[any(a.item_truncated[i] for a in answers) for i in range(n)],
            cache_hits=sum(a.cache_hits for a in answers),
            components={name: raw.values for name, raw in raws.items()},
            normalized=norms,
            skipped=tuple(skipped),
        )


def _failed(composite: str, component: str, error: BaseException) -> ComponentFailed:
    """The request's error for a component's failure; one that is not the service's own is logged with
    its trace (the caller sees only its type)."""
    if not isinstance(error, RMServeError):
        log.error("composite %s, component %s failed", composite, component, exc_info=error)
    failed = ComponentFailed(composite, component, error)
    failed.__cause__ = error
    return failed


def build_composites(
    specs: dict[str, Composite], models: dict[str, ModelRuntime], windows: Windows
) -> dict[str, CompositeRuntime]:
    """Every composite, the ones it names built first; CompositeError for a component that is not an
    outcome bundle. ``specs`` passed ``check_references`` (served names, no cycles)."""
    built: dict[str, CompositeRuntime] = {}

    def build(name: str) -> CompositeRuntime:
        if name in built:
            return built[name]
        spec = specs[name]
        parts: dict[str, Served] = {}
        tokenizers: dict[str, Tokenizer] = {}
        for c in spec.components:
            if c.bundle in specs:
                parts[c.name] = build(c.bundle)
            elif c.bundle is not None:
                rt = models[c.bundle]
                if rt.kind.name != "outcome":
                    raise CompositeError(
                        f"composite {name!r}, component {c.name!r}: bundle {c.bundle!r} is a {rt.kind.name} "
                        "model; a composite combines one score per item (outcome models)"
                    )
                parts[c.name] = rt
            if c.tokenizer is not None:
                tokenizers[c.name] = models[c.tokenizer].formatter.tokenizer
        built[name] = CompositeRuntime(name, spec, parts, tokenizers, _reader(spec, parts, models), windows)
        return built[name]

    for name in specs:
        build(name)
    return built


def _reader(spec: Composite, parts: dict[str, Served], models: dict[str, ModelRuntime]) -> ModelRuntime:
    for c in spec.components:
        part = parts.get(c.name)
        if isinstance(part, ModelRuntime):
            return part
        if isinstance(part, CompositeRuntime):
            return part.reader
    tokenizer = next((c.tokenizer for c in spec.components if c.tokenizer), None)
    return models[tokenizer] if tokenizer is not None else next(iter(models.values()))
