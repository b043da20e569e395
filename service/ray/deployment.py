"""rmserve as a Ray Serve deployment: each replica is one rmserve, ``create_app`` and its state.

Ray Serve runs the app's lifespan when a replica starts (``serve.ingress``, late-bound through
``__serve_build_asgi_app__``), so a replica loads its bundles, builds its engines and warms them up
exactly as ``rmserve serve`` does. This module owns only the wiring around that app:

- start-up and health: Ray's first health check waits for the app's start-up to end and passes only
  when ``/health/ready`` would answer 200; so does every later check (a replica whose engine is being
  rebuilt fails them, and Ray replaces it after three failures in a row);
- load: each replica reports the items it has accepted and not yet scored, which the autoscaling
  policy reads (``rmserve.ray.autoscaling``);
- drain: on scale-down, redeploy or shutdown Ray stops routing to the replica and waits up to
  ``graceful_shutdown_timeout_s`` (the server's ``drain_grace_s``) for its requests; the app's
  lifespan then finishes whatever its batchers still hold;
- identity: every response names its replica in ``x-replica`` (Ray's replica id), and its metrics
  reach Ray's Prometheus export tagged with it (``rmserve.ray.metrics``);
- in-cluster calls: ``handle_request`` runs one HTTP request through the same app for a
  ``DeploymentHandle`` (``rmserve.ray.handle``), so a handle gets what the HTTP route answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx
from ray import serve
from ray.serve import Application

from rmserve.app import create_app
from rmserve.config import Settings
from rmserve.logs import configure_logging
from rmserve.ray.metrics import RayMetricsCopy
from rmserve.ray.options import ITEMS_METRIC, RaySettings, split_builder_args
from rmserve.state import AppState

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


class ReplicaHeaders:
    """ASGI middleware around the app: ``x-replica: <id>`` on every HTTP response, errors included.

    Behind Ray's HTTP proxy (``proxied``) the app's ``x-request-id`` is left out: the proxy gives
    every request an id (the caller's, or a new one), which the app takes as its own, and adds it to
    the answer itself.
    """

    def __init__(self, app: ASGIApp, replica: str, *, proxied: bool) -> None:
        self.app = app
        self.replica = (b"x-replica", replica.encode())
        self.proxied = proxied

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                if self.proxied:
                    headers = [(k, v) for k, v in headers if k.lower() != b"x-request-id"]
                message["headers"] = [*headers, self.replica]
            await send(message)

        await self.app(scope, receive, named)


@serve.ingress()
class RMServeReplica:
    """One rmserve per Ray Serve replica."""

    def __init__(self, settings: Settings) -> None:
        configure_logging(settings.log_level)
        self.settings = settings
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> ASGIApp:
        # (not ``self.app``: that name is Ray's, the wrapper's view of what this returns)
        self.rmserve_app = app = create_app(self.settings)
        self.state: AppState = app.state.rmserve
        # Ray builds the app on the replica's event loop: the copy of its metrics runs there too.
        self.metrics_copy = asyncio.get_running_loop().create_task(
            RayMetricsCopy(self.state.metrics.registry).run()
        )
        # Handle calls run through the same app in this process (``handle_request``).
        self.transport = httpx.ASGITransport(app=ReplicaHeaders(app, self.replica, proxied=False))
        return ReplicaHeaders(app, self.replica, proxied=True)

    async def check_health(self) -> None:
        """Ray's health check: the readiness of ``/health/ready``. The first check (Ray's start-up
        gate) waits for the app's start-up to end: loaded, gated and warmed up, or failed."""
        loader: asyncio.Task[None] | None = getattr(self.rmserve_app.state, "loader", None)
        if loader is not None and not loader.done():
            await asyncio.wait([loader])
        if not self.state.is_ready():
            reason = f": {self.state.failure}" if self.state.failure else ""
            raise RuntimeError(f"rmserve replica {self.replica} is not ready ({self.state.phase}{reason})")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The load this replica reports to Ray's autoscaler."""
        return {ITEMS_METRIC: float(self.state.items_in_work())}

    async def handle_request(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """One HTTP request through this replica's app: (status, headers, body) as HTTP answers them."""
        request = httpx.Request(method, "http://replica" + path, headers=headers, content=body)
        response = await self.transport.handle_async_request(request)
        content = await response.aread()
        return response.status_code, list(response.headers.multi_items()), content


def build(settings: Settings, ray_settings: RaySettings) -> Application:
    """The Ray Serve application for these settings (``serve.run`` it)."""
    deployment = serve.deployment(**ray_settings.deployment_options(settings))(RMServeReplica)
    return deployment.bind(ray_settings.replica_settings(settings))


def app(args: dict[str, Any]) -> Application:
    """Ray Serve's application builder: ``serve run rmserve.ray:app models=... replicas=2``, or
    ``import_path: rmserve.ray:app`` with ``args`` in a ``serve deploy`` config. Arguments are the
    settings of ``rmserve ray-serve`` by name; ``RMSERVE_*`` variables fill the rest."""
    return build(*split_builder_args(args))
