"""The engine backends, one record each, found in the files of this package.

Every engine file declares ``BACKENDS``: a tuple of ``Backend`` records saying what the backend is
called, whether it is present on this machine, which precisions it runs there, how to build it, and
the batching numbers it wants. Selection (``rmserve.engines.select``) and the settings' provider
check read the records; adding a backend is adding one file.
"""

from __future__ import annotations

import functools
import importlib
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rmserve.engines.base import Engine

log = logging.getLogger("rmserve.engines")

# Files of this package that hold no backend.
_NOT_BACKENDS = frozenset({"base", "batches", "gate", "registry", "select"})


@dataclass(frozen=True)
class Backend:
    name: str  # RMSERVE_PROVIDER's value
    device: Literal["cpu", "gpu"]
    present: Callable[[], bool]
    # Precisions it runs for an fp32 bundle on this machine, exact first. A GPU backend runs the
    # bundle's own precision (fp32, fp16 or bf16 bundles) instead.
    precisions: Callable[[], tuple[str, ...]]
    # (model file, precision, threads, streams, outputs returned beside the score: Manifest.extra_outputs)
    build: Callable[[Path, str, int, int, tuple[str, ...]], Engine]
    batch_tokens: int  # padded tokens per forward pass, by default
    call_overhead_tokens: int  # the fixed price of one forward pass, in padded tokens
    auto_rank: int  # auto prefers the present backend of lowest rank on its device
    missing: str  # what to install when it is asked for and absent


@functools.cache
def backends() -> dict[str, Backend]:
    """name -> record, for every backend declared by a file of this package, in ``auto_rank`` order."""
    import rmserve.engines as package

    found: list[Backend] = []
    for module in pkgutil.iter_modules(package.__path__):
        if module.name in _NOT_BACKENDS:
            continue
        try:
            mod = importlib.import_module(f"{package.__name__}.{module.name}")
        except ImportError as exc:  # its runtime is not installed: the backend is absent
            log.debug("engine module %s not loaded: %s", module.name, exc)
            continue
        found.extend(getattr(mod, "BACKENDS", ()))
    return {b.name: b for b in sorted(found, key=lambda b: (b.auto_rank, b.name))}


def backend(name: str) -> Backend:
    known = backends()
    if name not in known:
        raise ValueError(f"unknown provider {name!r}; known: auto, {', '.join(known)}")
    return known[name]
