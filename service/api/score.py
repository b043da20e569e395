"""The scoring route /v1/score, and the steps every scoring route shares. Thin: parse, score, answer."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BaseModel

from rmserve.api.schemas import (
    MIN_TIMEOUT_S,
    ScoreRequest,
    ScoreResponse,
    Usage,
    dropped_parts,
    error_responses,
    labels_of,
    timeout_problem,
    to_items,
)
from rmserve.errors import InvalidRequest, TooLarge
from rmserve.items import Item
from rmserve.kinds import Aggregate
from rmserve.scoring import Scorer
from rmserve.served import ScoreResult, Served
from rmserve.state import AppState

router = APIRouter()
body_log = logging.getLogger("rmserve.bodies")

# Every score response names the engine that produced it, so a change of backend or precision is visible.
ENGINE_HEADERS: dict[int | str, dict[str, Any]] = {
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


def _deadline_header(
    x_request_timeout: Annotated[
        float | None,
        Header(
            description=f"deadline in seconds, counted from arrival (at least {MIN_TIMEOUT_S})",
            json_schema_extra={"minimum": MIN_TIMEOUT_S},
        ),
    ] = None,
) -> float | None:
    problem = None if x_request_timeout is None else timeout_problem(x_request_timeout)
    if problem is not None:
        raise InvalidRequest(f"X-Request-Timeout: {problem}")
    return x_request_timeout


# Every scoring route takes a deadline header, checked with the request (a value below the floor is a
# 422 before any model is looked up or any work is done).
DeadlineHeader = Annotated[float | None, Depends(_deadline_header)]


def log_body(state: AppState, request: Request, body: BaseModel) -> None:
    # Texts being scored may be private: logged only when RMSERVE_LOG_BODIES is switched on.
    if state.settings.log_bodies:
        body_log.info(
            "request body",
            extra={
                "request_id": getattr(request.state, "request_id", None),
                "body": body.model_dump(mode="json"),
            },
        )


def deadline_of(
    state: AppState,
    request: Request,
    rt: Served,
    header: float | None,
    field: float | None,
    limit: float | None = None,
) -> float:
    """The monotonic time by which the request must be answered, counted from its arrival at the
    edge (reading and validating the body is part of the time it asked for). ``limit`` is the
    route's default deadline (the server's request_timeout_s unless given). A deadline under the
    floor (``DeadlineHeader``, ``timeout_s``'s schema), or shorter than ``rt``'s fastest forward pass,
    is a 422 before any work."""
    limit = limit if limit is not None else state.settings.request_timeout_s
    timeout_s = min([limit, *(t for t in (header, field) if t is not None)])
    rt.check_timeout(timeout_s)
    arrived = getattr(request.state, "arrived", None)
    return (arrived if arrived is not None else time.monotonic()) + timeout_s


def check_count(state: AppState, n: int) -> None:
    if n > state.settings.max_items_per_request:
        raise TooLarge(f"{n} items is over the limit of {state.settings.max_items_per_request} per request")


def name_engine(response: Response, result: ScoreResult) -> None:
    """The backend and precision that produced ``result``'s scores, as response headers."""
    response.headers["X-Backend"] = result.backend
    response.headers["X-Precision"] = result.precision


async def run_score(
    scorer: Scorer,
    request: Request,
    response: Response,
    model: str | None,
    items: list[Item],
    *,
    strict: bool,
    deadline: float,
    aggregate: Aggregate | None = None,
    labels: list[Any] | None = None,
) -> ScoreResult:
    request.state.items = len(items)  # for the access log
    result = await scorer.score(
        model, items, strict=strict, deadline=deadline, aggregate=aggregate, labels=labels
    )
    request.state.cache_hits = result.cache_hits
    name_engine(response, result)
    return result


@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    response_model_exclude_none=True,  # step_scores and steps_dropped: process models only
    responses={**ENGINE_HEADERS, **error_responses(400, 401, 404, 408, 413, 422, 429, 500, 503, 504)},
    summary="Score (prompt, response) items with a reward model",
)
async def score(
    body: ScoreRequest,
    request: Request,
    response: Response,
    x_request_timeout: DeadlineHeader = None,
) -> ScoreResponse:
    state: AppState = request.app.state.rmserve
    scorer = state.ready_scorer()
    log_body(state, request, body)
    deadline = deadline_of(state, request, scorer.runtime(body.model), x_request_timeout, body.timeout_s)
    check_count(state, len(body.items))
    items = to_items(body.items, state.settings.max_chars_per_item)
    dropped = dropped_parts(body.items, refuse=body.non_text_parts == "error")
    result = await run_score(
        scorer,
        request,
        response,
        body.model,
        items,
        strict=body.truncation == "error",
        deadline=deadline,
        aggregate=body.step_aggregate,
        labels=labels_of(body.items),
    )
    return ScoreResponse(
        model=result.model,
        model_version=result.version,
        scores=result.scores,
        step_scores=result.step_scores,
        components=result.components,
        normalized=result.normalized,
        usage=Usage(
            items=len(items),
            tokens=result.tokens,
            cache_hits=result.cache_hits,
            truncated=result.truncated,
            dropped_parts=dropped,
            steps_dropped=result.steps_dropped,
            skipped=list(result.skipped) or None,
        ),
    )
