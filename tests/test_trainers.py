"""Trainers call a live rmserve: TRL's real GRPOTrainer; OpenRLHF-shaped /get_reward traffic."""

from __future__ import annotations

import importlib.util
import math
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from rmserve.adapters.trl import AsyncTRLRewardFunction, TRLRewardFunction, trl_items
from rmserve.client import RewardClient
from tests.support.server import REPO, serve
from tests.support.tiny import corpus


def load_example() -> ModuleType:
    """The GRPO example's tiny policy and config builders: the test trains what the example trains."""
    path = REPO / "examples" / "grpo_remote_reward.py"
    spec = importlib.util.spec_from_file_location("grpo_remote_reward", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recording(TRLRewardFunction):
    """The sync adapter, keeping what TRL passed and what it got back, call by call."""

    calls: list[tuple[list[Any], list[Any], list[float]]]

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        rewards = super().__call__(prompts, completions, **kwargs)
        self.calls.append((list(prompts), list(completions), rewards))
        return rewards


class AsyncRecording(AsyncTRLRewardFunction):
    calls: list[tuple[list[Any], list[Any], list[float]]]

    async def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        rewards = await super().__call__(prompts, completions, **kwargs)
        self.calls.append((list(prompts), list(completions), rewards))
        return rewards


def test_trl_grpo_trainer_optimizes_against_the_live_server(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    from trl import GRPOTrainer
    from trl.trainer.utils import get_callable_name, is_async_callable

    example = load_example()
    steps = 3
    with serve({"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_CACHE": "off"}, tmp_path) as server:
        sync_rf = Recording(server.url, chunk_size=3)  # 8 completions -> 3 requests per call
        async_rf = AsyncRecording(server.url, name="rmserve_async")
        sync_rf.calls, async_rf.calls = [], []
        assert get_callable_name(sync_rf) == "rmserve" and not is_async_callable(sync_rf)
        assert is_async_callable(async_rf)
        items_before = server.metric("rmserve_items_scored_total")
        requests_before = server.metric("rmserve_requests_total", 'route="/v1/score",code="200"')

        tokenizer = example.build_tokenizer()
        trainer = GRPOTrainer(
            model=example.build_policy(tokenizer),
            processing_class=tokenizer,
            reward_funcs=[sync_rf, async_rf],
            args=example.grpo_config(
                tmp_path / "out", steps=steps, batch=8, generations=4, completion_len=6, learning_rate=1e-2
            ),
            train_dataset=example.prompt_dataset(steps * 8),
        )
        assert trainer._has_async_funcs  # TRL saw the coroutine and runs it on its own event loop
        trainer.train()

        # Both functions were called once per step, with the same completions, and agree.
        assert len(sync_rf.calls) == len(async_rf.calls) == steps
        for (p1, c1, r1), (p2, c2, r2) in zip(sync_rf.calls, async_rf.calls, strict=True):
            assert (p1, c1) == (p2, c2) and len(c1) == 8
            assert r1 == pytest.approx(r2, abs=1e-6)

        # The server received every completion of every step, from both functions, and ran the model on
        # them. Identical items in flight (or landed < 0.5 s ago) are scored once, so the model count is a
        # range: at least the distinct completions of one step, at most all of them twice.
        requests = server.metric("rmserve_requests_total", 'route="/v1/score",code="200"') - requests_before
        assert requests == steps * (3 + 1)  # 3 chunks (sync) + 1 request (async) per step
        n = sum(len(c) for _, c, _ in sync_rf.calls)
        distinct_first = len({(p, c) for p, c in zip(*sync_rf.calls[0][:2], strict=True)})
        assert distinct_first <= server.metric("rmserve_items_scored_total") - items_before <= 2 * n

        # What the trainer logged is what the service says for the same texts.
        with RewardClient(server.url) as client:
            for prompts, completions, rewards in sync_rf.calls:
                again = client.score(trl_items(prompts, completions))
                assert again == pytest.approx(rewards, abs=1e-6)
            logged = [h for h in trainer.state.log_history if "rewards/rmserve/mean" in h]
            assert len(logged) == steps
            for h, (_, _, rewards) in zip(logged, sync_rf.calls, strict=True):
                assert h["rewards/rmserve/mean"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)
                assert h["rewards/rmserve_async/mean"] == pytest.approx(h["rewards/rmserve/mean"], abs=1e-5)
            # TRL's completion table holds the last step's completions with the rewards it used.
            last = list(trainer._logs["completion"])
            table = list(trainer._logs["rewards"]["rmserve"])
            again = client.score(trl_items(list(trainer._logs["prompt"]), last))
            assert again == pytest.approx(table, abs=1e-6)
        assert all(not math.isnan(r) for _, _, rs in sync_rf.calls for r in rs)


def test_openrlhf_shaped_traffic_gets_its_rewards_in_order_and_batched(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    """32 clients, one sample each, as OpenRLHF's remote RM caller sends them (plain HTTP POSTs)."""
    sentences = corpus()
    n = 32
    prompts = [f"Human: {sentences[i * 7 % len(sentences)]}\n\nAssistant:" for i in range(n)]
    responses = [sentences[(i * 11 + 3) % len(sentences)] for i in range(n)]
    # What the policy rendered: prompt, response, EOS and right padding.
    queries = [f"{prompts[i]} {responses[i]}</s>" + "<pad>" * (i % 3) for i in range(n)]
    labels = [f"label {i}" for i in range(n)]

    env = {"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_CACHE": "off", "RMSERVE_MAX_WAIT_MS": "50"}
    with serve(env, tmp_path) as server:
        batches_before = server.metric("rmserve_batch_size_count")
        got: list[dict[str, Any] | None] = [None] * n
        start = threading.Barrier(n)

        def trainer_rank(i: int) -> None:
            start.wait()
            resp = httpx.post(
                server.url + "/get_reward",
                timeout=180,
                json={"query": [queries[i]], "prompts": [prompts[i]], "labels": [labels[i]]},
            )
            assert resp.status_code == 200, resp.text
            got[i] = resp.json()

        threads = [threading.Thread(target=trainer_rank, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batches = server.metric("rmserve_batch_size_count") - batches_before

        with RewardClient(server.url) as client:
            expected = client.score(list(zip(prompts, responses, strict=True)))
            # The client's get_reward sends the same protocol, chunked: the same answers.
            assert client.get_reward(queries, prompts, labels) == pytest.approx(expected, abs=1e-6)

    assert all(g is not None for g in got)
    rewards = [g["rewards"][0] for g in got if g is not None]
    assert rewards == pytest.approx(expected, abs=1e-6)
    assert len(set(round(r, 6) for r in rewards)) > n // 4, "rewards barely differ: a mix-up would not show"
    for g in got:
        assert g is not None and len(g["rewards"]) == len(g["scores"]) == 1
        assert all(len(v) == 1 for v in g["extra_logs"].values())
    assert batches < n, f"{n} concurrent one-sample requests ran as {batches} batches: nothing was batched"


def test_verl_compute_score_reads_the_prompt_from_extra_info(
    tiny_bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rmserve.adapters import verl

    sentences = corpus()
    questions, solutions = sentences[:6], sentences[10:16]
    with serve({"RMSERVE_MODELS": str(tiny_bundles["bert"])}, tmp_path) as server:
        monkeypatch.setenv("RMSERVE_URL", server.url)  # veRL imports the function by path: config is env
        extras: list[dict[str, Any]] = [
            {"question": questions[0]},
            {"prompt": questions[1], "index": 1},
            {"prompt": [{"role": "user", "content": questions[2]}]},
            {"query": questions[3]},
            {"problem": questions[4]},
            {"split": "train"},
        ]
        one_by_one = [verl.compute_score("hh", s, None, e) for s, e in zip(solutions, extras, strict=True)]
        batch = verl.compute_score_batch(["hh"] * 6, solutions, [None] * 6, extras)
        with RewardClient(server.url) as client:
            pairs: list[Any] = [(q, s) for q, s in zip(questions[:5], solutions[:5], strict=True)]
            pairs[2] = ([{"role": "user", "content": questions[2]}], solutions[2])  # messages stay messages
            expected = client.score([*pairs, {"text": solutions[5]}])
    assert one_by_one == pytest.approx(expected, abs=1e-6)
    assert batch == pytest.approx(expected, abs=1e-6)
