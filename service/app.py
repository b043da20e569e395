"""create_app(settings): wires config, models, cache, batching and routes. Nothing at import time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from rmserve.api import ops, score, trainers
from rmserve.api.errors import install_error_handlers
from rmserve.api.middleware import EdgeLimits, EdgeMiddleware
from rmserve.auth import KeyStore
from rmserve.cache.factory import make_cache
from rmserve.composites.normalise import Windows
from rmserve.composites.runtime import build_composites
from rmserve.config import Settings
from rmserve.engines.base import available_cpus
from rmserve.engines.select import create_engine
from rmserve.loading import EngineFactory, load_runtime, make_windows, preflight
from rmserve.metrics import Metrics
from rmserve.scoring import ModelRuntime, Scorer
from rmserve.state import AppState

log = logging.getLogger("rmserve")


def create_app(
    settings: Settings | None = None,
    *,
    engine_factory: EngineFactory = create_engine,
    on_fatal: Callable[[str], None] | None = None,
    keys: KeyStore | None = None,
) -> FastAPI:
    """The app. ``on_fatal`` is told when start-up fails (``rmserve serve`` then exits non-zero);
    ``keys``: the API keys, read from the settings unless given."""
    settings = settings or Settings()
    metrics = Metrics()
    state = AppState(settings=settings, metrics=metrics)
    pool = ThreadPoolExecutor(max_workers=max(2, available_cpus()), thread_name_prefix="tokenize")
    keys = keys or KeyStore.from_settings(settings)
    windows: list[Windows] = []  # the running normalisers' store, once composites are built

    async def start() -> None:
        try:
            models: dict[str, ModelRuntime] = {}
            paths, specs = preflight(settings, keys)
            for name, path in paths.items():
                models[name] = await load_runtime(name, path, settings, metrics, engine_factory)
                log.info(
                    "loaded model %s version %s from %s; %s",
                    name,
                    models[name].version,
                    path,
                    _prefix_reuse_words(models[name].prefix_reuse),
                )
            if specs:
                windows.append(make_windows(settings))
            composites = build_composites(specs, models, windows[0]) if specs else {}
            for name, composite in composites.items():
                log.info(
                    "composite %s version %s: %s", name, composite.version, ", ".join(composite.components)
                )
            state.scorer = Scorer(
                models,
                cache=make_cache(settings, metrics),
                metrics=metrics,
                tokenize_pool=pool,
                max_tokens_per_request=settings.max_tokens_per_request,
                composites=composites,
                default_model=settings.default_model,
            )
            state.phase = "ready"
            metrics.ready.set(1)
            log.info("ready: %s", ", ".join([*models, *composites]))
        except Exception as exc:
            state.phase = "failed"
            state.failure = str(exc)
            log.error("start-up failed: %s", exc)
            if on_fatal is not None:
                on_fatal(str(exc))
            raise

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(start(), name="rmserve-start")
        app.state.loader = loader
        try:
            yield
        finally:
            state.begin_drain()
            if not loader.done():
                loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            if state.scorer is not None:
                for rt in state.scorer.models.values():
                    await rt.batcher.stop()  # finishes accepted work, then closes the engine
                if state.scorer.cache is not None:
                    await state.scorer.cache.close()
            for held in windows:
                await held.close()
            pool.shutdown(wait=False)

    app = FastAPI(
        title="rmserve",
        version="0.1.0",
        summary="Reward models as a service: batched scoring of (prompt, response) pairs",
        lifespan=lifespan,
    )
    app.state.rmserve = state
    install_error_handlers(app)
    app.include_router(score.router)
    app.include_router(trainers.router)
    app.include_router(ops.router)
    app.add_middleware(
        EdgeMiddleware,
        metrics=metrics,
        keys=keys,
        limits=EdgeLimits(
            max_body_bytes=settings.max_body_bytes,
            body_timeout_s=settings.body_timeout_s,
            max_inflight_body_bytes=settings.max_inflight_body_bytes,
        ),
        log_probes=settings.log_probes,
    )
    return app


def _prefix_reuse_words(about: dict[str, Any]) -> str:
    """A model's ``prefix_reuse`` (as ``/v1/models`` shows it) in the words of its start-up log line."""
    if about.get("enabled"):
        return f"prefix reuse on ({about['cache_bytes'] >> 20} MiB cache, entries kept {about['ttl_s']} s)"
    return f"prefix reuse off: {about.get('reason')}"
