"""veRL reward functions backed by rmserve.

veRL imports a reward function by file path and name (``custom_reward_function.path`` / ``.name``),
so these take their configuration from the environment of the reward worker:

- ``RMSERVE_URL`` (default ``http://127.0.0.1:8000``), ``RMSERVE_API_KEY``, ``RMSERVE_MODEL``,
- ``RMSERVE_CLIENT_TIMEOUT_S`` (default 180), ``RMSERVE_CLIENT_MAX_RETRIES`` (default 5).

The prompt is read from ``extra_info``: the first of ``"prompt"``, ``"question"``, ``"query"``,
``"problem"`` that is present, as text or as a list of chat messages. veRL hands ``solution_str``
already decoded (special tokens skipped), so it is the response as is. With no prompt in
``extra_info`` the solution is scored alone, as ``{"text": solution_str}``. ``data_source`` and
``ground_truth`` do not enter a reward model's score.

``compute_score`` scores one sample per call (veRL's ``naive`` reward manager: one request each);
``compute_score_batch`` takes veRL's ``batch`` reward manager's lists and sends them in chunks.
Both share one pooled, thread-safe client per process, so a reward loop that runs ``compute_score``
in a thread pool gets concurrent requests (which the server batches together).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

from rmserve.client import DEFAULT_URL, ItemLike, RewardClient

__all__ = ["PROMPT_KEYS", "compute_score", "compute_score_batch", "verl_item"]

PROMPT_KEYS = ("prompt", "question", "query", "problem")


def verl_item(solution_str: str, extra_info: Mapping[str, Any] | None) -> ItemLike:
    for key in PROMPT_KEYS:
        prompt = (extra_info or {}).get(key)
        if prompt is not None and len(prompt) > 0:
            if isinstance(prompt, str):
                return (prompt, solution_str)
            return (list(prompt), solution_str)  # chat messages (numpy arrays from parquet included)
    return {"text": solution_str}


def _settings() -> dict[str, Any]:
    return {
        "base_url": os.environ.get("RMSERVE_URL", DEFAULT_URL),
        "api_key": os.environ.get("RMSERVE_API_KEY") or None,
        "model": os.environ.get("RMSERVE_MODEL") or None,
        "timeout": float(os.environ.get("RMSERVE_CLIENT_TIMEOUT_S", "180")),
        "max_retries": int(os.environ.get("RMSERVE_CLIENT_MAX_RETRIES", "5")),
    }


@functools.lru_cache(maxsize=8)
def _client(pid: int, settings: tuple[tuple[str, Any], ...]) -> RewardClient:
    # One pooled client per process and configuration: veRL calls compute_score per sample, in a loop.
    return RewardClient(**dict(settings))


def _sync_client() -> RewardClient:
    return _client(os.getpid(), tuple(sorted(_settings().items())))


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """veRL's ``compute_score``: the reward model's raw score for one rollout."""
    return _sync_client().score([verl_item(solution_str, extra_info)])[0]


def compute_score_batch(
    data_sources: Sequence[str],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Mapping[str, Any] | None],
    **kwargs: Any,
) -> list[float]:
    """veRL's ``batch`` reward manager form: every rollout of a step in one chunked call."""
    items = [verl_item(s, e) for s, e in zip(solution_strs, extra_infos, strict=True)]
    return _sync_client().score(items)
