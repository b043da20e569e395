"""Pure ASGI middleware at the edge: request id, API keys, body limit, timing, metrics, access log.

Every response carries ``X-Request-Id`` and ``Server-Timing: app;dur=<ms>``, the time from the
request's arrival here to the start of its response. A request's deadline also counts from its
arrival (``scope["state"]["arrived"]``), so the time spent reading and validating its body is part of
the time it asked for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from rmserve.auth import KeyStore
from rmserve.errors import TooLarge
from rmserve.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("rmserve.access")

ROUTES = frozenset(
    {
        "/v1/score",
        "/get_reward",
        "/v1/models",
        "/info",
        "/metrics",
        "/health/live",
        "/health/ready",
        "/docs",
        "/openapi.json",
    }
)
# Health and metrics stay open: who may reach them is the network policy's business.
OPEN_ROUTES = frozenset(
    {"/metrics", "/health/live", "/health/ready", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}
)
# Scoring requests stop when their client goes away, so their items are not scored for no one.
SCORING_ROUTES = frozenset({"/v1/score", "/get_reward"})
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, keys: KeyStore, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.keys = keys
        self.max_body = max_body_bytes

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

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                took_ms = (time.perf_counter() - started) * 1000
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", rid.encode()),
                    (b"server-timing", f"app;dur={took_ms:.1f}".encode()),
                ]
            await send(message)

        try:
            if (
                self.keys.enabled
                and path not in OPEN_ROUTES
                and not self.keys.allows(headers.get("authorization", ""))
            ):
                await _respond(
                    send_with_id,
                    401,
                    "unauthorized",
                    "missing or invalid API key",
                    rid,
                    {"www-authenticate": "Bearer"},
                )
                return
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body:
                await _respond(
                    send_with_id,
                    413,
                    "too_large",
                    f"request body of {declared} bytes is over the limit of {self.max_body}",
                    rid,
                )
                return
            if route in SCORING_ROUTES:
                await self._until_disconnect(scope, self._limited(receive), send_with_id)
                if state.get("disconnected"):
                    status = 499  # client closed the request (nginx's code): nothing was sent
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route=route, code=str(status)).inc()
            self.metrics.request_duration.labels(route=route).observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "request",
                    extra={
                        "request_id": rid,
                        "method": scope.get("method"),
                        "route": route,
                        "status": status,
                        "items": state.get("items"),
                        "cache_hits": state.get("cache_hits"),
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )

    async def _until_disconnect(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; if the client disconnects before the response starts, cancel it.

        Once the body is read, the request has nothing more to receive, so a second reader can wait
        for the ``http.disconnect`` the server sends when the client goes away.
        """
        body_read = asyncio.Event()
        started = False

        async def receiving() -> Message:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                body_read.set()
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, receiving, sending))

        async def watch() -> None:
            await body_read.wait()
            message = await receive()
            if message["type"] == "http.disconnect" and not started:
                handler.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():
                raise  # cancelled from outside (shutdown), not by a disconnect
            scope["state"]["disconnected"] = True
        finally:
            watcher.cancel()

    def _limited(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_body

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise TooLarge(f"request body is over the limit of {limit} bytes")
            return message

        return wrapped


async def _respond(
    send: Send, status: int, type_: str, message: str, rid: str, extra: dict[str, str] | None = None
) -> None:
    body = json.dumps({"error": {"type": type_, "message": message, "request_id": rid}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
