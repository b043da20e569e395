"""The routes trainers' clients speak, in their own shapes, against a live server.

Request shapes are taken from the clients' sources (no trainer is installable here with its
dependencies; aiohttp, which OpenRLHF and slime post with, is not installed):
- OpenRLHF 0.11.2 (OpenRLHF/OpenRLHF ``openrlhf/utils/agent.py``, ``_fetch_rewards_via_http``): POST
  ``{"query": [...], "prompts": [...], "labels": [...]}``, 180 s timeout, 5 tries 1 s apart, reads
  ``rewards`` / ``scores`` / ``extra_logs``; ``labels`` is the dataset's label column as it is.
- slime (THUDM/slime ``slime/rollout/rm_hub/__init__.py``, ``remote_rm``): POST ``{"prompt", "response",
  "label"}`` to the full ``--rm-url``; the JSON answer is the reward (``slime/utils/types.py``).
- vLLM (vllm-project/vllm ``vllm/entrypoints/pooling/classify/protocol.py``): ``{"model", "input"}`` or
  ``{"messages"}`` with ``use_activation``; veRL's reward loop (verl-project/verl
  ``verl/experimental/reward_loop/reward_loop.py``) posts ``{"model", "input", "use_activation": false}``
  and reads ``data[-1]["probs"][-1]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rmserve.bundle import read_manifest, write_manifest
from rmserve.client import RewardClient
from rmserve.models.export import export_bundle
from tests.support.server import ServerProcess, serve
from tests.support.tiny import corpus

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}"
)
MESSAGES = [
    {"role": "system", "content": "The assistant explains the recipe for bread."},
    {"role": "user", "content": "Can you help me?"},
    {"role": "assistant", "content": "Sure, here is how."},
]
# The same conversation as a Qwen policy renders it (ChatML), decoded with its special tokens.
CHATML = (
    "<|im_start|>system\nThe assistant explains the recipe for bread.<|im_end|>\n"
    "<|im_start|>user\nCan you help me?<|im_end|>\n"
    "<|im_start|>assistant\nSure, here is how.<|im_end|>\n<|endoftext|>"
)
CHATML_PROMPT = CHATML[: CHATML.index("Sure,")]


def llama3_bundle(source: Path, target: Path) -> Path:
    """The tiny llama exported again with room for a Llama-3-style chat template's markup (256 tokens,
    so the conversations here are scored whole: a text is cut by tokens, messages by whole turns), its
    manifest carrying that template."""
    export_bundle(source.parent / "checkpoint", target, name="tiny-llama3", max_length=256)
    fields = read_manifest(target).model_dump(mode="json")
    for derived in ("files", "digest", "version"):
        fields.pop(derived)
    fields["format"]["chat_template"] = LLAMA3_TEMPLATE
    write_manifest(target, **fields)
    return target


@pytest.fixture(scope="module")
def bert(tiny_bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "RMSERVE_MODELS": str(tiny_bundles["bert"]),
        "RMSERVE_CACHE": "off",
        "RMSERVE_MAX_QUEUE_ITEMS": "64",
        "RMSERVE_MAX_ITEMS_PER_REQUEST": "128",
    }
    with serve(env, tmp_path_factory.mktemp("bert")) as server:
        yield server


@pytest.fixture(scope="module")
def llama3(
    tiny_bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("llama3")
    bundle = llama3_bundle(tiny_bundles["llama"], tmp / "bundle")
    with serve({"RMSERVE_MODELS": str(bundle), "RMSERVE_CACHE": "off"}, tmp) as server:
        yield server


def pairs(n: int, tag: str = "") -> tuple[list[str], list[str], list[str]]:
    """OpenRLHF-style prompts, responses and the queries the policy rendered from them.

    ``tag`` makes the responses differ from another test's: an item scored a moment ago is joined
    (single-flight), not queued again."""
    sentences = corpus()
    prompts = [f"Human: {sentences[i * 7 % len(sentences)]}\n\nAssistant:" for i in range(n)]
    responses = [sentences[(i * 11 + 3) % len(sentences)] + tag for i in range(n)]
    queries = [f"{p} {r}</s>" for p, r in zip(prompts, responses, strict=True)]
    return prompts, responses, queries


def get_reward(server: ServerProcess, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + "/get_reward", json=body, timeout=180)


def test_openrlhf_labels_of_any_json_type_are_accepted_and_do_not_change_the_score(
    bert: ServerProcess,
) -> None:
    prompts, _, queries = pairs(6)
    labels: list[Any] = [3, 2.5, None, {"answer": "4", "steps": [1, 2]}, ["a", "b"], "text"]
    with_labels = get_reward(bert, {"query": queries, "prompts": prompts, "labels": labels})
    assert with_labels.status_code == 200, with_labels.text
    without = get_reward(bert, {"query": queries, "prompts": prompts})
    assert with_labels.json()["rewards"] == pytest.approx(without.json()["rewards"], abs=1e-6)


def test_two_thousand_queries_in_one_get_reward_are_scored_in_order_through_a_64_item_queue(
    bert: ServerProcess,
) -> None:
    prompts, responses, queries = pairs(2000)
    resp = get_reward(bert, {"query": queries, "prompts": prompts, "labels": [None] * 2000})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body["rewards"]) == len(body["scores"]) == 2000
    assert all(len(v) == 2000 for v in body["extra_logs"].values())
    with RewardClient(bert.url, chunk_size=64, max_concurrency=1) as client:
        expected = client.score(list(zip(prompts, responses, strict=True)))
    assert body["rewards"] == pytest.approx(expected, abs=1e-6)


def test_a_request_larger_than_the_queue_waits_for_room_on_get_reward_where_v1_score_gets_429(
    bert: ServerProcess,
) -> None:
    prompts, responses, queries = pairs(100, " Thanks!")  # the queue holds 64
    score = httpx.post(
        bert.url + "/v1/score",
        json={"items": [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]},
        timeout=60,
    )
    assert score.status_code == 429 and "Retry-After" in score.headers
    reward = get_reward(bert, {"query": queries, "prompts": prompts})
    assert reward.status_code == 200 and len(reward.json()["rewards"]) == 100


def test_an_empty_get_reward_answers_with_the_same_keys_as_a_full_one(bert: ServerProcess) -> None:
    prompts, _, queries = pairs(1)
    full = get_reward(bert, {"query": queries, "prompts": prompts, "labels": ["x"]}).json()
    empty = get_reward(bert, {"query": [], "prompts": [], "labels": []})
    assert empty.status_code == 200
    assert set(empty.json()) == set(full) and set(empty.json()["extra_logs"]) == set(full["extra_logs"])
    assert all(v == [] for v in empty.json()["extra_logs"].values())


def test_an_encoder_bundle_scores_a_chatml_query_from_its_messages(bert: ServerProcess) -> None:
    body = get_reward(bert, {"query": [CHATML], "prompts": [CHATML_PROMPT]}).json()
    with RewardClient(bert.url) as client:
        assert body["rewards"][0] == pytest.approx(client.score([MESSAGES])[0], abs=1e-6)
    assert body["extra_logs"]["rm_retemplated"] == [1.0]


def test_unscorable_input_on_the_trainer_routes_is_a_422_naming_it(bert: ServerProcess) -> None:
    slime = httpx.post(
        bert.url + "/v1/reward",
        json={"prompt": [{"role": "critic", "content": "x"}], "response": "y"},
        timeout=30,
    )
    assert slime.status_code == 422 and "unknown role 'critic'" in slime.json()["error"]["message"]
    vllm = httpx.post(
        bert.url + "/classify", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30
    )
    assert vllm.status_code == 422 and "assistant's response" in vllm.json()["error"]["message"]


def test_a_4xx_on_a_trainer_route_is_logged_at_warning_with_its_reason(bert: ServerProcess) -> None:
    resp = get_reward(bert, {"query": ["a", "b"], "labels": [1]})
    assert resp.status_code == 400
    assert "labels has 1 entries but query has 2" in bert.log()
    bad = httpx.post(bert.url + "/v1/reward", json={"prompt": "hi"}, timeout=30)
    assert bad.status_code == 422 and "response: Field required" in bert.log()


def test_slime_posts_one_sample_and_gets_a_bare_number_equal_to_v1_score(bert: ServerProcess) -> None:
    question, answer = "Can you help me?", "Sure, here is how."
    as_messages = [{"role": "user", "content": question}]
    samples = [
        ({"prompt": question, "response": answer, "label": None}, {"prompt": question, "response": answer}),
        (
            {"prompt": f"\n\nHuman: {question}\n\nAssistant:", "response": answer, "label": {"gold": 1}},
            {"messages": [*as_messages, {"role": "assistant", "content": answer}]},
        ),
        (
            {"prompt": as_messages, "response": answer, "label": "4"},
            {"prompt": as_messages, "response": answer},
        ),
    ]
    with RewardClient(bert.url) as client:
        for payload, same in samples:
            resp = httpx.post(bert.url + "/v1/reward", json=payload, timeout=30)
            assert resp.status_code == 200, resp.text
            assert isinstance(resp.json(), float)  # slime takes the body as the reward
            assert resp.json() == pytest.approx(client.score([same])[0], abs=1e-6)
            assert resp.headers["X-RMServe-Template"] == "as_is"


def test_vllm_classify_gives_the_raw_score_without_activation_and_its_sigmoid_by_default(
    bert: ServerProcess,
) -> None:
    text = "\n\nHuman: Can you help me?\n\nAssistant: Sure, here is how."
    with RewardClient(bert.url) as client:
        raw = client.score([{"text": text}])[0]
    for route in ("/classify", "/v1/classify"):
        # veRL's reward loop sends the checkpoint path it loaded as the model name.
        verl = httpx.post(
            bert.url + route, json={"model": "/models/rm", "input": text, "use_activation": False}, timeout=30
        ).json()
        assert verl["data"][-1]["probs"][-1] == pytest.approx(raw, abs=1e-6)
        assert verl["object"] == "list" and verl["id"].startswith("classify-")
        assert verl["data"] == [
            {"index": 0, "label": "LABEL_0", "probs": verl["data"][0]["probs"], "num_classes": 1}
        ]
        assert verl["usage"]["prompt_tokens"] == verl["usage"]["total_tokens"] > 0
        default = httpx.post(bert.url + route, json={"input": [text, text]}, timeout=30).json()
        assert [d["probs"][0] for d in default["data"]] == pytest.approx([1 / (1 + math.exp(-raw))] * 2)
        old = httpx.post(bert.url + route, json={"input": text, "activation": False}, timeout=30).json()
        assert old["data"][0]["probs"][0] == pytest.approx(raw, abs=1e-6)  # the deprecated name
    chat = httpx.post(
        bert.url + "/classify", json={"messages": MESSAGES[1:], "use_activation": False}, timeout=30
    ).json()
    with RewardClient(bert.url) as client:
        assert chat["data"][0]["probs"][0] == pytest.approx(client.score([MESSAGES[1:]])[0], abs=1e-6)
    ids = httpx.post(bert.url + "/classify", json={"input": [1, 2, 3]}, timeout=30)
    assert ids.status_code == 400 and "token ids" in ids.json()["error"]["message"]


def test_v1_models_is_an_openai_model_list_and_the_client_reads_it(bert: ServerProcess) -> None:
    body = httpx.get(bert.url + "/v1/models", timeout=30).json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "default" and card["object"] == "model" and card["owned_by"] == "rmserve"
    assert isinstance(card["created"], int) and card["manifest"]["format"]["input_format"] == "text_pair"
    with RewardClient(bert.url) as client:
        assert [m["id"] for m in client.models()] == ["default"]


def test_a_chatml_query_scored_by_a_llama3_bundle_equals_its_messages_sent_as_messages(
    llama3: ServerProcess, tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    with RewardClient(llama3.url) as client:
        expected = client.score([MESSAGES])[0]
    body = get_reward(llama3, {"query": [CHATML], "prompts": [CHATML_PROMPT], "labels": [None]}).json()
    assert body["rewards"][0] == pytest.approx(expected, abs=1e-6)
    assert body["extra_logs"]["rm_retemplated"] == [1.0] and body["extra_logs"]["rm_unrecognised"] == [0.0]

    # The same text rendered in the bundle's own markup is scored as it came.
    own = get_reward(llama3, {"query": ["<s>" + CHATML_AS_LLAMA3]}).json()
    assert own["rewards"][0] == pytest.approx(expected, abs=1e-6)
    assert own["extra_logs"]["rm_retemplated"] == [0.0] and own["extra_logs"]["rm_unrecognised"] == [0.0]

    # Text in no chat markup is scored as given, and reported.
    plain = get_reward(llama3, {"query": ["Sure, here is how."]}).json()
    assert plain["extra_logs"]["rm_unrecognised"] == [1.0]

    # slime's templated prompt and vLLM's rendered input are read the same way.
    slime = httpx.post(
        llama3.url + "/v1/reward", json={"prompt": CHATML_PROMPT, "response": MESSAGES[2]["content"]}
    )
    assert slime.json() == pytest.approx(expected, abs=1e-6)
    assert slime.headers["X-RMServe-Template"] == "retemplated"
    vllm = httpx.post(llama3.url + "/classify", json={"input": CHATML, "use_activation": False}).json()
    assert vllm["data"][0]["probs"][0] == pytest.approx(expected, abs=1e-6)
    # veRL renders with the reward model's own template and strips the BOS; vLLM adds it back.
    verl = httpx.post(llama3.url + "/classify", json={"input": CHATML_AS_LLAMA3, "use_activation": False})
    assert verl.json()["data"][0]["probs"][0] == pytest.approx(expected, abs=1e-6)

    # Switched off, the ChatML markup reaches the model as it is: another score.
    bundle = llama3_bundle(tiny_bundles["llama"], tmp_path / "bundle")
    env = {"RMSERVE_MODELS": str(bundle), "RMSERVE_CACHE": "off", "RMSERVE_RETEMPLATE": "false"}
    with serve(env, tmp_path) as off:
        as_is = get_reward(off, {"query": [CHATML], "prompts": [CHATML_PROMPT]}).json()
    assert as_is["extra_logs"]["rm_retemplated"] == [0.0]
    assert abs(as_is["rewards"][0] - expected) > 1e-4


CHATML_AS_LLAMA3 = "".join(
    f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in MESSAGES
)
