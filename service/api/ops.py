"""Operations routes: health (live vs ready), metrics, effective config, loaded models."""

from __future__ import annotations

import platform
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from rmserve.api.schemas import error_responses
from rmserve.state import AppState

router = APIRouter()


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.rmserve
    return state


@router.get("/health/live", summary="The process is up and its event loop answers")
async def live() -> dict[str, str]:
    return {"status": "live"}


@router.get(
    "/health/ready",
    summary="Every bundle is loaded and warm, and the server is not draining",
    responses={503: {"description": "starting, draining, failed, or a model worker is down"}},
)
async def ready(request: Request) -> JSONResponse:
    state = _state(request)
    body: dict[str, Any] = {"status": "ready" if state.is_ready() else state.phase}
    if state.scorer is not None:
        body["models"] = {
            n: ("ok" if rt.batcher.healthy else "restarting") for n, rt in state.scorer.models.items()
        }
    if state.failure:
        body["failure"] = state.failure
    return JSONResponse(
        body,
        status_code=200 if state.is_ready() else 503,
        headers=None if state.is_ready() else {"Retry-After": "1"},
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/v1/models",
    summary="Served models in OpenAI's model-list shape: bundles with their manifests, composites with "
    "their components",
    responses=error_responses(401, 503),
)
async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    scorer = state.ready_scorer()
    created = int(state.started)
    data = [
        {"id": rt.name, "object": "model", "created": created, "owned_by": "rmserve", **rt.describe()}
        for rt in scorer.served().values()
    ]
    return {"object": "list", "data": data}


@router.get("/info", summary="Effective configuration (secrets redacted)", responses=error_responses(401))
async def info(request: Request) -> dict[str, Any]:
    state = _state(request)
    out: dict[str, Any] = {
        "name": "rmserve",
        "phase": state.phase,
        "uptime_s": round(time.time() - state.started, 3),
        "python": platform.python_version(),
        "settings": state.settings.public(),
    }
    if state.scorer is not None:
        out["cache"] = state.scorer.cache.state() if state.scorer.cache is not None else {"backend": "off"}
        out["models"] = {n: rt.describe() for n, rt in state.scorer.served().items()}
    return out
