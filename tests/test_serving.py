"""Serving end to end: tiny real models, exported, served by a real uvicorn, called over HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from rmserve.bundle import load_bundle
from rmserve.formatting import Formatter
from rmserve.items import PairItem
from tests.support.contract import DOCUMENTED_METRICS
from tests.support.server import serve

TEXTS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Tell me a joke.", "Why did the chicken cross the road? To get to the other side."),
    ("How do I bake bread?", "Mix flour, water, salt and yeast, knead, let it rise, then bake it hot."),
    ("hi", "hello"),
    ("Explain gravity to a child " * 8, "Things fall down because the Earth pulls them."),
    ("Can you help me?", "No."),
    ("What is 2+2?", "4"),
]
# fp32 is the exact precision: these tests hold the server to PyTorch's scores.
EXACT = {"RMSERVE_PRECISION": "fp32"}


def torch_scores(bundle_dir: Path, pairs: list[tuple[str, str]]) -> np.ndarray:
    """The PyTorch model's scores for the same token ids the server builds, one item at a time."""
    import torch

    from rmserve.models.heads import load_score_model

    model, _, meta = load_score_model(bundle_dir.parent / "checkpoint")
    formatter = Formatter(load_bundle(bundle_dir))
    out = []
    for enc in formatter.encode([PairItem(p, r) for p, r in pairs]):
        ids = torch.tensor([enc.ids])
        kwargs = {"token_type_ids": torch.tensor([enc.type_ids])} if meta.uses_token_type_ids else {}
        with torch.no_grad():
            out.append(float(model(ids, torch.ones_like(ids), **kwargs)[0]))
    return np.array(out)


def post_score(url: str, pairs: list[tuple[str, str]], **extra: object) -> httpx.Response:
    items = [{"prompt": p, "response": r} for p, r in pairs]
    return httpx.post(url + "/v1/score", json={"items": items, **extra}, timeout=60)


