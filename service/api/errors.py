"""The one place errors become HTTP responses: {"error": {"type", "message", "request_id"}}, never a
trace. Route errors come through the exception handlers below; errors found at the edge (keys, body
limits, read timeouts, a drain past its grace) through ``error_response`` from the middleware."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rmserve.api.routes import TRAINER_ROUTES
from rmserve.errors import RMServeError

log = logging.getLogger("rmserve.api")


def _log_client_error(request: Request, status: int, message: str) -> None:
    if 400 <= status < 500 and request.url.path in TRAINER_ROUTES:
        rid = getattr(request.state, "request_id", "-")
        log.warning("%s answered %d (request %s): %s", request.url.path, status, rid, message)


def error_response(
    status: int, type_: str, message: str, request_id: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"type": type_, "message": message}
    if request_id:
        body["request_id"] = request_id
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def render(exc: RMServeError, request_id: str | None) -> JSONResponse:
    """The response for one of the service's own errors, with the headers it asks for."""
    return error_response(exc.status, exc.type, exc.message, request_id, exc.headers())


def _rid(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _location(loc: tuple[Any, ...], body: Any) -> str:
    """("body", "items", 3, "prompt") -> "items[3].prompt".

    Only the parts that name something in the request body are kept: pydantic adds its own labels
    for union branches and validators to a location, and those are not in the body.
    """
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    here = body
    for n, part in enumerate(parts):
        if isinstance(part, int) and isinstance(here, list) and 0 <= part < len(here):
            out += f"[{part}]"
            here = here[part]
        elif isinstance(part, str) and isinstance(here, dict) and part in here:
            out += ("." if out else "") + part
            here = here[part]
        elif n == len(parts) - 1 and isinstance(part, str) and isinstance(here, dict):
            out += ("." if out else "") + part  # a field that is missing from its object
    return out or "body"


def _json_problem(err: dict[str, Any], doc: Any) -> str:
    """A JSON syntax error in words: where (line and column) and what was expected."""
    pos = err["loc"][-1] if isinstance(err["loc"][-1], int) else 0
    text = doc if isinstance(doc, str) else ""
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    what = (err.get("ctx") or {}).get("error", "invalid JSON")
    return f"the body is not valid JSON: {what} at line {line}, column {column}"


def _problem(err: dict[str, Any], body: Any) -> str:
    if err.get("type") == "json_invalid":
        return _json_problem(err, body)
    where = _location(tuple(err.get("loc", ())), body)
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if err.get("input", "") is None and err.get("type") in ("string_type", "model_type", "list_type"):
        msg = f"is null; {msg[0].lower()}{msg[1:]}"
    return f"{where}: {msg}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RMServeError)
    async def _rmserve(request: Request, exc: RMServeError) -> JSONResponse:
        if exc.status == 500:  # the server's own failure; 503/504 are the load, not a fault
            log.error("request %s failed: %s", _rid(request) or "-", exc.message)
        _log_client_error(request, exc.status, exc.message)
        return render(exc, _rid(request))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [_problem(dict(err), exc.body) for err in exc.errors()[:10]]
        _log_client_error(request, 422, "; ".join(problems))
        return error_response(422, "invalid_request", "; ".join(problems), _rid(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        types = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        message = str(exc.detail)
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's "error parsing the body": invalid UTF-8, or JSON nested too deep to parse.
            cause = exc.__cause__
            why = {UnicodeDecodeError: "it is not UTF-8", RecursionError: "it is nested too deeply"}.get(
                type(cause), type(cause).__name__
            )
            message = f"the body could not be parsed as JSON: {why}"
        type_ = types.get(exc.status_code, "http_error")
        return error_response(exc.status_code, type_, message, _rid(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = _rid(request) or "-"
        log.exception("unexpected error in request %s", rid)
        return error_response(500, "internal_error", f"internal error (request id {rid})", _rid(request))
