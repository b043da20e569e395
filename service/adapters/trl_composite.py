"""A served composite as TRL reward functions, one per component, with the composite's weights.

``trl_composite_reward_funcs(url, model="helpful-safe")`` returns ``(reward_funcs, reward_weights)`` for
``GRPOTrainer(reward_funcs=...)`` and ``GRPOConfig(reward_weights=...)``. Each function returns its
component's normalised values; TRL multiplies them by ``reward_weights`` and sums them (its default
``multi_objective_aggregation="sum_then_normalize"``: ``(rewards_per_func * reward_weights).nansum(dim=1)``,
trl 1.16 ``trl/trainer/grpo_trainer.py``, ``_generate_and_score_completions``), which is the composite's
``sum``; and it logs each function as ``rewards/<name>/mean`` and ``/std`` (the same method), so every
component is logged apart. Only ``sum`` composites split this way (a ``min`` or a ``gate`` is not a
weighted sum): for those, ``trl_reward_func(url, model=...)`` gives the combined score as one function.

The functions share one scoring per generation batch: TRL calls its sync reward functions one after the
other with the same prompts and completions (``_calculate_rewards``), so the first call scores the batch
(one ``/v1/score`` with the composite, every component at once; a running normaliser sees each value
once) and the others read the same answer. A component the server skipped (``on_error: skip``) answers
None for each completion, which TRL turns into NaN and leaves out of the sum. The dataset column
``label_column`` (TRL passes every dataset column to reward functions) is sent as each item's ``label``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from rmserve.adapters.trl import trl_items
from rmserve.client import DEFAULT_URL, RewardClient, ScoreResult
from rmserve.client.items import to_item

__all__ = ["CompositeScoring", "TRLComponentFunction", "trl_composite_reward_funcs"]


class CompositeScoring:
    """One composite's answer for the batch TRL is scoring now, read by each component's function."""

    def __init__(self, url: str, model: str, readers: int, label_column: str | None, **options: Any) -> None:
        self.url = url
        self.model = model
        self.readers = readers
        self.label_column = label_column
        self.options = options
        self._client: RewardClient | None = None
        self._held: tuple[str, ScoreResult, int] | None = None  # (batch key, answer, reads left)

    def __getstate__(self) -> dict[str, Any]:
        # A client holds sockets: each process makes its own (functions pickled together share one).
        return self.__dict__ | {"_client": None, "_held": None}

    def client(self) -> RewardClient:
        if self._client is None:
            self._client = RewardClient(self.url, model=self.model, **self.options)
        return self._client

    def answer(self, prompts: list[Any], completions: list[Any], columns: dict[str, Any]) -> ScoreResult:
        items = [to_item(item, i) for i, item in enumerate(trl_items(prompts, completions))]
        labels = columns.get(self.label_column) if self.label_column else None
        if labels is not None:
            items = [{**item, "label": label} for item, label in zip(items, labels, strict=True)]
        key = hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()
        if self._held is not None and self._held[0] == key and self._held[2] > 0:
            _, result, left = self._held
            self._held = (key, result, left - 1)
            return result
        result = self.client().score_result(items)
        self._held = (key, result, self.readers - 1)
        return result


class TRLComponentFunction:
    """One component of a composite as a TRL reward function (named ``<prefix><component>``)."""

    def __init__(self, scoring: CompositeScoring, component: str, name: str) -> None:
        self.scoring = scoring
        self.component = component
        self.__name__ = name

    def __repr__(self) -> str:
        return f"TRLComponentFunction({self.scoring.model!r}, {self.component!r})"

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        result = self.scoring.answer(prompts, completions, kwargs)
        values = (result.normalized or {}).get(self.component)
        return list(values) if values is not None else [None] * len(completions)


def trl_composite_reward_funcs(
    url: str | None = None,
    *,
    model: str,
    api_key: str | None = None,
    label_column: str | None = "label",
    prefix: str = "",
    **client_options: Any,
) -> tuple[list[TRLComponentFunction], list[float]]:
    """``(reward_funcs, reward_weights)`` for the composite ``model`` served at ``url`` (default:
    $RMSERVE_URL or local), read from the server's ``/v1/models``. ValueError when ``model`` is not a
    composite, or not a ``sum``."""
    url = url or os.environ.get("RMSERVE_URL", DEFAULT_URL)
    api_key = api_key if api_key is not None else os.environ.get("RMSERVE_API_KEY")
    with RewardClient(url, api_key=api_key, **client_options) as client:
        listed = {m.get("id"): m for m in client.models()}
    entry = listed.get(model)
    if entry is None or entry.get("kind") != "composite":
        raise ValueError(f"{model!r} is not a composite served at {url}; composites are listed by /v1/models")
    if entry.get("combine", "sum") != "sum":
        raise ValueError(
            f"composite {model!r} combines by {entry['combine']}, not a weighted sum of its components; "
            f"use trl_reward_func({url!r}, model={model!r}) for its combined score"
        )
    components = entry["components"]
    scoring = CompositeScoring(url, model, len(components), label_column, api_key=api_key, **client_options)
    funcs = [TRLComponentFunction(scoring, c["name"], f"{prefix}{c['name']}") for c in components]
    return funcs, [float(c.get("weight", 1.0)) for c in components]
