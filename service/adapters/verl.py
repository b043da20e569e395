"""veRL reward functions backed by rmserve (the reward manager is in ``verl_manager``).

veRL imports a reward function by file path and name (``reward.custom_reward_function.path`` /
``.name``) and calls it with keyword arguments. Settings come, first, from those arguments: veRL
merges ``reward.custom_reward_function.reward_kwargs`` into every call, and they reach the Ray
reward workers with the config. The environment of the workers is the fallback:

=========================  ==============================  =====================================
reward_kwargs key          environment variable            meaning
=========================  ==============================  =====================================
``rmserve_url``            ``RMSERVE_URL``                 server (default http://127.0.0.1:8000)
``rmserve_api_key``        ``RMSERVE_API_KEY``             bearer key
``rmserve_model``          ``RMSERVE_MODEL``               bundle name, when several are served
``rmserve_timeout_s``      ``RMSERVE_CLIENT_TIMEOUT_S``    client timeout (default 180)
``rmserve_max_retries``    ``RMSERVE_CLIENT_MAX_RETRIES``  retries of 429/502/503 (default 5)
``rmserve_require_prompt`` ``RMSERVE_REQUIRE_PROMPT``      a sample without a prompt is an error
``rmserve_ray_app``        ``RMSERVE_RAY_APP``             score through a Ray Serve handle to
                                                           this rmserve application instead of
                                                           HTTP (same Ray cluster, docs/ray.md)
``rmserve_steps``          ``RMSERVE_STEPS``               score a process reward model's steps
``rmserve_step_separator`` (reward_kwargs only)            where a solution is cut into steps
                                                           (default a blank line)
``rmserve_step_aggregate`` ``RMSERVE_STEP_AGGREGATE``      min (default), last, mean or prod
=========================  ==============================  =====================================

veRL hands ``solution_str`` already decoded (special tokens skipped) and never the prompt. The prompt
is read from ``extra_info``: the first of ``"prompt"``, ``"question"``, ``"query"``, ``"problem"``,
``"raw_prompt"`` that is present, as text or as chat messages. Without one the response is scored
alone (prompt-blind): a warning is logged once, the returned ``rmserve_prompt_blind`` is 1.0, and
with ``rmserve_require_prompt`` it is an error instead. ``RMServeRewardManager`` (``verl_manager``)
reads the prompt veRL keeps for its own reward models instead, so it is never prompt-blind.

Every function returns ``{"score": float, "rmserve_prompt_blind": 0.0 or 1.0}`` per sample, the
same keys each time: veRL logs the extra keys as metrics (a bare float it
would log as ``acc``). ``compute_score`` is ``async`` (veRL's reward loop awaits coroutine
functions); ``compute_score_sync`` is for releases whose ``naive`` manager calls it without awaiting;
``compute_score_batch`` takes the lists of releases that still have the ``batch`` manager.

``ground_truth`` goes with each item as its ``label`` (a composite's label_match rule reads it; a bundle
never does). Served by a composite (``rmserve_model`` names one), each sample's dict adds every component,
``rmserve_<name>`` (raw) and ``rmserve_<name>_normalized``, NaN for a component the server skipped.

With ``rmserve_steps`` the served model is a process reward model: each response is cut into steps
(``rmserve_step_separator``, a blank line by default, as the Qwen PRM model cards split solutions) and
``score`` is the aggregate of its step scores; ``rmserve_steps`` (the number of steps scored) joins
the keys returned. A prompt-blind sample is scored with an empty prompt.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from rmserve.adapters.clients import async_reward_client, reward_client
from rmserve.client import DEFAULT_URL, AsyncRewardClient, ItemLike, RewardClient, ScoreResult, message_text
from rmserve.items import STEP_SEPARATOR, split_steps

__all__ = [
    "PROMPT_KEYS",
    "compute_score",
    "compute_score_batch",
    "compute_score_sync",
    "scoring_settings",
    "step_item",
    "verl_item",
]

log = logging.getLogger("rmserve.adapters.verl")

PROMPT_KEYS = ("prompt", "question", "query", "problem", "raw_prompt")
_TRUE = {"1", "true", "yes", "on"}
_warned_blind = False


class PromptMissing(ValueError):
    """A sample reached the reward function without its prompt while one is required."""


def scoring_settings(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The client settings and ``require_prompt``: reward_kwargs first, then the environment."""

    def get(key: str, env: str, default: Any) -> Any:
        value = kwargs.get(f"rmserve_{key}")
        return value if value is not None else os.environ.get(env) or default

    return {
        "base_url": str(get("url", "RMSERVE_URL", DEFAULT_URL)),
        "api_key": get("api_key", "RMSERVE_API_KEY", None),
        "model": get("model", "RMSERVE_MODEL", None),
        "timeout": float(get("timeout_s", "RMSERVE_CLIENT_TIMEOUT_S", 180)),
        "max_retries": int(get("max_retries", "RMSERVE_CLIENT_MAX_RETRIES", 5)),
        "require_prompt": str(get("require_prompt", "RMSERVE_REQUIRE_PROMPT", "")).lower() in _TRUE,
        "ray_app": get("ray_app", "RMSERVE_RAY_APP", None),
        "steps": str(get("steps", "RMSERVE_STEPS", "")).lower() in _TRUE,
        "step_separator": str(kwargs.get("rmserve_step_separator") or STEP_SEPARATOR),
        "step_aggregate": get("step_aggregate", "RMSERVE_STEP_AGGREGATE", None),
    }


