"""OpenRLHF's reward-function file mode, backed by rmserve's client: ``--reward.remote_url <this file>``.

OpenRLHF loads a ``.py`` path given as the remote reward URL, takes its ``reward_func`` and calls it
as ``reward_func(queries, prompts, labels)`` in a thread, one sample per call in current releases
(``openrlhf/utils/agent.py``, ``SingleTurnAgentExecutor``). Unlike OpenRLHF's own HTTP caller
(5 tries, 1 s apart, no headers), this sends a bearer key and honours ``Retry-After``: use it for
servers with API keys. Settings come from the environment of the rollout workers: ``RMSERVE_URL``,
``RMSERVE_API_KEY``, ``RMSERVE_CLIENT_TIMEOUT_S`` (180), ``RMSERVE_CLIENT_MAX_RETRIES`` (5), and
``RMSERVE_RAY_APP``: the name of an rmserve application on the trainer's own Ray cluster, scored
through a Ray Serve handle instead of HTTP (``rmserve.ray``; docs/ray.md), and ``RMSERVE_MODEL``: the
served model (a bundle or a composite) to score with, sent as ``/get_reward?model=``; unset, the
server's default model, as for OpenRLHF's own requests.

It returns what rmserve's ``/get_reward`` returns (``rewards``, ``scores``, ``extra_logs``: a composite's
components among them, each logged by OpenRLHF under its own name), as
torch tensors when torch is importable (OpenRLHF's examples return tensors), else as lists.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from rmserve.adapters.clients import reward_client
from rmserve.client import DEFAULT_URL, RewardClient

__all__ = ["reward_func"]


@functools.lru_cache(maxsize=4)
def _client(pid: int, url: str, api_key: str | None, ray_app: str | None, model: str | None) -> RewardClient:
    return reward_client(
        url,
        ray_app,
        api_key=api_key,
        model=model,
        timeout=float(os.environ.get("RMSERVE_CLIENT_TIMEOUT_S", "180")),
        max_retries=int(os.environ.get("RMSERVE_CLIENT_MAX_RETRIES", "5")),
    )


def _tensor(values: list[float]) -> Any:
    try:
        import torch
    except ImportError:
        return values
    return torch.tensor(values, dtype=torch.float32)


def reward_func(
    queries: list[str], prompts: list[str], labels: list[Any] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """OpenRLHF's reward function: ``/get_reward`` through rmserve's client."""
    client = _client(
        os.getpid(),
        os.environ.get("RMSERVE_URL", DEFAULT_URL),
        os.environ.get("RMSERVE_API_KEY") or None,
        os.environ.get("RMSERVE_RAY_APP") or None,
        os.environ.get("RMSERVE_MODEL") or None,
    )
    result = client.get_reward_result(list(queries), list(prompts) if prompts is not None else None, labels)
    return {
        "rewards": _tensor(result.rewards),
        "scores": _tensor(result.scores),
        "extra_logs": {name: _tensor(values) for name, values in result.extra_logs.items()},
    }
