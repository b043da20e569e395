"""Trainers call a live rmserve: TRL's real GRPOTrainer, OpenRLHF-shaped /get_reward traffic and its
reward-function file, veRL's compute_score and reward manager in the shapes veRL calls them."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import math
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest

from rmserve.adapters.trl import TRLRewardFunction, async_trl_reward_func, trl_items
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


def test_trl_grpo_trainer_optimizes_against_the_live_server(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    from trl import GRPOTrainer

    example = load_example()
    steps = 3
    with serve({"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_CACHE": "off"}, tmp_path) as server:
        sync_rf = Recording(server.url, chunk_size=3)  # 8 completions -> 3 requests per call
        async_rf = async_trl_reward_func(server.url, name="rmserve_async")
        sync_rf.calls = []
        assert sync_rf.__name__ == "rmserve" and not inspect.iscoroutinefunction(sync_rf)
        # TRL 1.0-1.13 test inspect.iscoroutinefunction (trl 1.0.0 trl/trainer/grpo_trainer.py, __init__
        # and _calculate_rewards), later ones asyncio.iscoroutinefunction or __call__: both see it.
        assert inspect.iscoroutinefunction(async_rf) and asyncio.iscoroutinefunction(async_rf)
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

        assert len(sync_rf.calls) == steps and all(len(c) == 8 for _, c, _ in sync_rf.calls)

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
                # The async function scored the same completions: the same mean.
                assert h["rewards/rmserve_async/mean"] == pytest.approx(h["rewards/rmserve/mean"], abs=1e-5)
                # TRL passes log_metric: the share the server truncated, under each function's name.
                assert h["rmserve/truncated"] == 0.0 and h["rmserve_async/truncated"] == 0.0
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


def test_trl_tool_calling_completions_are_scored_by_encoder_and_chat_template_bundles(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    """TRL's tool-calling GRPO completions (trl 1.16 ``GRPOTrainer._tool_call_loop``): an assistant turn
    with ``tool_calls``, a ``{"role": "tool", "name", "content"}`` turn, then the final reply."""
    prompts = [[{"role": "user", "content": "What is 12 + 30?"}]] * 2
    completions = [
        [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}
                ],
            },
            {"role": "tool", "name": "add", "content": "42"},
            {"role": "assistant", "content": "It is 42."},
        ],
        [{"role": "assistant", "content": "It is 42."}],
    ]
    models = f"bert={tiny_bundles['bert']},llama={tiny_bundles['llama']}"
    with serve({"RMSERVE_MODELS": models, "RMSERVE_CACHE": "off"}, tmp_path) as server:
        for model in ("bert", "llama"):
            logged: list[tuple[str, float]] = []
            rf = TRLRewardFunction(server.url, model=model)
            rewards = rf(
                prompts, completions, log_metric=lambda name, value, into=logged: into.append((name, value))
            )
            assert len(rewards) == 2 and rewards[0] != rewards[1]
            assert logged == [(f"rmserve_{model}/truncated", 0.0)]


class Row:
    """What veRL's ``DataProto[i]`` gives (``DataProtoItem``): ``batch`` tensors, ``non_tensor_batch``."""

    def __init__(self, batch: dict[str, Any], non_tensor_batch: dict[str, Any]) -> None:
        self.batch = batch
        self.non_tensor_batch = non_tensor_batch


class Rows:
    """A one-trajectory ``DataProto`` as veRL's reward loop hands it to ``run_single``.

    veRL cannot be installed here (it needs a GPU stack), so this mirrors the parts its reward managers
    read (verl-project/verl ``verl/experimental/reward_loop/reward_manager/naive.py``, ``run_single``:
    ``data[-1:][0]``, ``batch["responses"]``, ``batch["attention_mask"]``, ``non_tensor_batch``) and
    what its dataset keeps (``verl/utils/dataset/rl_dataset.py``: ``raw_prompt``, chat messages).
    """

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | slice) -> Any:
        return Rows(self.rows[key]) if isinstance(key, slice) else self.rows[key]