# Settings of the adapter itself; the rest are the client's.
_ADAPTER_KEYS = frozenset({"require_prompt", "steps", "step_separator", "step_aggregate"})


def verl_item(solution_str: str, extra_info: Mapping[str, Any] | None) -> ItemLike | None:
    """The item for a response and the prompt found in ``extra_info``; None when there is none."""
    for key in PROMPT_KEYS:
        prompt = (extra_info or {}).get(key)
        if prompt is not None and len(prompt) > 0:
            if isinstance(prompt, str):
                return (prompt, solution_str)
            return (list(prompt), solution_str)  # chat messages (numpy arrays from parquet included)
    return None


def blind_item(solution_str: str, require_prompt: bool) -> ItemLike:
    """The response alone, when no prompt was found: warned once, or an error when one is required."""
    global _warned_blind
    if require_prompt:
        raise PromptMissing(
            "no prompt reached the reward function (extra_info has none of "
            f"{', '.join(PROMPT_KEYS)}); use RMServeRewardManager or put the prompt in extra_info"
        )
    if not _warned_blind:
        _warned_blind = True
        log.warning(
            "rmserve is scoring responses without their prompts: veRL passes none to compute_score and "
            "extra_info has none of %s. Use RMServeRewardManager (docs/trainers.md); "
            "rmserve_prompt_blind counts these samples.",
            ", ".join(PROMPT_KEYS),
        )
    return {"text": solution_str}


def step_item(item: Any, separator: str) -> ItemLike:
    """An item of this adapter, as a process reward model's ``(prompt, [step, ...])``: the reply cut
    into steps at ``separator``; a prompt-blind response gets an empty prompt."""
    if isinstance(item, tuple):
        prompt, reply = item
    elif "messages" in item:
        *context, last = item["messages"]
        prompt, reply = context, message_text(last.get("content"))
    else:
        prompt, reply = "", item["text"]
    return (prompt, list(split_steps(reply, separator)))


def result_dict(score: float, blind: bool, steps: int | None = None) -> dict[str, float]:
    """What veRL gets per sample: the score, and the same extra keys every time (logged as metrics)."""
    out = {"score": score, "rmserve_prompt_blind": float(blind)}
    if steps is not None:
        out["rmserve_steps"] = float(steps)
    return out


def component_dicts(result: ScoreResult) -> list[dict[str, float]]:
    """A composite's components per sample: ``rmserve_<name>`` (raw) and ``rmserve_<name>_normalized``;
    a component the server skipped is NaN, so every sample has the same keys. Empty for a bundle."""
    if result.components is None:
        return [{} for _ in result.scores]
    names = [*result.components, *(s for s in result.usage.skipped if s not in result.components)]
    normalized = result.normalized or {}
    out: list[dict[str, float]] = []
    for i in range(len(result.scores)):
        row: dict[str, float] = {}
        for name in names:
            row[f"rmserve_{name}"] = result.components[name][i] if name in result.components else math.nan
            row[f"rmserve_{name}_normalized"] = normalized[name][i] if name in normalized else math.nan
        out.append(row)
    return out


