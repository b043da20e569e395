"""Start-up: what can be checked before the server listens, then each bundle loaded into a
ModelRuntime (verify, pick the engine, warm up at the largest shape)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rmserve.auth import KeyStore
from rmserve.batching import Batcher, BatchPolicy
from rmserve.bundle import Bundle, default_bundle_path, load_bundle, peek_bundle
from rmserve.cache.keys import namespace
from rmserve.composites.normalise import MemoryWindows, RedisWindows, Windows
from rmserve.composites.spec import Composite, check_references, read_composites
from rmserve.config import Settings
from rmserve.engines.base import Engine
from rmserve.engines.reuse import with_prefix_reuse
from rmserve.engines.select import call_overhead_tokens, create_engine, default_batch_tokens
from rmserve.formatting import Formatter
from rmserve.kinds import kind_of
from rmserve.metrics import Metrics
from rmserve.scoring import ModelRuntime

# How long one update of a running normaliser's window in Redis may take; slower fails the component
# (a composite's reward is never computed against a window it could not read).
_WINDOW_TIMEOUT_S = 1.0

EngineFactory = Callable[[Bundle, Settings], tuple[Engine, dict[str, Any]]]


def preflight(settings: Settings, keys: KeyStore) -> tuple[dict[str, Path], dict[str, Composite]]:
    """The bundles to load, by name, and the composites to build, once the checks that cost nothing
    pass: API keys configured are usable, every model path is a bundle directory with a readable
    manifest, the composites file is valid and names only served models, without cycles, and the
    default model is served. Raises an error naming the first problem (ValueError, BundleError,
    OSError), so a server that cannot start says why before it listens."""
    keys.check()
    paths = settings.model_paths(default_bundle_path())
    for path in paths.values():
        peek_bundle(path)
    composites = read_composites(settings.composites) if settings.composites is not None else {}
    check_references(composites, set(paths))
    default = settings.default_model
    if default is not None and default not in paths and default not in composites:
        served = ", ".join(sorted([*paths, *composites]))
        raise ValueError(f"RMSERVE_DEFAULT_MODEL {default!r} is not served; served: {served}")
    return paths, composites


def make_windows(settings: Settings) -> Windows:
    """Where running normalisers keep their windows: Redis when a URL is set (shared by replicas)."""
    if settings.redis_url is None:
        return MemoryWindows()
    from rmserve.cache.redis import connect  # redis is only imported when asked for

    client = connect(settings.redis_url.get_secret_value(), _WINDOW_TIMEOUT_S)
    return RedisWindows(client, settings.cache_prefix, settings.cache_ttl_s)


def _pinned(selection: dict[str, Any]) -> dict[str, Any]:
    return {k: selection[k] for k in ("provider", "precision") if k in selection}


async def load_runtime(
    name: str, path: Path, settings: Settings, metrics: Metrics, engine_factory: EngineFactory = create_engine
) -> ModelRuntime:
    bundle = await asyncio.to_thread(load_bundle, path)
    formatter = await asyncio.to_thread(Formatter, bundle)
    kind = kind_of(name, bundle, formatter)
    engine, selection = await asyncio.to_thread(engine_factory, bundle, settings)
    count = metrics.prefix_events(name)
    engine, reuse = await asyncio.to_thread(with_prefix_reuse, engine, bundle, settings, count)
    fmt = bundle.manifest.format
    budget = settings.max_batch_tokens or default_batch_tokens(engine.info.provider)
    policy = BatchPolicy(
        max_batch_tokens=max(budget, fmt.max_length),  # one item of max_length always fits
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue_items=settings.max_queue_items,
        call_overhead_tokens=call_overhead_tokens(engine.info.provider),
    )
    batcher = Batcher(
        name,
        engine,
        policy,
        pad_id=fmt.pad_token_id,
        with_type_ids="token_type_ids" in bundle.manifest.inputs,
        metrics=metrics,
        # A rebuilt engine is the one chosen now, not a new measurement.
        rebuild=lambda: with_prefix_reuse(
            engine_factory(bundle, settings.model_copy(update=_pinned(selection)))[0], bundle, settings, count
        )[0],
        read=kind.read,
    )
    await batcher.warmup(fmt.max_length)
    batcher.start()
    info = engine.info
    metrics.model_info.labels(
        model=name, version=bundle.manifest.version, provider=info.provider, precision=info.precision
    ).set(1)
    return ModelRuntime(
        name=name,
        bundle=bundle,
        formatter=formatter,
        kind=kind,
        batcher=batcher,
        namespace=namespace(bundle.manifest, info.provider, info.precision),
        selection=selection,
        prefix_reuse=reuse,
    )