@pytest.mark.parametrize("arch", ["bert", "llama", "qwen2"])
def test_http_scores_equal_pytorch_and_do_not_depend_on_the_batch(
    arch: str, tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    bundle = tiny_bundles[arch]
    expected = torch_scores(bundle, TEXTS)
    with serve({**EXACT, "RMSERVE_MODELS": str(bundle), "RMSERVE_CACHE": "off"}, tmp_path) as server:
        resp = post_score(server.url, TEXTS)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        got = np.array(body["scores"])
        assert body["model_version"] == load_bundle(bundle).manifest.version
        assert body["usage"]["items"] == len(TEXTS)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

        # One item alone, then the same item among 32 others of every length (padded batch).
        alone = post_score(server.url, TEXTS[:1]).json()["scores"][0]
        crowd = TEXTS[1:] * 5
        mixed = post_score(server.url, crowd[:16] + TEXTS[:1] + crowd[16:32]).json()["scores"][16]
        assert abs(alone - mixed) <= 1e-5 * max(1.0, abs(alone))


def test_concurrent_one_item_requests_are_batched_together(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    env = {"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_CACHE": "off", "RMSERVE_MAX_WAIT_MS": "50"}
    with serve(env, tmp_path) as server:
        before_batches = server.metric("rmserve_batch_size_count")
        before_items = server.metric("rmserve_batch_size_sum")

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                reqs = [
                    client.post("/v1/score", json={"items": [{"prompt": f"q{i}", "response": f"a{i}"}]})
                    for i in range(16)
                ]
                return list(await asyncio.gather(*reqs))

        responses = asyncio.run(burst())
        assert all(r.status_code == 200 for r in responses)
        batches = server.metric("rmserve_batch_size_count") - before_batches
        items = server.metric("rmserve_batch_size_sum") - before_items
        assert items == 16
        assert batches < items, f"16 concurrent requests ran as {batches} batches: nothing was batched"


def test_a_full_queue_answers_429_with_retry_after(tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    env = {
        "RMSERVE_MODELS": str(tiny_bundles["llama"]),
        "RMSERVE_CACHE": "off",
        "RMSERVE_MAX_QUEUE_ITEMS": "8",
        "RMSERVE_MAX_BATCH_TOKENS": "64",
    }
    long = [(f"question {i} " * 30, f"answer {i} " * 30) for i in range(8)]
    with serve(env, tmp_path) as server:

        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                # Distinct items per request: identical ones in flight would be scored once (single-flight).
                reqs = [
                    client.post(
                        "/v1/score", json={"items": [{"prompt": p, "response": f"{r}{n}"} for p, r in long]}
                    )
                    for n in range(24)
                ]
                return list(await asyncio.gather(*reqs))

        responses = asyncio.run(flood())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}, codes
        refused = [r for r in responses if r.status_code == 429]
        assert refused, "24 concurrent 8-item requests never filled an 8-item queue"
        assert int(refused[0].headers["Retry-After"]) >= 1
        assert refused[0].json()["error"]["type"] == "overloaded"
        assert 200 in codes


USER, ASSISTANT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
BAD_INPUTS = [
    ({"items": [{"prompt": "p"}]}, 422, "items[0]"),
    (
        {"items": [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": "r", "text": "t"}]},
        422,
        "items[1]",
    ),
    ({"items": [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": 5}]}, 422, "items[1]"),
    ({"items": [{"messages": []}]}, 422, "items[0]"),
    ({"items": [{"messages": [{"role": "user", "content": "hi"}]}]}, 422, "items[0]"),
    ({"items": [{"prompt": "p", "response": "r", "extra": 1}]}, 422, "items[0]"),
    (
        {"items": [{"prompt": [{"role": "wizard", "content": "x"}], "response": "r"}]},
        422,
        "items[0].prompt[0].role: unknown role 'wizard'; allowed roles: user, human, system, assistant, "
        "tool, ipython",
    ),
    (
        {
            "items": [
                {"prompt": "p", "response": "r"},
                {"messages": [USER, ASSISTANT, {"role": "robot", "content": "x"}, ASSISTANT]},
            ]
        },
        422,
        "items[1].messages[2].role: unknown role 'robot'; allowed roles: user,",
    ),
    (
        {"items": [{"messages": [USER, {"role": "robot", "content": "x"}]}]},
        422,
        "items[0].messages[1].role: the last message must be the assistant's response "
        "(role 'assistant'), not 'robot'",
    ),
    ({"items": "nope"}, 422, "items"),
    ({"model": "nope", "items": [{"prompt": "p", "response": "r"}]}, 404, "nope"),
    ({"items": [{"prompt": "p", "response": "r"}], "truncation": "sometimes"}, 422, "truncation"),
    ({"items": [{"prompt": "p", "response": "r"}] * 3, "truncation": "auto"}, 413, "3 items"),
    (
        {
            "items": [{"prompt": "x", "response": "r"}, {"prompt": "p " * 5000, "response": "r"}],
            "truncation": "error",
        },
        413,
        "items[1]",
    ),
]


def test_bad_input_gets_a_4xx_that_names_the_problem(tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    env = {"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_MAX_ITEMS_PER_REQUEST": "2"}
    with serve(env, tmp_path) as server:
        for body, status, needle in BAD_INPUTS:
            resp = httpx.post(server.url + "/v1/score", json=body)
            assert resp.status_code == status, (body, resp.text)
            error = resp.json()["error"]
            assert needle in error["message"], (body, error)
            assert "Traceback" not in resp.text
        resp = httpx.post(
            server.url + "/v1/score", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert resp.status_code == 422 and resp.json()["error"]["type"] == "invalid_request"


def test_truncation_is_reported_and_keeps_the_response(tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    with serve({**EXACT, "RMSERVE_MODELS": str(tiny_bundles["bert"])}, tmp_path) as server:
        long_prompt = "a very long prompt " * 400
        body = post_score(server.url, [(long_prompt, "short answer"), ("short", "short")]).json()
        assert body["usage"]["truncated"] == 1
        # Cutting the prompt from the left keeps its end and the whole response.
        same = post_score(server.url, [("prompt " * 10 + long_prompt, "short answer")]).json()
        assert same["scores"][0] == pytest.approx(body["scores"][0], abs=1e-6)


def test_a_strict_413_states_the_items_own_length_after_the_item_was_scored_truncated(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    long_item = [("a very long prompt " * 400, "short answer")]
    with serve({"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_CACHE": "memory"}, tmp_path) as server:
        fresh = post_score(server.url, long_item, truncation="error")
        assert fresh.status_code == 413
        auto = post_score(server.url, long_item, truncation="auto").json()
        assert auto["usage"]["truncated"] == 1
        # The cache now holds the item's truncated encoding; the 413 still counts the item itself.
        again = post_score(server.url, long_item, truncation="error")
        assert again.status_code == 413
        assert again.json()["error"]["message"] == fresh.json()["error"]["message"]
        assert f"{auto['usage']['tokens']} tokens" not in again.json()["error"]["message"]


def test_every_documented_metric_is_exported_and_ops_routes_answer(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    with serve({"RMSERVE_MODELS": f"a={tiny_bundles['bert']},b={tiny_bundles['qwen2']}"}, tmp_path) as server:
        assert post_score(server.url, TEXTS[:2], model="b").status_code == 200
        text = httpx.get(server.url + "/metrics").text
        for name in DOCUMENTED_METRICS:
            assert f"\n{name}" in text, name
        assert httpx.get(server.url + "/health/live").status_code == 200
        models = httpx.get(server.url + "/v1/models").json()["data"]
        assert {m["id"] for m in models} == {m["name"] for m in models} == {"a", "b"}
        assert all(m["manifest"]["parity"] for m in models)
        info = httpx.get(server.url + "/info").json()
        assert info["settings"]["max_wait_ms"] == 0.0 and info["phase"] == "ready"
        # Two models and no name: the request must say which.
        assert post_score(server.url, TEXTS[:1]).status_code == 404
