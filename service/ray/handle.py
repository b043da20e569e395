"""rmserve's client over a Ray Serve deployment handle: in-cluster calls without the HTTP proxy.

``client(app_name)`` is a ``RewardClient`` (``async_client``: an ``AsyncRewardClient``) whose
transport hands each request to a replica through Ray's ``DeploymentHandle`` instead of a socket. The
replica runs it through the same app as an HTTP request (``RMServeReplica.handle_request``), so
``score`` / ``get_reward`` return what the HTTP routes return, and chunking, retries and errors are
the client's own. A replica lost mid-call (killed, or gone in a scale-down) is a dropped connection to
the client, retried with backoff; the handle's wait past the client's read timeout is a timeout.

Needs ``ray[serve]`` in the caller's environment and a Ray connection (a Ray worker or driver of the
cluster; otherwise Serve connects through ``RAY_ADDRESS``). Imports nothing of the server.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import httpx
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from rmserve.client import AsyncRewardClient, RewardClient
from rmserve.ray import DEFAULT_APP, DEPLOYMENT_NAME

__all__ = ["AsyncRayTransport", "RayTransport", "async_client", "client"]

# What a handle raises when no replica answered: the client retries these as a dropped connection.
_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)

Answer = tuple[int, list[tuple[str, str]], bytes]


def _deployment(app_name: str) -> DeploymentHandle:
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name)


def _send(handle: DeploymentHandle, request: httpx.Request, body: bytes) -> DeploymentResponse:
    path = request.url.raw_path.decode("ascii")
    call = handle.handle_request.remote(request.method, path, list(request.headers.multi_items()), body)
    return cast(DeploymentResponse, call)  # a unary call: not a stream


def _read_timeout(request: httpx.Request) -> float | None:
    timeout = request.extensions.get("timeout", {})
    return timeout.get("read") if isinstance(timeout, dict) else None


def _response(request: httpx.Request, answer: Answer) -> httpx.Response:
    status, headers, content = answer
    return httpx.Response(status, headers=headers, content=content, request=request)


def _lost(request: httpx.Request, exc: Exception) -> httpx.TransportError:
    return httpx.RemoteProtocolError(f"no replica answered: {type(exc).__name__}: {exc}", request=request)


class RayTransport(httpx.BaseTransport):
    """httpx transport: each request goes to a replica through the deployment handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        call = _send(self.handle, request, request.read())
        try:
            return _response(request, call.result(timeout_s=_read_timeout(request)))
        except TimeoutError:
            call.cancel()
            raise httpx.ReadTimeout("no answer through the handle in time", request=request) from None
        except _LOST as exc:
            raise _lost(request, exc) from exc


class AsyncRayTransport(httpx.AsyncBaseTransport):
    """The asyncio mirror of ``RayTransport``."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        call = _send(self.handle, request, await request.aread())

        async def answer() -> Answer:
            return await call  # type: ignore[no-any-return]

        try:
            return _response(request, await asyncio.wait_for(answer(), _read_timeout(request)))
        except TimeoutError:
            call.cancel()
            raise httpx.ReadTimeout("no answer through the handle in time", request=request) from None
        except _LOST as exc:
            raise _lost(request, exc) from exc


def client(app_name: str = DEFAULT_APP, **options: Any) -> RewardClient:
    """A ``RewardClient`` for the rmserve application ``app_name`` on this Ray cluster, through a
    deployment handle. ``options``: any ``RewardClient`` option (``api_key``, ``model``,
    ``max_retries``, ``timeout``, ...)."""
    return RewardClient(f"http://{app_name}.ray", transport=RayTransport(_deployment(app_name)), **options)


def async_client(app_name: str = DEFAULT_APP, **options: Any) -> AsyncRewardClient:
    """The asyncio mirror of ``client``."""
    transport = AsyncRayTransport(_deployment(app_name))
    return AsyncRewardClient(f"http://{app_name}.ray", transport=transport, **options)
