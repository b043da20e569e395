"""rmserve on Ray Serve: ``rmserve.ray:app`` (the application builder), ``rmserve ray-serve`` (the
command) and ``client`` / ``async_client`` (rmserve's client over a Ray deployment handle).

Nothing here imports Ray or the server until it is used: a trainer's worker reaches ``client``
with ``rmserve`` and ``ray[serve]`` installed, without the server extra.
"""

from __future__ import annotations

from typing import Any

# Ray Serve's names: the deployment inside every rmserve application, and the application's default.
DEPLOYMENT_NAME = "RMServe"
DEFAULT_APP = "rmserve"
# The request router that keeps one x-prefix-key's requests on one replica (rmserve.ray.routing).
ROUTER_PATH = "rmserve.ray.routing:PrefixKeyRouter"

__all__ = ["DEFAULT_APP", "DEPLOYMENT_NAME", "app", "async_client", "client"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from rmserve.ray.deployment import app

        return app
    if name in ("client", "async_client"):
        from rmserve.ray import handle

        return getattr(handle, name)
    raise AttributeError(f"module 'rmserve.ray' has no attribute {name!r}")
