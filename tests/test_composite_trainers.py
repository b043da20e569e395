"""Each trainer's adapter surfaces a served composite's components, against a live server: TRL's real
GRPOTrainer with one reward function per component and the composite's weights, veRL's reward manager
and compute_score (``reward_extra_info``), and OpenRLHF's reward-function file (``extra_logs``).

The server serves the shipped default model, a tiny random-init Llama and a composite of both with a
length rule and a label check; expected values come from the composite's own ``/v1/score``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rmserve.adapters.trl_composite import trl_composite_reward_funcs
from rmserve.bundle import default_bundle_path
from tests.support.server import ServerProcess, serve
from tests.test_trainers import Rows, load_example, verl_row

COMPOSITES = """
composites:
  trainer-mix:
    components:
      - {name: helpful, bundle: default, weight: 1.0, normalize: {kind: affine, scale: 0.5, shift: 0.0}}
      - {name: safety, bundle: llama, weight: 0.5}
      - {name: length, rule: length, tokenizer: default, target: 4, weight: 0.25}
      - {name: correct, rule: label_match, extract: last_number, weight: 2.0, on_error: skip}
  strictest:
    combine: min
    components:
      - {name: helpful, bundle: default}
      - {name: safety, bundle: llama}
"""
NAMES = ["helpful", "safety", "length", "correct"]


@pytest.fixture(scope="module")
def server(
    tiny_bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("composite-trainers")
    (tmp / "composites.yaml").write_text(COMPOSITES)
    env = {
        "RMSERVE_MODELS": f"default={default_bundle_path()},llama={tiny_bundles['llama']}",
        "RMSERVE_COMPOSITES": str(tmp / "composites.yaml"),
        "RMSERVE_CACHE": "off",
    }
    with serve(env, tmp) as running:
        yield running


def _score(server: ServerProcess, items: list[dict[str, Any]]) -> dict[str, Any]:
    reply = httpx.post(server.url + "/v1/score", json={"model": "trainer-mix", "items": items}, timeout=60)
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def test_trl_trains_on_one_reward_function_per_component_weighted_as_the_composite(
    server: ServerProcess, tmp_path: Path
) -> None:
    from trl import GRPOTrainer

    example = load_example()
    steps = 2
    funcs, weights = trl_composite_reward_funcs(server.url, model="trainer-mix")
    assert [f.__name__ for f in funcs] == NAMES and weights == [1.0, 0.5, 0.25, 2.0]
    with pytest.raises(ValueError, match="combines by min"):
        trl_composite_reward_funcs(server.url, model="strictest")
    before = server.metric("rmserve_requests_total", 'route="/v1/score",code="200"')

    tokenizer = example.build_tokenizer()
    dataset = example.prompt_dataset(steps * 8)
    dataset = dataset.add_column(
        "label", ["3"] * len(dataset)
    )  # the same for every row: the sampler shuffles
    trainer = GRPOTrainer(
        model=example.build_policy(tokenizer),
        processing_class=tokenizer,
        reward_funcs=funcs,
        args=example.grpo_config(
            tmp_path / "out",
            steps=steps,
            batch=8,
            generations=4,
            completion_len=6,
            learning_rate=1e-2,
            reward_weights=weights,
        ),
        train_dataset=dataset,
    )
    trainer.train()

    # One /v1/score per generation batch: the four functions shared one answer.
    assert server.metric("rmserve_requests_total", 'route="/v1/score",code="200"') - before == steps
    logged = [h for h in trainer.state.log_history if "rewards/helpful/mean" in h]
    assert len(logged) == steps and all(f"rewards/{n}/mean" in h for h in logged for n in NAMES)
    # TRL's table of the last step: each function's rewards are the composite's normalised values for
    # the same completions, and TRL's weighted sum of them is the composite's score.
    prompts, completions = list(trainer._logs["prompt"]), list(trainer._logs["completion"])
    items = [{"prompt": p, "response": c, "label": "3"} for p, c in zip(prompts, completions, strict=True)]
    again = _score(server, items)
    for name in NAMES:
        assert list(trainer._logs["rewards"][name]) == pytest.approx(again["normalized"][name], abs=1e-6)
    table = [
        sum(w * trainer._logs["rewards"][n][i] for n, w in zip(NAMES, weights, strict=True))
        for i in range(len(items))
    ]
    assert table == pytest.approx(again["scores"], abs=1e-5)


def test_verl_manager_and_compute_score_return_each_component_in_reward_extra_info(
    server: ServerProcess, tiny_bundles: dict[str, Path]
) -> None:
    from transformers import AutoTokenizer

    from rmserve.adapters import verl
    from rmserve.adapters.verl_manager import RMServeRewardManager

    tokenizer = AutoTokenizer.from_pretrained(tiny_bundles["llama"].parent / "checkpoint")
    messages = [{"role": "user", "content": "what is six times seven"}]
    answer = "it is 42"
    config = {
        "reward": {
            "reward_kwargs": {"rmserve_url": server.url, "rmserve_model": "trainer-mix"},
            "custom_reward_function": {},
        }
    }
    manager = RMServeRewardManager(config=config, tokenizer=tokenizer, compute_score=None)
    row = verl_row(tokenizer, messages, answer)
    row.non_tensor_batch["reward_model"] = {"style": "rule", "ground_truth": "42"}
    out = asyncio.run(manager.run_single(Rows([row])))
    response = tokenizer.decode(tokenizer.encode(answer, add_special_tokens=False), skip_special_tokens=True)
    assert response == answer  # what the manager decodes, the number included
    expected = _score(
        server, [{"messages": [*messages, {"role": "assistant", "content": response}], "label": "42"}]
    )
    info = out["reward_extra_info"]
    assert out["reward_score"] == pytest.approx(expected["scores"][0], abs=1e-6)
    for name in NAMES:
        assert info[f"rmserve_{name}"] == pytest.approx(expected["components"][name][0], abs=1e-6)
        assert info[f"rmserve_{name}_normalized"] == pytest.approx(expected["normalized"][name][0], abs=1e-6)
    assert info["rmserve_correct"] == 1.0  # the ground truth reached the label check

    # compute_score: ground_truth is the label; without one the label check is skipped, and NaN keeps
    # the keys the same for every sample (veRL concatenates them).
    kwargs = {"rmserve_url": server.url, "rmserve_model": "trainer-mix"}
    extra = {"question": "what is six times seven"}
    labelled = asyncio.run(verl.compute_score("math", "it is 42", 42, extra, **kwargs))
    unlabelled = asyncio.run(verl.compute_score("math", "it is 42", None, extra, **kwargs))
    assert set(labelled) == set(unlabelled) and labelled["rmserve_correct"] == 1.0
    assert math.isnan(unlabelled["rmserve_correct"]) and math.isnan(unlabelled["rmserve_correct_normalized"])
    assert labelled["score"] == pytest.approx(unlabelled["score"] + 2.0, abs=1e-6)


def test_openrlhf_reward_function_file_logs_each_component_when_told_the_composite(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rmserve.adapters import openrlhf_reward

    prompt = "\n\nHuman: what is six times seven?\n\nAssistant:"
    query = prompt + " it is 42"
    monkeypatch.setenv("RMSERVE_URL", server.url)
    monkeypatch.setenv("RMSERVE_MODEL", "trainer-mix")
    out = openrlhf_reward.reward_func([query], [prompt], ["42"])
    expected = _score(server, [{"prompt": prompt, "response": "it is 42", "label": "42"}])
    assert out["rewards"].tolist() == pytest.approx(expected["scores"], abs=1e-5)
    for name in NAMES:
        assert out["extra_logs"][name].tolist() == pytest.approx(expected["components"][name], abs=1e-5)
