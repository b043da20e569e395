"""The client an adapter scores with: HTTP to ``base_url`` by default, or, given ``ray_app``, a Ray
Serve deployment handle to that rmserve application on the caller's own Ray cluster
(``rmserve.ray.handle``; Ray is imported only then). Both answer alike: same results, same errors."""

from __future__ import annotations

from typing import Any

from rmserve.client import AsyncRewardClient, RewardClient


def reward_client(base_url: str, ray_app: str | None = None, **options: Any) -> RewardClient:
    if ray_app:
        from rmserve.ray.handle import client

        return client(ray_app, **options)
    return RewardClient(base_url, **options)


def async_reward_client(base_url: str, ray_app: str | None = None, **options: Any) -> AsyncRewardClient:
    if ray_app:
        from rmserve.ray.handle import async_client

        return async_client(ray_app, **options)
    return AsyncRewardClient(base_url, **options)