def results(result: ScoreResult, blinds: Sequence[bool]) -> list[dict[str, float]]:
    """``result_dict`` of each sample of ``result``, in order, with a composite's components."""
    steps: Sequence[int | None] = [len(s) for s in result.step_scores or []] or [None] * len(blinds)
    rows = [result_dict(*entry) for entry in zip(result.scores, blinds, steps, strict=True)]
    return [row | parts for row, parts in zip(rows, component_dicts(result), strict=True)]


def labelled(item: Any, label: Any) -> Any:
    """The item with the sample's ground truth as its ``label`` (read by a composite's label_match rule;
    never by a bundle). numpy values (veRL's parquet rows) become plain JSON values."""
    if label is None:
        return item
    tolist = getattr(label, "tolist", None)
    value = tolist() if callable(tolist) else label
    if isinstance(item, tuple):
        return {"prompt": item[0], "response": item[1], "label": value}
    return {**item, "label": value}


def _client_options(settings: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, v) for k, v in settings.items() if k not in _ADAPTER_KEYS))


def _prepared(items: list[Any], settings: dict[str, Any]) -> list[ItemLike]:
    return [step_item(i, settings["step_separator"]) for i in items] if settings["steps"] else items


def score_items(client: RewardClient, items: list[Any], settings: dict[str, Any]) -> ScoreResult:
    """The items scored: their steps when ``rmserve_steps`` is set."""
    if settings["steps"]:
        return client.score_steps(_prepared(items, settings), aggregate=settings["step_aggregate"])
    return client.score_result(items)


async def ascore_items(client: AsyncRewardClient, items: list[Any], settings: dict[str, Any]) -> ScoreResult:
    """The async mirror of ``score_items``."""
    if settings["steps"]:
        return await client.score_steps(_prepared(items, settings), aggregate=settings["step_aggregate"])
    return await client.score_result(items)


@functools.lru_cache(maxsize=8)
def _sync_client(pid: int, options: tuple[tuple[str, Any], ...]) -> RewardClient:
    # One pooled client per process and configuration: veRL calls compute_score per sample.
    return reward_client(**dict(options))


_async_clients: dict[tuple[int, tuple[tuple[str, Any], ...]], AsyncRewardClient] = {}


def async_client(settings: dict[str, Any]) -> AsyncRewardClient:
    """One pooled async client per event loop and configuration (a pool belongs to its loop)."""
    key = (id(asyncio.get_running_loop()), _client_options(settings))
    if key not in _async_clients:
        _async_clients[key] = async_reward_client(**dict(key[1]))
    return _async_clients[key]


def _one(solution: str, extra_info: Mapping[str, Any] | None, settings: dict[str, Any]) -> tuple[Any, bool]:
    item = verl_item(solution, extra_info)
    if item is None:
        return blind_item(solution, settings["require_prompt"]), True
    return item, False


def _rollout(
    solution_str: str, extra_info: Mapping[str, Any] | None, kwargs: dict[str, Any], ground_truth: Any = None
) -> tuple[dict[str, Any], Any, bool]:
    """One rollout's settings, item (with its ground truth as the label) and whether it is scored
    without its prompt."""
    settings = scoring_settings(kwargs)
    item, blind = _one(solution_str, extra_info, settings)
    return settings, item if settings["steps"] else labelled(item, ground_truth), blind


async def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """veRL's ``compute_score`` (reward loop, awaited): the reward model's raw score for one rollout."""
    settings, item, blind = _rollout(solution_str, extra_info, kwargs, ground_truth)
    return results(await ascore_items(async_client(settings), [item], settings), [blind])[0]


def compute_score_sync(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """``compute_score`` for veRL releases that call it without awaiting (the legacy ``naive``)."""
    settings, item, blind = _rollout(solution_str, extra_info, kwargs, ground_truth)
    client = _sync_client(os.getpid(), _client_options(settings))
    return results(score_items(client, [item], settings), [blind])[0]


def compute_score_batch(
    data_sources: Sequence[str],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Mapping[str, Any] | None],
    **kwargs: Any,
) -> list[dict[str, float]]:
    """veRL's ``batch`` reward manager form (releases that have it): every rollout of a step at once."""
    settings = scoring_settings(kwargs)
    pairs = [_one(s, e, settings) for s, e in zip(solution_strs, extra_infos, strict=True)]
    client = _sync_client(os.getpid(), _client_options(settings))
    items = [
        i if settings["steps"] else labelled(i, g) for (i, _), g in zip(pairs, ground_truths, strict=True)
    ]
    result = score_items(client, items, settings)
    return results(result, [blind for _, blind in pairs])
