"""Scoring routes: /v1/score and OpenRLHF's /get_reward. Thin: parse, call the scorer, answer."""

from __future__ import annotations

import logging
import math
import time

from fastapi import APIRouter, Header, Request, Response

from rmserve.api.schemas import (
    RewardRequest,
    RewardResponse,
    ScoreRequest,
    ScoreResponse,
    Usage,
    error_responses,
    to_items,
)
from rmserve.errors import BadRequest, InvalidRequest, TooLarge
from rmserve.items import Item
from rmserve.openrlhf import query_items
from rmserve.scoring import Scorer, ScoreResult
from rmserve.state import AppState

router = APIRouter()

# Every score response names the engine that produced it (SPEC: a documented field or header).
_ENGINE_HEADERS = {
    200: {
        "description": "scores, in order",
        "headers": {
            "X-Backend": {
                "description": "the backend that scored: cpu, openvino, cuda",
                "schema": {"type": "string"},
            },
            "X-Precision": {"description": "its precision: fp32, bf16, fp16", "schema": {"type": "string"}},
        },
    }
}
body_log = logging.getLogger("rmserve.bodies")


def _log_body(state: AppState, request: Request, body: ScoreRequest | RewardRequest) -> None:
    # Texts being scored may be private: logged only when RMSERVE_LOG_BODIES is switched on.
    if state.settings.log_bodies:
        body_log.info(
            "request body",
            extra={
                "request_id": getattr(request.state, "request_id", None),
                "body": body.model_dump(mode="json"),
            },
        )


def _deadline(state: AppState, request: Request, header: float | None, field: float | None) -> float:
    """The monotonic time by which the request's items must be in a forward pass, counted from its
    arrival at the edge (reading and validating the body is part of the time it asked for)."""
    if header is not None and not (math.isfinite(header) and header > 0):
        raise InvalidRequest(
            f"X-Request-Timeout: {header} is not a deadline; give a number of seconds above 0"
        )
    limit = state.settings.request_timeout_s
    asked = [t for t in (header, field) if t is not None]
    arrived = getattr(request.state, "arrived", None)
    return (arrived if arrived is not None else time.monotonic()) + min([limit, *asked])


def _check_count(state: AppState, n: int) -> None:
    if n > state.settings.max_items_per_request:
        raise TooLarge(f"{n} items is over the limit of {state.settings.max_items_per_request} per request")


async def _score(
    scorer: Scorer,
    request: Request,
    response: Response,
    model: str | None,
    items: list[Item],
    *,
    strict: bool,
    deadline: float,
) -> ScoreResult:
    request.state.items = len(items)  # for the access log
    result = await scorer.score(model, items, strict=strict, deadline=deadline)
    request.state.cache_hits = result.cache_hits
    # Which engine produced these scores, so a change of backend or precision is visible to callers.
    response.headers["X-Backend"] = result.backend
    response.headers["X-Precision"] = result.precision
    return result


@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    responses={**_ENGINE_HEADERS, **error_responses(400, 401, 404, 408, 413, 422, 429, 500, 503, 504)},
    summary="Score (prompt, response) items with a reward model",
)
async def score(
    body: ScoreRequest,
    request: Request,
    response: Response,
    x_request_timeout: float | None = Header(None, description="deadline in seconds"),
) -> ScoreResponse:
    state: AppState = request.app.state.rmserve
    scorer = state.ready_scorer()
    _log_body(state, request, body)
    _check_count(state, len(body.items))
    items = to_items(body.items, state.settings.max_chars_per_item)
    deadline = _deadline(state, request, x_request_timeout, body.timeout_s)
    result = await _score(
        scorer, request, response, body.model, items, strict=body.truncation == "error", deadline=deadline
    )
    return ScoreResponse(
        model=result.model,
        model_version=result.version,
        scores=result.scores,
        usage=Usage(
            items=len(items), tokens=result.tokens, cache_hits=result.cache_hits, truncated=result.truncated
        ),
    )


@router.post(
    "/get_reward",
    response_model=RewardResponse,
    responses={**_ENGINE_HEADERS, **error_responses(400, 401, 408, 413, 422, 429, 500, 503, 504)},
    summary="OpenRLHF remote reward model protocol",
)
async def get_reward(
    body: RewardRequest,
    request: Request,
    response: Response,
    x_request_timeout: float | None = Header(None, description="deadline in seconds"),
) -> RewardResponse:
    state: AppState = request.app.state.rmserve
    scorer = state.ready_scorer()
    _log_body(state, request, body)
    n = len(body.query)
    for name, values in (("prompts", body.prompts), ("labels", body.labels)):
        if values is not None and len(values) != n:
            raise BadRequest(f"{name} has {len(values)} entries but query has {n}")
    if n == 0:
        return RewardResponse(rewards=[], scores=[], extra_logs={})
    _check_count(state, n)
    rt = scorer.runtime(None)
    fmt = rt.bundle.manifest.format
    limit = state.settings.max_chars_per_item
    items = query_items(body.query, body.prompts, fmt, limit, rt.formatter.pad_token)
    deadline = _deadline(state, request, x_request_timeout, None)
    result = await _score(scorer, request, response, None, items, strict=False, deadline=deadline)
    return RewardResponse(
        rewards=result.scores,
        scores=result.scores,
        extra_logs={
            "rm_tokens": [float(t) for t in result.item_tokens],
            "rm_truncated": [float(t) for t in result.item_truncated],
        },
    )
