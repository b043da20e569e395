"""Pure ASGI middleware at the edge: request id, API keys, the body, timing, metrics, access log.

Every response carries ``X-Request-Id`` and ``Server-Timing: app;dur=<ms>``, the time from the
request's arrival here to the start of its response. A request's deadline also counts from its
arrival (``scope["state"]["arrived"]``), so the time spent reading and validating its body is part of
the time it asked for.

The body is read here, whole, before the app sees it: within ``max_body_bytes`` (413, chunked or
not), within ``body_timeout_s`` of the request's arrival (408, connection closed), and within a
cap on the bytes of all bodies held at once (429). Errors found here are rendered by the same
function as every other error (``rmserve.api.errors``). A request still waiting when the server
stops it (a drain past its grace) is answered with a JSON 503, never uvicorn's plain-text 500.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from rmserve.api.errors import render
from rmserve.api.routes import OPEN_ROUTES, PROBE_ROUTES, ROUTES, SCORING_ROUTES
from rmserve.auth import KeyStore
from rmserve.errors import NotReady, Overloaded, RequestTimeout, RMServeError, TooLarge, Unauthorized
from rmserve.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("rmserve.access")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass(frozen=True)
class EdgeLimits:
    max_body_bytes: int
    body_timeout_s: float
    max_inflight_body_bytes: int


# The start of an error body, enough to read its type for the access line.
_ERROR_TYPE = re.compile(rb'^\{"error":\{"type":"([a-z_]{1,64})"')


class EdgeMiddleware:
    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, keys: KeyStore, limits: EdgeLimits, log_probes: bool = False
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.keys = keys
        self.limits = limits
        self.log_probes = log_probes  # probes poll every few seconds: no access line for them by default
        self._held = 0  # bytes of request bodies held by requests in flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        arrived = time.monotonic()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        rid = given if _SAFE_ID.match(given) else uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["arrived"] = arrived
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status = 500
        held = 0
        responded = False
        error_type: str | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, responded, error_type
            if message["type"] == "http.response.body" and status >= 400 and error_type is None:
                found = _ERROR_TYPE.match(message.get("body", b""))  # every error is rendered so
                error_type = found.group(1).decode() if found else "-"
            if message["type"] == "http.response.start":
                status = message["status"]
                responded = True
                message.setdefault("headers", [])
                took_ms = (time.perf_counter() - started) * 1000
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", rid.encode()),
                    (b"server-timing", f"app;dur={took_ms:.1f}".encode()),
                ]
            await send(message)

        try:
            try:
                self._check_key(scope, path)
                body, held = await self._read_body(headers, receive, arrived)
                app_receive = _replay(body, receive)
                if route in SCORING_ROUTES:
                    await self._until_disconnect(scope, app_receive, receive, send_with_id)
                    if state.get("disconnected"):
                        status = 499  # client closed the request (nginx's code): nothing was sent
                else:
                    await self.app(scope, app_receive, send_with_id)
            except RMServeError as exc:
                await render(exc, rid)(scope, receive, send_with_id)
            except asyncio.CancelledError:
                # The server stops a request only when a drain outlasts its grace: say so in JSON,
                # so clients retry it on another replica.
                if responded:
                    raise
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                stopped = NotReady("the server is shutting down; retry on another replica")
                await render(stopped, rid)(scope, receive, send_with_id)
        finally:
            self._held -= held
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route=route, code=str(status)).inc()
            self.metrics.request_duration.labels(route=route).observe(elapsed)
            if access_log.isEnabledFor(logging.INFO) and (self.log_probes or route not in PROBE_ROUTES):
                access_log.info(
                    "request",
                    extra={
                        "request_id": rid,
                        "method": scope.get("method"),
                        "route": route,
                        "status": status,
                        **({"error": error_type} if status >= 400 else {}),
                        "items": state.get("items"),
                        "cache_hits": state.get("cache_hits"),
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )

    def _check_key(self, scope: Scope, path: str) -> None:
        if not self.keys.enabled or path in OPEN_ROUTES:
            return
        given = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"authorization"]
        if len(given) > 1:
            raise Unauthorized(f"send one Authorization header, not {len(given)}")
        if not self.keys.allows(given[0] if given else ""):
            raise Unauthorized("missing or invalid API key")

    async def _read_body(
        self, headers: dict[str, str], receive: Receive, arrived: float
    ) -> tuple[bytes, int]:
        """The whole body, and the bytes it holds against the cap on bodies in flight."""
        limit = self.limits.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"request body of {declared} bytes is over the limit of {limit}")
        until = arrived + self.limits.body_timeout_s
        chunks: list[bytes] = []
        held = 0
        try:
            while True:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, until - time.monotonic()))
                except TimeoutError:
                    raise RequestTimeout(
                        f"the request body did not arrive within {self.limits.body_timeout_s:g} s"
                    ) from None
                if message["type"] != "http.request":
                    break  # the client went away; the app sees an empty body and the disconnect
                chunk = message.get("body", b"")
                held += len(chunk)
                self._held += len(chunk)
                if held > limit:
                    raise TooLarge(f"request body is over the limit of {limit} bytes")
                if self._held > self.limits.max_inflight_body_bytes:
                    raise Overloaded(
                        f"request bodies in flight hold over {self.limits.max_inflight_body_bytes} bytes",
                        retry_after_s=1.0,
                    )
                chunks.append(chunk)
                if not message.get("more_body"):
                    break
        except BaseException:
            self._held -= held
            raise
        return b"".join(chunks), held

    async def _until_disconnect(self, scope: Scope, receive: Receive, raw: Receive, send: Send) -> None:
        """Run the app; if the client disconnects before the response starts, cancel it.

        The body is already read from the connection (``raw``), so a second reader can wait there
        for the ``http.disconnect`` the server sends when the client goes away.
        """
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, receive, sending))

        async def watch() -> None:
            message = await raw()
            if message["type"] == "http.disconnect" and not started:
                handler.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():
                handler.cancel()
                raise  # cancelled from outside (shutdown), not by a disconnect
            scope["state"]["disconnected"] = True
        finally:
            watcher.cancel()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body already read, then waits on the connection (for
    ``http.disconnect``)."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
