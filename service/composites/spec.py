"""The composites file (``RMSERVE_COMPOSITES``): what each composite is made of, checked before loading.

A composite is a model name whose score is other models' scores and rules, each normalised and weighted,
then combined (docs/composites.md)::

    composites:
      helpful-safe:
        combine: sum                                   # sum | min | gate
        components:
          - {name: helpful, bundle: default, weight: 1.0, normalize: {kind: affine, scale: 2.0, shift: 1.0}}
          - {name: length, rule: length, tokenizer: default, target: 200, weight: 0.2}

The file is an edge of the server, like a request: its shape is checked by pydantic, and every problem is
named by its place in the file (``composites.helpful-safe.components[1].weight``). What needs the served
names (an unknown bundle, a cycle of composites) is checked by ``check_references``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rmserve.logkeys import normalized_clash, reserved_clash

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalize(_Spec):
    """How a component's raw value becomes the value the combine rule reads."""

    kind: Literal["none", "affine", "zscore"] = "none"
    scale: Finite = 1.0  # affine: scale * x + shift
    shift: Finite = 0.0
    window: int = Field(1000, ge=2, le=1_000_000)  # zscore: the last ``window`` raw values


class Component(_Spec):
    """One part of a composite: a served model (``bundle``, a bundle or another composite) or a ``rule``."""

    name: Name
    bundle: Name | None = None
    rule: Literal["length", "regex", "label_match"] | None = None
    weight: Finite = 1.0
    normalize: Normalize = Normalize()
    on_error: Literal["fail", "skip"] = "fail"
    threshold: Finite | None = None  # combine: gate; a normalised value below it sets the floor
    # rule: length, -slope * |tokens - target| / target, tokens of the response by ``tokenizer``'s bundle
    tokenizer: Name | None = None
    target: int | None = Field(None, ge=1)
    slope: Finite = 1.0
    # rule: regex, 1.0 when the response matches ``pattern`` (``match: false``: when it does not)
    pattern: str | None = None
    match: bool = True
    # rule: label_match, 1.0 when the answer taken from the response equals the item's label
    extract: Literal["boxed", "last_number", "text"] = "text"

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        why = reserved_clash(name, "component name")
        if why is not None:
            raise ValueError(why)
        return name

    @model_validator(mode="after")
    def _one_source(self) -> Component:
        if (self.bundle is None) == (self.rule is None):
            raise ValueError("give exactly one of: bundle (a served model's name), rule")
        if self.rule == "length" and (self.tokenizer is None or self.target is None):
            raise ValueError("rule length needs tokenizer (a served bundle's name) and target (tokens)")
        if self.rule == "regex":
            if self.pattern is None:
                raise ValueError("rule regex needs pattern")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a regular expression: {exc}") from None
        return self


class Composite(_Spec):
    combine: Literal["sum", "min", "gate"] = "sum"
    floor: Finite | None = None  # combine: gate, the reward when a gate component is below its threshold
    components: list[Component] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Composite:
        names = [c.name for c in self.components]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"component names must differ; given twice: {', '.join(twice)}")
        clash = normalized_clash(names)
        if clash is not None:
            raise ValueError(clash)
        gates = [c.name for c in self.components if c.threshold is not None]
        if self.combine == "gate" and (self.floor is None or not gates):
            raise ValueError("combine gate needs floor and at least one component with a threshold")
        if self.combine != "gate" and (self.floor is not None or gates):
            raise ValueError("floor and threshold belong to combine: gate")
        return self


class CompositesFile(_Spec):
    composites: dict[Name, Composite] = Field(min_length=1)


class CompositeError(ValueError):
    """The composites file cannot be served; the message names the composite and component."""


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def read_composites(path: Path) -> dict[str, Composite]:
    """The composites defined in ``path``; CompositeError naming the first problems."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CompositeError(f"RMSERVE_COMPOSITES {path}: cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise CompositeError(f"RMSERVE_COMPOSITES {path}: not valid YAML: {exc}") from None
    try:
        return dict(CompositesFile.model_validate(raw).composites)
    except ValidationError as exc:
        problems = [
            f"{_where(tuple(e['loc']))}: {str(e['msg']).removeprefix('Value error, ')}"
            for e in exc.errors()[:5]
        ]
        raise CompositeError(f"RMSERVE_COMPOSITES {path}: " + "; ".join(problems)) from None


def check_references(composites: dict[str, Composite], bundles: set[str]) -> None:
    """Every name a composite uses is served, no composite reuses a bundle's name, and no composite
    reaches itself through others; CompositeError naming the composite and component otherwise."""
    for name in composites:
        if name in bundles:
            raise CompositeError(f"composite {name!r}: a bundle is served under the same name")
    served = bundles | set(composites)
    for name, composite in composites.items():
        for c in composite.components:
            for field, ref in (("bundle", c.bundle), ("tokenizer", c.tokenizer)):
                allowed = served if field == "bundle" else bundles
                if ref is not None and ref not in allowed:
                    raise CompositeError(
                        f"composite {name!r}, component {c.name!r}: {field} {ref!r} is not served; "
                        f"served bundles: {', '.join(sorted(bundles))}"
                        + (f"; composites: {', '.join(sorted(composites))}" if field == "bundle" else "")
                    )
    for name in composites:
        _no_cycle(name, composites, ())


def _no_cycle(name: str, composites: dict[str, Composite], path: tuple[str, ...]) -> None:
    if name in path:
        loop = " -> ".join((*path[path.index(name) :], name))
        raise CompositeError(f"composite {name!r} contains a cycle: {loop}")
    for c in composites[name].components:
        if c.bundle in composites:
            _no_cycle(c.bundle, composites, (*path, name))
