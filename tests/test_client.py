"""The trainers' client: retries and errors against a server that misbehaves on purpose;
chunking, item shapes, keys and sync/async parity against a real rmserve.

Why not the real server for the retry tests: rmserve answers 503 only while starting or draining and
never drops a connection on request, so a test could not make it fail on the n-th attempt and then
succeed. ``Flaky`` below is a real HTTP server on loopback (a socket, real httpx transport errors)
that follows a script: drop the connection, answer 503, answer 200, ...
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from rmserve.client import (
    AsyncRewardClient,
    AuthenticationError,
    BadRequestError,
    BaseRewardClient,
    ModelNotFoundError,
    OverloadedError,
    RequestTooLargeError,
    RetryBudgetExceeded,
    RewardClient,
    ServerConnectionError,
    ServerError,
    ServerUnavailableError,
)
from tests.support.server import free_port, serve
from tests.support.tiny import corpus

DROP = "drop"


def reply(status: int, body: Any, headers: dict[str, str] | None = None) -> bytes:
    data = json.dumps(body).encode()
    head = [
        f"HTTP/1.1 {status} X",
        "content-type: application/json",
        f"content-length: {len(data)}",
        "connection: close",
        *[f"{k}: {v}" for k, v in (headers or {}).items()],
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def error(status: int, type_: str, message: str, **headers: str) -> bytes:
    return reply(status, {"error": {"type": type_, "message": message}}, headers)


def scores(*values: float) -> bytes:
    return reply(
        200,
        {
            "model": "m",
            "model_version": "v1",
            "scores": list(values),
            "usage": {"items": len(values), "tokens": 3, "cache_hits": 0, "truncated": 0},
        },
    )


class Flaky:
    """Answers the n-th request with ``script[n]``: raw response bytes, or DROP (close without a word)."""

    def __init__(self, script: list[bytes | str]) -> None:
        self.script = list(script)
        self.times: list[float] = []
        self.heads: list[dict[str, str]] = []  # each request's headers, names lower-cased
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> int:
        return len(self.times)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                while len(body) < length:
                    body += conn.recv(65536)
                self.times.append(time.monotonic())
                lines = head.decode("latin-1").split("\r\n")[1:]
                self.heads.append(
                    {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
                )
                action = self.script.pop(0) if self.script else DROP
                if action != DROP:
                    assert isinstance(action, bytes)
                    conn.sendall(action)

    def close(self) -> None:
        self.sock.close()


@contextmanager
def flaky(*script: bytes | str) -> Iterator[Flaky]:
    server = Flaky(list(script))
    try:
        yield server
    finally:
        server.close()


FAST = {"backoff_s": 0.01, "max_backoff_s": 0.05}


def call_score(kind: str, url: str, items: list[Any], **options: Any) -> list[float]:
    """The same call through the sync or the async client."""
    if kind == "sync":
        with RewardClient(url, **options) as client:
            return client.score(items)

    async def run() -> list[float]:
        async with AsyncRewardClient(url, **options) as client:
            return await client.score(items)

    return asyncio.run(run())


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_retries_a_dropped_connection_and_a_503_then_succeeds(kind: str) -> None:
    with flaky(DROP, error(503, "not_ready", "starting", **{"Retry-After": "0"}), scores(0.5)) as server:
        assert call_score(kind, server.url, [("p", "r")], **FAST) == [0.5]
        assert server.requests == 3


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    "status,type_,cls",
    [
        (422, "invalid_request", BadRequestError),
        (400, "bad_request", BadRequestError),
        (401, "unauthorized", AuthenticationError),
        (404, "model_not_found", ModelNotFoundError),
        (413, "too_large", RequestTooLargeError),
        (500, "inference_failed", ServerError),
    ],
)
def test_does_not_retry_client_errors_or_a_500(kind: str, status: int, type_: str, cls: type) -> None:
    with flaky(error(status, type_, "items[0]: nope"), scores(1.0)) as server:
        with pytest.raises(cls) as caught:
            call_score(kind, server.url, [("p", "r")], **FAST)
        assert server.requests == 1
        assert caught.value.status == status and caught.value.type == type_
        assert "items[0]: nope" in str(caught.value)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_retries_a_proxys_plain_text_500_where_it_would_not_retry_rmserves_own(kind: str) -> None:
    # What Ray Serve's proxy answers when the replica it forwarded the request to died mid-request.
    lost = (
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: 21\r\nconnection: close\r\n\r\nInternal Server Error"
    )
    with flaky(lost, scores(0.25)) as server:
        assert call_score(kind, server.url, [("p", "r")], **FAST) == [0.25]
        assert server.requests == 2
    with flaky(lost, lost, lost) as server:
        with pytest.raises(RetryBudgetExceeded) as caught:
            call_score(kind, server.url, [("p", "r")], max_retries=2, **FAST)
        assert isinstance(caught.value.last_error, ServerUnavailableError) and caught.value.status == 500


def test_honours_retry_after() -> None:
    with flaky(error(429, "overloaded", "queue full", **{"Retry-After": "1"}), scores(2.0)) as server:
        assert call_score("sync", server.url, [("p", "r")], **FAST) == [2.0]
        waited = server.times[1] - server.times[0]
        assert waited >= 0.95, f"retried {waited:.2f} s after a 429 that said Retry-After: 1"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_gives_up_after_its_budget_with_a_typed_error(kind: str) -> None:
    busy = error(503, "not_ready", "draining", **{"Retry-After": "0"})
    with flaky(*[busy] * 10) as server:
        with pytest.raises(RetryBudgetExceeded) as caught:
            call_score(kind, server.url, [("p", "r")], max_retries=2, **FAST)
        assert server.requests == 3
        assert isinstance(caught.value.last_error, ServerUnavailableError)
        assert caught.value.attempts == 3 and caught.value.status == 503

    # Nobody listening at all: connection refused, retried, then the same typed error.
    with pytest.raises(RetryBudgetExceeded) as refused:
        call_score(kind, f"http://127.0.0.1:{free_port()}", [("p", "r")], max_retries=1, **FAST)
    assert isinstance(refused.value.last_error, ServerConnectionError)


def test_backoff_is_exponential_with_full_jitter_and_respects_retry_after() -> None:
    base = BaseRewardClient(backoff_s=0.1, max_backoff_s=1.0, max_retry_after_s=5.0, rng=random.Random(0))
    for attempt in range(6):
        cap = min(1.0, 0.1 * 2**attempt)
        delays = [base._retry_delay(ServerUnavailableError("x"), attempt) for _ in range(200)]
        assert all(d is not None and 0 <= d <= cap for d in delays)
        assert max(d for d in delays if d is not None) > cap * 0.8  # full jitter spans the range
    assert base._retry_delay(OverloadedError("x", retry_after_s=3), 0) == pytest.approx(3, abs=0.11)
    assert base._retry_delay(OverloadedError("x", retry_after_s=600), 0) == 5.0  # capped
    assert base._retry_delay(BadRequestError("x", status=422), 0) is None


# ---------------------------------------------------------------- against a real rmserve


def items_in_every_shape(n: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """n items as the client accepts them, and the same items as the API's JSON."""
    s = corpus()
    given: list[Any] = []
    wire: list[dict[str, Any]] = []
    for i in range(n):
        p, r = s[(i * 7) % len(s)], s[(i * 13 + 5) % len(s)]
        msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        shape = i % 5
        if shape == 0:
            given.append((p, r))
            wire.append({"prompt": p, "response": r})
        elif shape == 1:
            given.append({"prompt": p, "response": r})
            wire.append({"prompt": p, "response": r})
        elif shape == 2:
            given.append(msgs)
            wire.append({"messages": msgs})
        elif shape == 3:
            given.append({"text": f"{p} {r}"})
            wire.append({"text": f"{p} {r}"})
        else:
            given.append(([{"role": "user", "content": p}], r))
            wire.append({"prompt": [{"role": "user", "content": p}], "response": r})
    return given, wire