def verl_row(tokenizer: Any, messages: list[dict[str, str]] | None, response: str, width: int = 32) -> Row:
    import torch

    ids = tokenizer.encode(response, add_special_tokens=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    responses = torch.tensor(ids + [pad] * (width - len(ids)))
    prompt_mask = [1] * 5
    mask = torch.tensor(prompt_mask + [1] * len(ids) + [0] * (width - len(ids)))
    columns: dict[str, Any] = {
        "data_source": "Dahoas/full-hh-rlhf",
        "reward_model": {"style": "model", "ground_truth": "unused"},
        "extra_info": {"split": "train", "index": 0},  # what veRL's HH preprocessing keeps
    }
    if messages is not None:
        columns["raw_prompt"] = np.array(messages, dtype=object)  # parquet rows come back as arrays
    return Row({"responses": responses, "attention_mask": mask}, columns)


def test_verl_reward_manager_scores_the_raw_prompt_with_the_response(
    tiny_bundles: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoTokenizer

    from rmserve.adapters import verl
    from rmserve.adapters.verl_manager import RMServeRewardManager

    tokenizer = AutoTokenizer.from_pretrained(tiny_bundles["bert"].parent / "checkpoint")
    question, answer = "Can you help me?", "sure, here is how."
    messages = [{"role": "user", "content": question}]
    with serve({"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_CACHE": "off"}, tmp_path) as server:
        # veRL builds the manager with its config, tokenizer and compute_score (verl/trainer/ppo/reward.py
        # load_reward_manager); settings ride in reward.reward_kwargs.
        config = {"reward": {"reward_kwargs": {"rmserve_url": server.url}, "custom_reward_function": {}}}
        manager = RMServeRewardManager(config=config, tokenizer=tokenizer, compute_score=None)
        out = asyncio.run(manager.run_single(Rows([verl_row(tokenizer, messages, answer)])))
        with RewardClient(server.url) as client:
            expected = client.score([[*messages, {"role": "assistant", "content": answer}]])[0]
        assert out["reward_score"] == pytest.approx(expected, abs=1e-6)
        assert out["reward_extra_info"] == {"score": out["reward_score"], "rmserve_prompt_blind": 0.0}

        # A row without its prompt: scored alone, counted, warned about once.
        verl._warned_blind = False
        with caplog.at_level("WARNING", logger="rmserve.adapters.verl"):
            blind = [
                asyncio.run(manager.run_single(Rows([verl_row(tokenizer, None, answer)]))) for _ in range(2)
            ]
        assert [b["reward_extra_info"]["rmserve_prompt_blind"] for b in blind] == [1.0, 1.0]
        assert sum("without their prompts" in r.message for r in caplog.records) == 1


def test_verl_compute_score_is_async_takes_reward_kwargs_and_refuses_blind_samples_when_told(
    tiny_bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """veRL merges ``reward.custom_reward_function.reward_kwargs`` into each call and awaits coroutine
    functions (verl-project/verl ``verl/trainer/ppo/reward.py`` ``get_custom_reward_fn``; reward-loop
    ``naive.py``: ``inspect.iscoroutinefunction``, keyword-only ``data_source``, ``solution_str``,
    ``ground_truth``, ``extra_info``)."""
    from rmserve.adapters import verl

    assert inspect.iscoroutinefunction(verl.compute_score)
    monkeypatch.delenv("RMSERVE_URL", raising=False)
    sentences = corpus()
    questions, solutions = sentences[:6], sentences[10:16]
    extras: list[dict[str, Any]] = [
        {"question": questions[0]},
        {"prompt": questions[1], "index": 1},
        {"prompt": [{"role": "user", "content": questions[2]}]},
        {"query": questions[3]},
        {"problem": questions[4]},
        {"split": "train"},
    ]
    with serve({"RMSERVE_MODELS": str(tiny_bundles["bert"])}, tmp_path) as server:
        kwargs = {"rmserve_url": server.url}

        async def step() -> list[dict[str, float]]:
            calls = [
                verl.compute_score(
                    data_source="hh", solution_str=s, ground_truth=None, extra_info=e, **kwargs
                )
                for s, e in zip(solutions, extras, strict=True)
            ]
            return list(await asyncio.gather(*calls))

        awaited = asyncio.run(step())
        with RewardClient(server.url) as client:
            pairs: list[Any] = [(q, s) for q, s in zip(questions[:5], solutions[:5], strict=True)]
            pairs[2] = ([{"role": "user", "content": questions[2]}], solutions[2])  # messages stay messages
            expected = client.score([*pairs, {"text": solutions[5]}])
        assert [r["score"] for r in awaited] == pytest.approx(expected, abs=1e-6)
        assert [r["rmserve_prompt_blind"] for r in awaited] == [0.0] * 5 + [1.0]
        assert all(set(r) == {"score", "rmserve_prompt_blind"} for r in awaited)  # the same keys each time

        # Releases that call compute_score without awaiting, and the batch manager; the environment as
        # the fallback for settings.
        monkeypatch.setenv("RMSERVE_URL", server.url)
        one_by_one = [
            verl.compute_score_sync("hh", s, None, e) for s, e in zip(solutions, extras, strict=True)
        ]
        batch = verl.compute_score_batch(["hh"] * 6, solutions, [None] * 6, extras)
        assert [r["score"] for r in one_by_one] == pytest.approx(expected, abs=1e-6)
        assert [r["score"] for r in batch] == pytest.approx(expected, abs=1e-6)

        with pytest.raises(verl.PromptMissing, match="no prompt reached the reward function"):
            asyncio.run(
                verl.compute_score("hh", solutions[5], None, {"split": "train"}, rmserve_require_prompt=True)
            )


def test_openrlhf_reward_function_file_sends_the_bearer_key_and_returns_tensors(
    tiny_bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loaded as OpenRLHF 0.11.2 loads ``--reward.remote_url file.py`` (OpenRLHF/OpenRLHF
    ``openrlhf/utils/agent.py``: ``spec_from_file_location("reward_func", path)``, then
    ``reward_func([query], [prompt], [label])`` in a thread)."""
    import torch

    from rmserve.adapters import openrlhf_reward

    spec = importlib.util.spec_from_file_location("reward_func", openrlhf_reward.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prompt = "Human: Can you help me?\n\nAssistant:"
    query = prompt + " Sure, here is how.</s>"
    env = {"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_API_KEYS": "k1"}
    with serve(env, tmp_path) as server:
        monkeypatch.setenv("RMSERVE_URL", server.url)
        monkeypatch.setenv("RMSERVE_API_KEY", "k1")
        out = module.reward_func([query], [prompt], [{"answer": 42}])
        unauthenticated = httpx.post(server.url + "/get_reward", json={"query": [query]}, timeout=30)
        with RewardClient(server.url, api_key="k1") as client:
            expected = client.get_reward([query], [prompt])
    assert unauthenticated.status_code == 401  # what OpenRLHF's own HTTP caller would get here
    assert isinstance(out["rewards"], torch.Tensor) and out["rewards"].tolist() == pytest.approx(
        expected, abs=1e-6
    )
    assert out["scores"].tolist() == pytest.approx(expected, abs=1e-6)
    assert set(out["extra_logs"]) >= {"rm_tokens", "rm_truncated", "rm_retemplated"}
