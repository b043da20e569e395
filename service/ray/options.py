"""The Ray settings of a deployment: replicas, resources, autoscaling. One env var (RMSERVE_RAY_X), one
flag (--x) and one help line each, like ``rmserve.config.Settings``; both sets are read by
``rmserve ray-serve`` and by the ``rmserve.ray:app`` builder.

What a setting turns into on Ray Serve's side (``deployment_options``): ``replicas`` is a fixed
``num_replicas``; ``max_replicas`` switches to autoscaling between ``min_replicas`` and it, on the
items queued per replica (``rmserve.ray.autoscaling``); ``num_cpus``/``num_gpus`` are each replica's
``ray_actor_options``; the server's own ``drain_grace_s`` is Ray's ``graceful_shutdown_timeout_s``.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rmserve.config import Settings
from rmserve.ray import DEFAULT_APP, DEPLOYMENT_NAME, ROUTER_PATH

# The custom metric each replica reports and the policy reads (rmserve.ray.autoscaling).
ITEMS_METRIC = "rmserve_items_in_work"


class RaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RMSERVE_RAY_", extra="forbid", frozen=True)

    address: str | None = Field(
        None,
        description="Ray cluster to join: auto (the one on this machine) or host:port "
        "(unset: RAY_ADDRESS, else a new local cluster)",
    )
    app_name: str = Field(
        DEFAULT_APP, min_length=1, description="Ray Serve application name (handles use it)"
    )
    replicas: int = Field(1, ge=1, description="replicas when not autoscaling (max_replicas unset)")
    min_replicas: int = Field(1, ge=0, description="autoscaling: fewest replicas")
    max_replicas: int | None = Field(
        None, ge=1, description="autoscaling: most replicas; setting it turns autoscaling on (unset: off)"
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica (and its inference threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (1: one engine per GPU)")
    target_items_per_replica: float = Field(
        64.0, gt=0, description="autoscaling: items queued or in a forward pass per replica to aim at"
    )
    look_back_s: float = Field(
        15.0, gt=0, description="autoscaling: window over which each replica's queued items are averaged"
    )
    upscale_delay_s: float = Field(
        10.0, ge=0, description="autoscaling: how long more replicas must be wanted before they start"
    )
    downscale_delay_s: float = Field(
        300.0, ge=0, description="autoscaling: how long fewer replicas must be wanted before one stops"
    )
    max_ongoing_requests: int = Field(
        256,
        ge=1,
        description="requests one replica takes at once (its batcher groups them); more wait in Ray's proxy",
    )

    @model_validator(mode="after")
    def _bounds(self) -> RaySettings:
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    def replica_settings(self, settings: Settings) -> Settings:
        """The server settings one replica runs with: unless set, its inference threads are the CPUs
        Ray reserves for it, not every core of the node (replicas share a node)."""
        if settings.threads is not None:
            return settings
        return settings.model_copy(update={"threads": max(1, math.floor(self.num_cpus))})

    def deployment_options(self, settings: Settings) -> dict[str, Any]:
        """Keyword arguments of Ray Serve's ``Deployment.options`` for these settings."""
        options: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            # Ray waits this long for a stopping replica's requests (scale-down, redeploy, SIGTERM).
            "graceful_shutdown_timeout_s": settings.drain_grace_s,
            "graceful_shutdown_wait_loop_s": 0.5,
            # A replica whose engines do not load fails the same way every time: give up soon.
            "max_constructor_retry_count": 3,
            # One prompt's requests (one x-prefix-key) reach one replica, whose prefix cache holds it.
            "request_router_config": {"request_router_class": ROUTER_PATH},
        }
        if self.max_replicas is None:
            options["num_replicas"] = self.replicas
            return options
        options["autoscaling_config"] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": max(1, self.min_replicas),
            "look_back_period_s": self.look_back_s,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "policy": {
                "policy_function": "rmserve.ray.autoscaling:QueuedItemsPolicy",
                "policy_kwargs": {
                    "metric": ITEMS_METRIC,
                    "target_items_per_replica": self.target_items_per_replica,
                },
            },
        }
        return options


def split_builder_args(args: dict[str, Any]) -> tuple[Settings, RaySettings]:
    """``serve run rmserve.ray:app key=value ...`` arguments -> (server settings, Ray settings).

    Keys are the settings' names (``models``, ``precision``, ``replicas``, ``num_cpus``, ...), each
    going to the set that has it; the environment fills the rest, as for ``rmserve serve``. Where to
    listen and which cluster to join are Serve's own options there, so ``host``, ``port`` and
    ``address`` are refused with the option to use instead.
    """
    elsewhere = {
        "host": "Serve's http_options (serve run --host)",
        "port": "Serve's http_options (serve run --port)",
        "address": "serve run --address",
    }
    server: dict[str, Any] = {}
    ray: dict[str, Any] = {}
    for key, value in args.items():
        if key in elsewhere:
            raise ValueError(f"{key}: not an argument of rmserve.ray:app; use {elsewhere[key]}")
        if key in Settings.model_fields:
            server[key] = value
        elif key in RaySettings.model_fields:
            ray[key] = value
        else:
            raise ValueError(f"{key}: not a setting of rmserve (see rmserve ray-serve --help)")
    return Settings(**server), RaySettings(**ray)
