"""The one mapping from errors to HTTP responses: {"error": {"type", "message"}}, never a trace."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rmserve.errors import RMServeError

log = logging.getLogger("rmserve.api")

# Trainers' clients that hide an error's body (OpenRLHF logs only the status): 4xx reasons are logged.
LOGGED_4XX_ROUTES = frozenset({"/get_reward", "/v1/reward", "/classify", "/v1/classify"})


def _log_client_error(request: Request, status: int, message: str) -> None:
    if 400 <= status < 500 and request.url.path in LOGGED_4XX_ROUTES:
        rid = getattr(request.state, "request_id", "-")
        log.warning("%s answered %d (request %s): %s", request.url.path, status, rid, message)


def error_response(
    status: int,
    type_: str,
    message: str,
    request: Request | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": type_, "message": message}
    rid = getattr(request.state, "request_id", None) if request is not None else None
    if rid:
        body["request_id"] = rid
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _location(loc: tuple[Any, ...]) -> str:
    """("body", "items", 3, "prompt") -> "items[3].prompt"."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # pydantic names union branches (e.g. "str", "list[MessageIn]"); they say nothing here
            if part in ("str", "list[MessageIn]", "function-after[_one_shape(), ScoreItemIn]"):
                continue
            out += ("." if out else "") + str(part)
    return out or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RMServeError)
    async def _rmserve(request: Request, exc: RMServeError) -> JSONResponse:
        if exc.status >= 500:
            log.error("request %s failed: %s", getattr(request.state, "request_id", "-"), exc.message)
        _log_client_error(request, exc.status, exc.message)
        return error_response(exc.status, exc.type, exc.message, request, exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:10]:
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append(f"{_location(tuple(err.get('loc', ())))}: {msg}")
        _log_client_error(request, 422, "; ".join(problems))
        return error_response(422, "invalid_request", "; ".join(problems), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        types = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        return error_response(
            exc.status_code, types.get(exc.status_code, "http_error"), str(exc.detail), request
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", "-")
        log.exception("unexpected error in request %s", rid)
        return error_response(500, "internal_error", f"internal error (request id {rid})", request)
