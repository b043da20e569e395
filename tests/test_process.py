"""Process reward models served end to end: tiny real PRMs of every head form, exported, served by a
real rmserve with a real Redis cache, called over HTTP beside an outcome model."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from rmserve.bundle import load_bundle
from rmserve.items import Message, StepsItem
from rmserve.kinds import aggregate_steps
from tests.support.process import SOLUTIONS, encoded, flat, torch_step_values
from tests.support.redis import delete_prefix, shared_redis_url, unique_prefix
from tests.support.server import ServerProcess, serve

# Served names of the bundles: the default one is a 2-label token classifier (PURE-PRM's form).
NAMES = {"default": "qwen2-tc2", "tc1": "llama-tc1", "lm": "llama-lm", "prm": "qwen2-prm"}


def steps_json(item: StepsItem) -> dict[str, Any]:
    prompt: Any = item.prompt
    if not isinstance(prompt, str):
        prompt = [{"role": m.role, "content": m.content} for m in prompt]
    return {"prompt": prompt, "steps": list(item.steps)}


@pytest.fixture(scope="module")
def prm(
    process_bundles: dict[str, Path],
    tiny_bundles: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("prm")
    url, how = shared_redis_url(tmp)
    if url is None:
        pytest.skip(how)
    prefix = unique_prefix()
    models = [f"{name}={process_bundles[form]}" for name, form in NAMES.items()]
    env = {
        "RMSERVE_MODELS": ",".join([*models, f"outcome={tiny_bundles['llama']}"]),
        "RMSERVE_PRECISION": "fp32",
        "RMSERVE_REDIS_URL": url,
        "RMSERVE_CACHE_PREFIX": prefix,
        "RMSERVE_MAX_WAIT_MS": "20",
    }
    try:
        with serve(env, tmp) as server:
            yield server
    finally:
        delete_prefix(url, prefix)


def score(server: ServerProcess, model: str, items: list[dict[str, Any]], **extra: Any) -> httpx.Response:
    body = {"model": model, "items": items, **extra}
    return httpx.post(server.url + "/v1/score", json=body, timeout=120)


@pytest.mark.parametrize("name", list(NAMES))
def test_served_step_scores_equal_pytorch_at_the_step_tokens_with_outcome_items_in_flight(
    name: str, prm: ServerProcess, process_bundles: dict[str, Path]
) -> None:
    bundle = process_bundles[NAMES[name]]
    assert load_bundle(bundle).manifest.padding == "right"  # the lean graph: the batcher pads right
    tag = f" ({name})"  # items of this test only: nothing comes from the cache
    items = [StepsItem(s.prompt, (*s.steps[:-1], s.steps[-1] + tag)) for s in SOLUTIONS]
    expected = torch_step_values(bundle, list(items))
    outcome_items = [{"prompt": f"question {i}{tag}", "response": "answer " * (i + 1)} for i in range(24)]

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=prm.url, timeout=120) as client:
            # Outcome items of another bundle in flight, and each process item alone and all together,
            # so they share padded batches with items of every length.
            calls = [client.post("/v1/score", json={"model": "outcome", "items": outcome_items})]
            calls += [
                client.post("/v1/score", json={"model": name, "items": [steps_json(i)]}) for i in items[:2]
            ]
            calls.append(
                client.post("/v1/score", json={"model": name, "items": [steps_json(i) for i in items]})
            )
            return list(await asyncio.gather(*calls))

    outcome, *alone, crowd = asyncio.run(together())
    assert outcome.status_code == 200 and "step_scores" not in outcome.json(), outcome.text
    assert all(r.status_code == 200 for r in [*alone, crowd]), [r.text for r in [*alone, crowd]]
    body = crowd.json()
    got = body["step_scores"]
    served = encoded(bundle, list(items))  # tc1's max_length of 64 drops trailing steps of the long ones
    assert [len(s) for s in got] == [len(e.positions) for e in served]
    np.testing.assert_allclose(flat(got), flat(expected), rtol=1e-4, atol=1e-4)
    for response, steps in zip(alone, got, strict=False):
        np.testing.assert_allclose(response.json()["step_scores"][0], steps, rtol=1e-5, atol=1e-5)
    assert body["scores"] == [min(s) for s in got]  # min is the default aggregate
    # Truncated items too score as PyTorch does on the ids kept.
    assert body["usage"]["steps_dropped"] == sum(e.dropped for e in served)
    assert body["usage"]["truncated"] == sum(e.truncated for e in served)


def test_every_aggregate_is_computed_from_the_same_step_scores(prm: ServerProcess) -> None:
    items = [steps_json(s) for s in SOLUTIONS]
    first = score(prm, "default", items).json()
    steps = first["step_scores"]
    for how, expected in (
        ("min", [min(s) for s in steps]),
        ("last", [s[-1] for s in steps]),
        ("mean", [sum(s) / len(s) for s in steps]),
        ("prod", [math.prod(s) for s in steps]),
    ):
        body = score(prm, "default", items, step_aggregate=how).json()
        assert body["step_scores"] == steps
        np.testing.assert_allclose(body["scores"], expected, rtol=1e-12)
        assert body["scores"] == [aggregate_steps(s, how) for s in steps]  # type: ignore[arg-type]


def test_a_cache_hit_returns_the_same_step_scores_for_any_aggregate(prm: ServerProcess) -> None:
    items = [steps_json(StepsItem(s.prompt, (*s.steps, "Cached."))) for s in SOLUTIONS]
    cold = score(prm, "lm", items).json()
    warm = score(prm, "lm", items, step_aggregate="last").json()
    assert cold["usage"]["cache_hits"] == 0 and warm["usage"]["cache_hits"] == len(items)
    assert warm["step_scores"] == cold["step_scores"]
    assert warm["scores"] == [s[-1] for s in cold["step_scores"]]
    # One more step is another item: the key holds every step.
    longer = [{**i, "steps": [*i["steps"], "One more."]} for i in items]
    assert score(prm, "lm", longer).json()["usage"]["cache_hits"] == 0


def test_text_carrying_the_step_tokens_scores_as_the_steps_item_it_renders(
    prm: ServerProcess, process_bundles: dict[str, Path]
) -> None:
    from tokenizers import Tokenizer

    bundle = process_bundles["qwen2-tc2"]
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    item = SOLUTIONS[0]
    enc = encoded(bundle, [item])[0]
    text = tokenizer.decode(list(enc.ids), skip_special_tokens=False)
    as_steps = score(prm, "default", [steps_json(item)]).json()["step_scores"]
    as_text = score(prm, "default", [{"text": text}]).json()["step_scores"]
    np.testing.assert_allclose(as_text, as_steps, rtol=1e-6, atol=1e-6)


def test_items_of_the_other_kind_are_422s_that_say_which_kind_the_model_is(prm: ServerProcess) -> None:
    cases = [
        ("outcome", [{"prompt": "q", "steps": ["a"]}], "outcome model"),
        ("default", [{"prompt": "q", "response": "a"}], "process reward model"),
        (
            "default",
            [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
            "process reward model",
        ),
        ("default", [{"text": "no step token here"}], "process reward model"),
        (
            "default",
            [{"prompt": "q", "steps": ["a <extra_0> b", "c"]}],
            "must appear once after each of its 2",
        ),
        ("default", [{"prompt": "where <extra_0>", "steps": ["a"]}], "a prompt or step may not contain it"),
    ]
    for model, items, words in cases:
        response = score(
            prm,
            model,
            [
                {"prompt": "fine", "steps": ["ok"]}
                if model != "outcome"
                else {"prompt": "fine", "response": "ok"},
                *items,
            ],
        )
        assert response.status_code == 422, (model, items, response.text)
        message = response.json()["error"]["message"]
        assert message.startswith("items[1]") and words in message, message
    wrong = score(prm, "outcome", [{"prompt": "q", "response": "a"}], step_aggregate="min")
    assert wrong.status_code == 422 and "outcome model" in wrong.json()["error"]["message"]
    for bad in (
        {"prompt": "q", "steps": []},
        {"prompt": "q", "steps": ["a"], "response": "b"},
        {"steps": ["a"]},
    ):
        response = score(prm, "default", [bad])
        assert response.status_code == 422 and "items[0]" in response.json()["error"]["message"], (
            response.text
        )
    assert score(prm, "default", [{"prompt": "q", "steps": ["a"]}], step_aggregate="max").status_code == 422


def test_truncation_cuts_the_prompt_first_then_drops_whole_trailing_steps_or_answers_413(
    prm: ServerProcess, process_bundles: dict[str, Path]
) -> None:
    bundle = process_bundles["llama-tc1"]  # max_length 64
    long_prompt = StepsItem("Explain this to me please " * 12, ("Step one.", "Step two."))
    long_steps = StepsItem(
        "Add them.", tuple(f"Then we add {i} and {i + 1} to get {2 * i + 1}." for i in range(12))
    )
    fits = StepsItem("Add them.", ("1 + 1 = 2.",))
    items = [long_prompt, long_steps, fits]
    body = score(prm, "tc1", [steps_json(i) for i in items]).json()
    kept = [len(s) for s in body["step_scores"]]
    assert kept[0] == 2 and kept[2] == 1  # the prompt was cut, every step kept
    assert 1 <= kept[1] < 12 and body["usage"]["steps_dropped"] == 12 - kept[1]
    assert body["usage"]["truncated"] == 2 and body["usage"]["tokens"] <= 3 * 64
    # The kept steps score exactly what PyTorch gives on the truncated ids (the leading steps' values).
    expected = torch_step_values(bundle, list(items))
    np.testing.assert_allclose(flat(body["step_scores"]), flat(expected), rtol=1e-4, atol=1e-4)
    strict = score(prm, "tc1", [steps_json(fits), steps_json(long_prompt)], truncation="error")
    assert strict.status_code == 413
    assert strict.json()["error"]["message"].startswith("items[1]") and "max_length of 64" in strict.text
    assert score(prm, "tc1", [steps_json(fits)], truncation="error").status_code == 200


def test_a_conversation_prompt_over_max_length_loses_whole_old_turns_before_any_token(
    prm: ServerProcess, process_bundles: dict[str, Path]
) -> None:
    bundle = process_bundles["llama-tc1"]  # max_length 64
    system, latest = Message("system", "Be brief."), Message("user", "And 2 + 2?")
    old = (Message("user", "What is one plus one, spelled out? " * 3), Message("assistant", "Two."))
    steps = ("2 + 2 = 4.", "So 4.")
    long = StepsItem((system, *old, latest), steps)
    assert len(encoded(bundle, [StepsItem((system, latest), steps)])[0]) <= 64 < sum(len(m.text) for m in old)
    body = score(prm, "tc1", [steps_json(long)]).json()
    # Scored as the conversation without its oldest whole turns, rendered by the template.
    expected = torch_step_values(bundle, [StepsItem((system, latest), steps)])
    np.testing.assert_allclose(body["step_scores"], expected, rtol=1e-4, atol=1e-4)
    assert body["usage"]["truncated"] == 1 and body["usage"]["steps_dropped"] == 0
    assert body["usage"]["tokens"] == len(encoded(bundle, [StepsItem((system, latest), steps)])[0])


def test_v1_models_shows_each_models_kind_step_token_and_rule(prm: ServerProcess) -> None:
    models = {m["id"]: m for m in httpx.get(prm.url + "/v1/models", timeout=30).json()["data"]}
    assert models["outcome"]["kind"] == "outcome" and "step_token" not in models["outcome"]
    assert models["default"]["kind"] == "process" and models["default"]["step_token"] == "<extra_0>"
    assert models["default"]["step_rule"] == "positive_prob" and models["tc1"]["step_rule"] == "sigmoid"
    assert models["lm"]["step_token"] == "ки" and models["lm"]["manifest"]["process"]["label_tokens"] == [
        "+",
        "-",
    ]
    assert models["lm"]["step_head"] == "lm_head" and models["default"]["step_head"] == "token_classification"


def test_a_process_model_under_get_reward_scores_each_responses_steps_split_at_blank_lines(
    prm: ServerProcess,
) -> None:
    steps = ["3 * 4 = 12.", "2 + 12 = 14.", "The answer is 14."]
    # A Qwen policy's ChatML, decoded with its special tokens: its messages are read back.
    chatml = (
        "<|im_start|>user\nWhat is 2 + 3 * 4?<|im_end|>\n<|im_start|>assistant\n"
        + "\n\n".join(steps)
        + "<|im_end|>\n<|endoftext|>"
    )
    plain_prompt = "Add 12 and 30."
    body = {"query": [chatml, plain_prompt + " 12 + 30 = 42.\n\nSo 42."], "prompts": ["", plain_prompt]}
    reward = httpx.post(prm.url + "/get_reward", json=body, timeout=60).json()
    direct = score(
        prm,
        "default",
        [
            {"prompt": [{"role": "user", "content": "What is 2 + 3 * 4?"}], "steps": steps},
            {"prompt": plain_prompt, "steps": ["12 + 30 = 42.", "So 42."]},
        ],
    ).json()
    assert reward["step_scores"] == direct["step_scores"]
    assert reward["rewards"] == reward["scores"] == direct["scores"]
    logs = reward["extra_logs"]
    assert logs["rm_steps"] == [3.0, 2.0] and logs["rm_steps_dropped"] == [0.0, 0.0]
    assert logs["rm_retemplated"] == [1.0, 0.0]
    assert logs["rm_step_min"] == direct["scores"]
    assert logs["rm_step_last"] == [s[-1] for s in direct["step_scores"]]
    assert all(len(v) == 2 for v in logs.values())  # one number per sample: what OpenRLHF logs
    unreadable = httpx.post(prm.url + "/get_reward", json={"query": ["no markup, no prompt"]}, timeout=60)
    assert unreadable.status_code == 422 and "query[0]" in unreadable.json()["error"]["message"]
    slime = {"prompt": plain_prompt, "response": "12 + 30 = 42.\n\nSo 42."}
    assert httpx.post(prm.url + "/v1/reward", json=slime, timeout=60).json() == direct["scores"][1]


def test_the_client_scores_steps_sync_and_async_and_refuses_an_outcome_answer(prm: ServerProcess) -> None:
    from rmserve.client import AsyncRewardClient, ProtocolError, RewardClient

    direct = score(prm, "default", [steps_json(s) for s in SOLUTIONS], step_aggregate="mean").json()
    shapes: list[Any] = [
        ("What is 2 + 3 * 4?", list(SOLUTIONS[0].steps)),  # (prompt, [step, ...])
        {"problem": "How many legs do 3 spiders have?", "steps": list(SOLUTIONS[1].steps)},  # ProcessBench's
        SOLUTIONS[2],
        steps_json(SOLUTIONS[3]),
        SOLUTIONS[4],
    ]
    with RewardClient(prm.url, chunk_size=2) as client:
        result = client.score_steps(shapes, aggregate="mean")
        assert result.step_scores == direct["step_scores"] and result.scores == direct["scores"]
        assert result.usage.items == len(SOLUTIONS) and result.usage.steps_dropped == 0
        assert client.score(shapes) == [min(s) for s in direct["step_scores"]]  # score(): the aggregates
        with pytest.raises(ProtocolError, match="not a process reward model"):
            client.score_steps([{"text": "a whole answer"}], model="outcome")

    async def run() -> Any:
        async with AsyncRewardClient(prm.url) as client:
            return await client.score_steps(shapes, aggregate="mean")

    assert asyncio.run(run()).step_scores == direct["step_scores"]


def test_trl_and_verl_adapters_hand_the_trainer_the_aggregate_of_each_solutions_steps(
    prm: ServerProcess,
) -> None:
    from rmserve.adapters import verl
    from rmserve.adapters.trl import StepScoring, async_trl_reward_func, trl_reward_func

    prompts: list[Any] = ["What is 2 + 3 * 4?", [{"role": "user", "content": "Add 12 and 30."}]]
    completions: list[Any] = [
        "3 * 4 = 12.\n\n2 + 12 = 14.\n\nThe answer is 14.",
        [{"role": "assistant", "content": "12 + 30 = 42.\n\nSo 42."}],
    ]
    steps = [["3 * 4 = 12.", "2 + 12 = 14.", "The answer is 14."], ["12 + 30 = 42.", "So 42."]]
    items = [{"prompt": "What is 2 + 3 * 4?", "steps": steps[0]}, {"prompt": prompts[1], "steps": steps[1]}]
    direct = score(prm, "default", items, step_aggregate="last").json()
    logged: dict[str, float] = {}
    reward = trl_reward_func(prm.url, steps=StepScoring(aggregate="last"))
    got = reward(prompts=prompts, completions=completions, log_metric=logged.__setitem__)
    assert got == direct["scores"] and logged == {"rmserve/truncated": 0.0, "rmserve/steps_dropped": 0.0}
    async_reward = async_trl_reward_func(prm.url, steps=StepScoring(aggregate="last"))
    assert asyncio.run(async_reward(prompts=prompts, completions=completions)) == direct["scores"]

    kwargs = {"rmserve_url": prm.url, "rmserve_steps": True, "rmserve_step_aggregate": "last"}
    extra = {"question": "What is 2 + 3 * 4?"}
    awaited = asyncio.run(verl.compute_score("math", completions[0], None, extra, **kwargs))
    assert awaited == {"score": direct["scores"][0], "rmserve_prompt_blind": 0.0, "rmserve_steps": 3.0}
    lines = "1 + 1 = 2.\n2 + 2 = 4."
    assert (
        verl.compute_score_sync("math", lines, None, extra, **kwargs)["rmserve_steps"] == 1.0
    )  # no blank line
    by_line = verl.compute_score_sync("math", lines, None, extra, **kwargs, rmserve_step_separator="\n")
    assert by_line["rmserve_steps"] == 2.0
    batch = verl.compute_score_batch(["math"] * 2, [completions[0]] * 2, [None] * 2, [extra, {}], **kwargs)
    assert batch[0] == awaited and batch[1]["rmserve_prompt_blind"] == 1.0


def test_trl_grpo_trainer_optimizes_against_a_process_reward_model(
    prm: ServerProcess, tmp_path: Path
) -> None:
    import importlib.util

    from trl import GRPOTrainer

    from rmserve.adapters.trl import TRLRewardFunction, trl_step_items
    from tests.support.server import REPO

    spec = importlib.util.spec_from_file_location("grpo_example", REPO / "examples" / "grpo_remote_reward.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    calls: list[tuple[list[Any], list[Any], list[float]]] = []

    class Recording(TRLRewardFunction):
        def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
            rewards = super().__call__(prompts, completions, **kwargs)
            calls.append((list(prompts), list(completions), rewards))
            return rewards

    tokenizer = example.build_tokenizer()
    trainer = GRPOTrainer(
        model=example.build_policy(tokenizer),
        processing_class=tokenizer,
        reward_funcs=[Recording(prm.url, steps=True)],
        args=example.grpo_config(
            tmp_path / "out", steps=1, batch=4, generations=2, completion_len=6, learning_rate=1e-2
        ),
        train_dataset=example.prompt_dataset(4),
    )
    trainer.train()
    assert len(calls) == 1 and len(calls[0][1]) == 4
    prompts, completions, rewards = calls[0]
    again = score(
        prm, "default", [steps_json(StepsItem(p, tuple(s))) for p, s in trl_step_items(prompts, completions)]
    )
    assert rewards == pytest.approx(again.json()["scores"], abs=1e-6)  # each completion's minimum step score