def test_chunking_preserves_order_and_sync_equals_async_over_a_real_server(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    given, wire = items_in_every_shape(150)
    with serve(
        {"RMSERVE_MODELS": str(tiny_bundles["qwen2"]), "RMSERVE_MAX_ITEMS_PER_REQUEST": "64"}, tmp_path
    ) as server:
        # The reference: the API called directly, one item per request.
        direct = [httpx.post(server.url + "/v1/score", json={"items": [w]}).json()["scores"][0] for w in wire]
        assert len(set(round(d, 6) for d in direct)) > 20, "scores barely differ: order would not show"

        with RewardClient(server.url, chunk_size=7, max_concurrency=4) as client:
            result = client.score_result(given)
            assert result.requests == 22 and result.usage.items == 150 and result.model_version
            assert result.scores == pytest.approx(direct, abs=1e-5)
            assert client.score(given) == result.scores  # one at a time or in chunks: the same
            with RewardClient(server.url, chunk_size=100) as big, pytest.raises(RequestTooLargeError):
                big.score(given)  # over the server's limit: a typed error, not retried

        async def run() -> list[float]:
            async with AsyncRewardClient(server.url, chunk_size=11, max_concurrency=8) as client:
                return await client.score(given)

        assert asyncio.run(run()) == result.scores  # the async client gives identical results


def test_api_key_models_and_health_over_a_real_server(tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    env = {"RMSERVE_MODELS": f"rm={tiny_bundles['bert']}", "RMSERVE_API_KEYS": "k1,k2"}
    with serve(env, tmp_path) as server:
        with RewardClient(server.url + "/get_reward", api_key="k2", model="rm") as client:
            assert client.base_url == server.url  # a trainer's route URL is accepted
            assert client.health().ready
            assert [m["name"] for m in client.models()] == ["rm"]
            assert len(client.score([("Can you help me?", "Sure, here is how.")])) == 1
            with pytest.raises(ModelNotFoundError):
                client.score([("a", "b")], model="nope")
        with RewardClient(server.url, api_key="wrong") as client, pytest.raises(AuthenticationError):
            client.score([("a", "b")])


def test_text_no_utf8_body_can_carry_is_a_typed_error_before_anything_is_sent() -> None:
    # Nothing listens on this port: a request that went out would be a ServerConnectionError.
    url = f"http://127.0.0.1:{free_port()}"
    with RewardClient(url, max_retries=0) as client:
        with pytest.raises(BadRequestError, match=r"items\[1\]\.response: has a lone surrogate U\+D800"):
            client.score([("p", "fine"), ("p", "bad \ud800")])
        with pytest.raises(BadRequestError, match=r"items\[0\]\.messages\[0\]\.content"):
            client.score([[{"role": "user", "content": "\udfff"}, {"role": "assistant", "content": "a"}]])
        with pytest.raises(BadRequestError, match=r"query\[0\]"):
            client.get_reward(["\ud800"])

    async def run() -> None:
        async with AsyncRewardClient(url, max_retries=0) as aclient:
            with pytest.raises(BadRequestError, match=r"prompts\[0\]"):
                await aclient.get_reward(["q"], prompts=["\ud800"])

    asyncio.run(run())


REFUSED_ITEMS = [
    (["just a response"], r"^items\[0\]: a bare string is not an item"),
    ([("p", "r"), 42], r"^items\[1\]: expected \(prompt, response\)"),
    ([("p", "r"), ("p", "r"), ("p", "r"), {"prompt": "p"}], r"^items\[3\]\.response: Field required$"),
    ([{"response": "r"}], r"^items\[0\]\.prompt: Field required$"),
    ([{"prompt": "p", "completion": "r"}], r"^items\[0\]\.response: Field required$"),
    (
        [{"answer": "r"}],
        r"^items\[0\]: a dict item has 'prompt' and 'response' \(or 'steps'\), 'messages', or 'text'",
    ),
    ([("p", 5)], r"^items\[0\]: a response is text, not int"),
    ([[{"content": "hi"}]], r"^items\[0\]: a message is a mapping with 'role'"),
]


@pytest.mark.parametrize("items,message", REFUSED_ITEMS, ids=[m for _, m in REFUSED_ITEMS])
def test_an_item_in_no_documented_shape_is_a_bad_request_error_before_anything_is_sent(
    items: list[Any], message: str
) -> None:
    # Nothing listens on this port: a request that went out would be a ServerConnectionError.
    url = f"http://127.0.0.1:{free_port()}"
    with RewardClient(url, max_retries=0) as client:
        with pytest.raises(BadRequestError, match=message) as refused:
            client.score(items)
        assert refused.value.status is None and refused.value.type == "invalid_request"

    async def run() -> None:
        async with AsyncRewardClient(url, max_retries=0) as aclient:
            with pytest.raises(BadRequestError, match=message):
                await aclient.score(items)

    asyncio.run(run())


def test_a_single_item_or_query_where_a_list_belongs_is_a_bad_request_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with RewardClient(url, max_retries=0) as client:
        with pytest.raises(BadRequestError, match="takes a list of items"):
            client.score("one text")  # type: ignore[arg-type]
        with pytest.raises(BadRequestError, match="takes a list of queries"):
            client.get_reward("one query")  # type: ignore[arg-type]
        with pytest.raises(BadRequestError, match="prompts has 2 entries but queries has 1"):
            client.get_reward(["q"], prompts=["a", "b"])


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_client_sends_a_prefix_key_that_names_the_prompt_and_not_the_response(kind: str) -> None:
    prompt = [{"role": "user", "content": "Name three rivers."}]
    with flaky(scores(0.1), scores(0.2), scores(0.3), scores(0.4)) as server:
        call_score(kind, server.url, [(prompt, "Nile, Amazon, Danube.")])
        call_score(kind, server.url, [{"prompt": prompt, "response": "The Rhine."}])
        call_score(kind, server.url, [("Name three lakes.", "Erie.")])
        call_score(kind, server.url, [{"text": "no prompt here"}])
    first, second, other, text = (h.get("x-prefix-key") for h in server.heads)
    assert first is not None and len(first) == 32
    assert first == second
    assert other is not None and other != first
    assert text is None
