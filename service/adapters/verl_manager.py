"""A veRL reward manager that scores each rollout with its prompt: never prompt-blind.

veRL loads it by file path (``reward.reward_manager.source=importlib``, ``.module.path`` = this
file, ``.name=RMServeRewardManager``) and awaits ``run_single`` once per rollout. The prompt is
``raw_prompt``, the chat messages veRL's dataset keeps for every row and its own reward-model path
reads; the response is decoded from the rollout's valid response tokens, special tokens skipped.
rmserve renders ``raw_prompt + [assistant reply]`` with the bundle's own format.

Settings are the ``rmserve_*`` keys of ``reward.reward_kwargs`` (passed to the manager) or of
``reward.custom_reward_function.reward_kwargs``, then the environment (see ``rmserve.adapters.verl``).
The row's ``reward_model.ground_truth`` goes with the item as its ``label`` (where veRL's own naive
manager reads it: verl-project/verl ``verl/experimental/reward_loop/reward_manager/naive.py``); served
by a composite, ``reward_extra_info`` holds each component (``rmserve_<name>`` raw and
``rmserve_<name>_normalized``), which veRL logs as it logs any extra key.
A row without ``raw_prompt`` falls back to the prompt keys of ``extra_info``, then to the response
alone under the same rules as ``compute_score`` (warning once, ``rmserve_prompt_blind``, error when
``rmserve_require_prompt``). ``rmserve_steps`` scores a process reward model's steps, as there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from rmserve.adapters.verl import (
    ascore_items,
    async_client,
    blind_item,
    labelled,
    results,
    scoring_settings,
    verl_item,
)

try:  # inside veRL; the manager works the same without the base class
    from verl.experimental.reward_loop.reward_manager.base import (  # type: ignore[import-not-found]
        RewardManagerBase as _Base,
    )
except ImportError:  # pragma: no cover - veRL is not installed here
    _Base = object

__all__ = ["RMServeRewardManager"]


def _config_kwargs(config: Any) -> dict[str, Any]:
    """``rmserve_*`` keys of reward.reward_kwargs and reward.custom_reward_function.reward_kwargs."""
    out: dict[str, Any] = {}
    reward = config.get("reward") if hasattr(config, "get") else None
    if reward is None:
        return out
    custom = reward.get("custom_reward_function") or {}
    for source in (custom.get("reward_kwargs") or {}, reward.get("reward_kwargs") or {}):
        out |= {str(k): v for k, v in dict(source).items() if str(k).startswith("rmserve_")}
    return out


class RMServeRewardManager(_Base):  # type: ignore[misc,valid-type]
    """Scores each rollout's ``raw_prompt`` and response with rmserve; returns veRL's reward dict."""

    def __init__(self, config: Any, tokenizer: Any, compute_score: Any = None, **kwargs: Any) -> None:
        # veRL's base __init__ signature differs between releases; set what it would set.
        self.config = config
        self.tokenizer = tokenizer
        given = {k: v for k, v in kwargs.items() if k.startswith("rmserve_")}
        self.settings = scoring_settings({**_config_kwargs(config), **given})

    async def run_single(self, data: Any) -> dict[str, Any]:
        row = data[-1:][0]  # several sequences of one trajectory: the last one is scored, as veRL's own
        response_ids = row.batch["responses"]
        length = response_ids.shape[-1]
        valid = int(row.batch["attention_mask"][-length:].sum())
        loop = asyncio.get_running_loop()
        response = await loop.run_in_executor(
            None, lambda: self.tokenizer.decode(response_ids[:valid], skip_special_tokens=True)
        )
        item, blind = self.item(row.non_tensor_batch, response)
        if not self.settings[
            "steps"
        ]:  # veRL keeps the label at reward_model.ground_truth (its naive manager)
            item = labelled(item, (row.non_tensor_batch.get("reward_model") or {}).get("ground_truth"))
        result = await ascore_items(async_client(self.settings), [item], self.settings)
        extra = results(result, [blind])[0]
        return {"reward_score": extra["score"], "reward_extra_info": extra}

    def item(self, columns: Mapping[str, Any], response: str) -> tuple[Any, bool]:
        """The item for one row: its raw prompt's messages and the reply, or the fallbacks."""
        raw = columns.get("raw_prompt")
        if raw is not None and len(raw) > 0:
            if isinstance(raw, str):
                return (raw, response), False
            # The turns go as veRL keeps them (tool calls, content null or parts): the client keeps their
            # structure and the server renders them with the reward model's template.
            return {"messages": [*list(raw), {"role": "assistant", "content": response}]}, False
        found = verl_item(response, columns.get("extra_info") or {})
        if found is not None:
            return found, False
        return blind_item(response, self.settings["require_prompt"]), True
