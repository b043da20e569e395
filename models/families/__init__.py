"""The model-family registry: every reward-model family rmserve exports, and the ones it refuses.

Each module listed in ``FAMILY_MODULES`` registers its entries with ``register`` when imported; adding
a module is one line there. ``identify`` picks a checkpoint's family from config.json alone.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from rmserve.models.families.base import (
    Conversation,
    ModelFamily,
    Recipe,
    Recognition,
    Reference,
    ReferenceSettings,
    ReferenceUsage,
)

__all__ = [
    "Conversation",
    "FamilyError",
    "ModelFamily",
    "Recipe",
    "Recognition",
    "Reference",
    "ReferenceSettings",
    "ReferenceUsage",
    "families",
    "identify",
    "register",
]

# The modules holding entries, in the order they are tried; one line each.
FAMILY_MODULES = (
    "rmserve.models.families.stock",
    "rmserve.models.families.gemma3",
    "rmserve.models.families.heads",
)

_REGISTRY: dict[str, ModelFamily] = {}


class FamilyError(ValueError):
    """The checkpoint belongs to no registered family, or to one rmserve refuses."""


def register(*entries: ModelFamily) -> None:
    """Add families to the registry (a module calls this once, at import)."""
    for entry in entries:
        if entry.name in _REGISTRY and _REGISTRY[entry.name] != entry:
            raise ValueError(f"model family {entry.name!r} is registered twice")
        _REGISTRY[entry.name] = entry


def families() -> tuple[ModelFamily, ...]:
    """Every registered family, in registration order."""
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    return tuple(_REGISTRY.values())


def read_config(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "config.json"
    if not path.is_file():
        raise FamilyError(f"{checkpoint} has no config.json: it is not a Hugging Face checkpoint")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise FamilyError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise FamilyError(f"{path} does not hold a JSON object")
    return config


def checkpoint_names(checkpoint: Path, config: dict[str, Any]) -> list[str]:
    """What a checkpoint is called: its recorded hub name and the directories of its path (a hub
    snapshot's path holds ``models--Org--Name``)."""
    names = [part.replace("--", "/") for part in checkpoint.resolve().parts]
    recorded = config.get("_name_or_path")
    return names + ([recorded] if isinstance(recorded, str) and recorded else [])


def identify(checkpoint: str | Path, requested: str | None = None) -> ModelFamily:
    """The family of ``checkpoint``, from config.json alone: ``requested`` (``--family``) when its
    recognition holds, else the one fitting entry of the most specific tier: those whose names match,
    then those that require config keys, then the generic ones. Raises FamilyError naming the reason
    otherwise, or the refused family and what rmserve cannot reproduce of it."""
    path = Path(checkpoint)
    config = read_config(path)
    registry = {f.name: f for f in families()}
    if requested is not None:
        chosen = registry.get(requested)
        if chosen is None:
            raise FamilyError(f"no model family {requested!r}; the families are {', '.join(registry)}")
        why = chosen.recognition.mismatch(config)
        if why is not None:
            raise FamilyError(f"{path} is not a {chosen.title} checkpoint: {why}")
        return _usable(chosen)
    fitting = [f for f in registry.values() if f.recognition.mismatch(config) is None]
    names = checkpoint_names(path, config)
    named = [f for f in fitting if f.recognition.names and f.recognition.named(names)]
    unnamed = [f for f in fitting if not f.recognition.names]
    keyed = [f for f in unnamed if f.recognition.config_keys]
    generic = [f for f in unnamed if not f.recognition.config_keys]
    for candidates in (named, keyed, generic):
        if len(candidates) == 1:
            return _usable(candidates[0])
        if len(candidates) > 1:
            listed = ", ".join(f.name for f in candidates)
            raise FamilyError(f"{path} fits several model families ({listed}); choose one with --family")
    archs = config.get("architectures") or ["(none)"]
    raise FamilyError(
        f"{path} is no model family rmserve exports: architectures {archs[0]!r}, model_type "
        f"{config.get('model_type')!r}{', remote classes in auto_map' if config.get('auto_map') else ''}. "
        "docs/models.md lists the families; rmserve does not guess a head it does not know"
    )


def _usable(family: ModelFamily) -> ModelFamily:
    if family.status == "refused":
        raise FamilyError(f"{family.title} is not supported: {family.refusal}")
    return family
