"""Real servers on loopback: text no tokenizer takes is a 4xx on every route and item shape (fuzzed
too), errors say what is wrong in words, slow clients are cut off, a drain ends in 200 or JSON 503,
settings errors print no secret, an empty keys file stops start-up, and auto's choice is stable."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.server import serve

SURROGATE = "\ud800"


def _post(url: str, body: object, **headers: str) -> httpx.Response:
    """POST ``body`` as ASCII JSON: lone surrogates travel as ``\\ud800`` escapes, as any client's
    ``json.dumps`` writes them."""
    return httpx.post(
        url, content=json.dumps(body).encode(), headers={"content-type": "application/json", **headers}
    )


@pytest.fixture(scope="module")
def server(tiny_bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    env = {"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_CACHE": "off"}
    with serve(env, tmp_path_factory.mktemp("reliability")) as running:
        yield running


def _score_bodies(text: str) -> list[tuple[dict, str]]:
    """(a /v1/score body with ``text`` in one field, the field's name in the error), every shape."""
    return [
        ({"items": [{"prompt": text, "response": "r"}]}, "items[0].prompt"),
        ({"items": [{"prompt": "p", "response": text}]}, "items[0].response"),
        ({"items": [{"text": text}]}, "items[0].text"),
        (
            {"items": [{"prompt": [{"role": "user", "content": text}], "response": "r"}]},
            "items[0].prompt[0].content",
        ),
        (
            {
                "items": [
                    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]}
                ]
            },
            "items[0].messages[1].content",
        ),
        (
            {"items": [{"messages": [{"role": text or "x", "content": "q"}]}]},
            "items[0].messages[0].role",
        ),
        ({"items": [{"text": "ok"}, {"text": text}]}, "items[1].text"),
    ]


def test_a_lone_surrogate_is_a_422_naming_the_item_and_field_on_every_route(server) -> None:  # type: ignore[no-untyped-def]
    url = server.url
    for body, field in _score_bodies(f"a{SURROGATE}b"):
        resp = _post(url + "/v1/score", body)
        assert resp.status_code == 422, (field, resp.text)
        assert resp.json()["error"]["message"].startswith(f"{field}: has a lone surrogate U+D800"), resp.text
    for body, field in (
        ({"query": ["fine", SURROGATE]}, "query[1]"),
        ({"query": ["q"], "prompts": [SURROGATE]}, "prompts[0]"),
    ):
        resp = _post(url + "/get_reward", body)
        assert resp.status_code == 422 and resp.json()["error"]["message"].startswith(field), resp.text
    resp = _post(url + "/v1/score", {"model": SURROGATE, "items": [{"text": "t"}]})
    assert resp.status_code == 422 and resp.json()["error"]["message"].startswith("model:"), resp.text
    assert httpx.get(url + "/health/ready").status_code == 200


def test_nul_and_control_characters_are_text_and_are_scored(server) -> None:  # type: ignore[no-untyped-def]
    for text in ("\x00", "a\x00b", "\x01\x1f\x7f", "\u2028\ufeff", "\x00" * 50):
        for body, field in _score_bodies(text):
            if field.endswith("role"):
                continue  # a role is a name the template knows, not free text
            resp = _post(server.url + "/v1/score", body)
            assert resp.status_code == 200, (repr(text), field, resp.text)
        resp = _post(server.url + "/get_reward", {"query": [text], "prompts": [text[:1]]})
        assert resp.status_code == 200, resp.text


# Any character, lone surrogates and C0/C1 controls included (st.characters() leaves surrogates out).
_CHARS = st.one_of(
    st.characters(),
    st.integers(0xD800, 0xDFFF).map(chr),
    st.integers(0, 0x1F).map(chr),
    st.integers(0x7F, 0x9F).map(chr),
)
_TEXT = st.text(_CHARS, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_TEXT, shape=st.integers(0, 8))
def test_fuzzed_text_on_every_route_and_shape_is_scored_or_refused_with_a_4xx(
    server,
    text: str,
    shape: int,  # type: ignore[no-untyped-def]
) -> None:
    if shape < 7:
        body, field = _score_bodies(text)[shape]
        resp = _post(server.url + "/v1/score", body)
    else:
        body = {"query": [text]} if shape == 7 else {"query": [text + "x"], "prompts": [text]}
        field = "query[0]" if shape == 7 else "prompts[0]"
        resp = _post(server.url + "/get_reward", body)
    assert resp.status_code in (200, 400, 422), (repr(text), resp.status_code, resp.text)
    if resp.status_code != 200:
        error = resp.json()["error"]
        assert error["type"] in ("invalid_request", "invalid_item", "bad_request"), error
        # What the server reads: JSON joins an escaped high + low surrogate into one valid character.
        received = json.loads(json.dumps(text))
        if any(0xD800 <= ord(c) <= 0xDFFF for c in received):
            assert field in error["message"], error
    assert httpx.get(server.url + "/health/live").status_code == 200


def test_a_pair_missing_its_response_or_prompt_is_a_422_naming_the_field(server) -> None:  # type: ignore[no-untyped-def]
    url = server.url + "/v1/score"
    texts = [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    for item, message in (
        ({"prompt": "p"}, "items[3].response: Field required"),
        ({"response": "r"}, "items[3].prompt: Field required"),
    ):
        resp = _post(url, {"items": [*texts, item]})
        assert resp.status_code == 422 and resp.json()["error"]["message"] == message, resp.text


def test_errors_say_what_is_wrong_in_words(server) -> None:  # type: ignore[no-untyped-def]
    url = server.url + "/v1/score"
    headers = {"content-type": "application/json"}
    broken = httpx.post(url, content=b'{"items": [\n  {"text": "a"},\n  {"text": }\n]}', headers=headers)
    assert broken.status_code == 422
    assert broken.json()["error"]["message"] == (
        "the body is not valid JSON: Expecting value at line 3, column 12"
    )
    nan = httpx.post(url, content=b'{"items": [{"text": "a"}], "timeout_s": NaN}', headers=headers)
    assert nan.status_code == 422 and "timeout_s: nan is not a deadline" in nan.json()["error"]["message"]
    null = _post(url, {"items": [{"prompt": "p", "response": None}]})
    assert null.status_code == 422
    assert null.json()["error"]["message"] == (
        "items[0]: response is null; give its value or leave the field out"
    )
    for bad in ("0", "-5", "nan", "inf"):
        resp = _post(url, {"items": [{"text": "a"}]}, **{"X-Request-Timeout": bad})
        assert resp.status_code == 422, (bad, resp.text)
        assert resp.json()["error"]["message"].startswith("X-Request-Timeout:"), resp.text
    huge = _post(url, {"model": "m" * 1_000_000, "items": [{"text": "a"}]})
    assert huge.status_code == 422 and len(huge.text) < 1000, huge.text[:300]
    unknown = _post(url, {"model": "nope", "items": [{"text": "a"}]})
    assert unknown.status_code == 404 and "'nope'" in unknown.json()["error"]["message"]


def test_a_chunked_body_over_the_limit_is_a_413(tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    env = {"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_MAX_BODY_BYTES": "2048"}

    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"items": [{"text": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    with serve(env, tmp_path) as running:
        resp = httpx.post(
            running.url + "/v1/score", content=chunks(), headers={"content-type": "application/json"}
        )
        assert resp.status_code == 413 and "2048 bytes" in resp.json()["error"]["message"]


def test_two_authorization_headers_are_refused(tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    env = {"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_API_KEYS": "good-key"}
    with serve(env, tmp_path) as running:
        headers = [("authorization", "Bearer wrong"), ("authorization", "Bearer good-key")]
        resp = httpx.post(running.url + "/v1/score", json={"items": [{"text": "a"}]}, headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["message"] == "send one Authorization header, not 2"
        assert resp.headers["www-authenticate"] == "Bearer"


def _raw(url: str, data: bytes, timeout: float) -> bytes:
    """Send ``data`` on a fresh connection, then read until the server answers or closes it."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while True:
            chunk = sock.recv(65536)  # raises socket.timeout if the server holds the connection
            if not chunk:
                return received
            received += chunk
            if b"\r\n\r\n" in received and b"}" in received:
                return received


def test_a_stalled_upload_and_stalled_headers_are_cut_off(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    env = {
        "RMSERVE_MODELS": str(tiny_bundles["bert"]),
        "RMSERVE_BODY_TIMEOUT_S": "1",
        "RMSERVE_HEADER_TIMEOUT_S": "1",
    }
    with serve(env, tmp_path) as running:
        head = (
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        # The socket's timeout is ten times the setting: a server that held the connection fails it.
        answer = _raw(running.url, head + b'{"items":', timeout=10)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"request_timeout"' in answer
        assert _raw(running.url, b"POST /v1/score HTTP/1.1\r\nHost: x\r\n", timeout=10) == b""
        assert httpx.post(running.url + "/v1/score", json={"items": [{"text": "a"}]}).status_code == 200


def test_settings_errors_print_no_secret(tmp_path: Path) -> None:
    rmserve = str(Path(sys.executable).with_name("rmserve"))
    cases = [
        ({"RMSERVE_REDIS_URL": "redis://user:hunter2-pass@/0"}, "hunter2-pass"),
        (
            {"RMSERVE_REDIS_URL": "rediss://r:6379/0?password=qwerty-secret&x=1", "RMSERVE_CACHE": "bogus"},
            "qwerty-secret",
        ),
        ({"RMSERVE_API_KEYS": "sk-live-abcdef123456", "RMSERVE_PORT": "-1"}, "abcdef123456"),
    ]
    for env, secret in cases:
        proc = subprocess.run(
            [rmserve, "serve"],
            env={"PATH": "/usr/bin:/bin", "RMSERVE_HOST": "127.0.0.1", "RMSERVE_PORT": "1", **env},
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert proc.returncode == 2, proc.stderr
        assert "invalid configuration" in proc.stderr
        assert secret not in proc.stderr + proc.stdout, proc.stderr


def test_an_empty_keys_file_stops_start_up_with_the_reason(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("\n  \n")
    env = {"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_API_KEYS_FILE": str(keys)}
    with serve(env, tmp_path, ready=False) as running:
        assert running.process.wait(timeout=60) != 0
    assert f"the API keys file {keys} has no keys" in running.log()


def test_two_starts_with_the_same_settings_serve_the_same_backend_and_precision(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    env = {"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_CACHE": "off"}
    seen = []
    for _ in range(2):
        with serve(env, tmp_path) as running:
            resp = httpx.post(running.url + "/v1/score", json={"items": [{"prompt": "p", "response": "r"}]})
            model = httpx.get(running.url + "/v1/models").json()["data"][0]
            assert (resp.headers["x-backend"], resp.headers["x-precision"]) == (
                model["provider"],
                model["precision"],
            )
            seen.append((model["provider"], model["precision"], resp.json()["scores"]))
    assert seen[0] == seen[1], seen


def test_a_drain_past_its_grace_answers_200_or_a_json_503(
    tmp_path: Path,
) -> None:
    env = {
        # The default (real-size) model, one item per forward pass: the queue holds seconds of work.
        "RMSERVE_CACHE": "off",
        "RMSERVE_PROVIDER": "cpu",
        "RMSERVE_PRECISION": "fp32",
        "RMSERVE_MAX_BATCH_TOKENS": "256",
        "RMSERVE_DRAIN_GRACE_S": "1",
    }
    outcomes: list[tuple[int, str, str]] = []
    with serve(env, tmp_path) as running:

        def one(i: int) -> None:
            items = [{"prompt": f"drain {i} {j} " * 60, "response": f"reply {j} " * 30} for j in range(48)]
            try:
                resp = httpx.post(running.url + "/v1/score", json={"items": items}, timeout=60)
            except httpx.ConnectError:
                # Sent after the drain began: the listener is closed, so it was never accepted.
                outcomes.append((0, "", "connection refused"))
                return
            outcomes.append((resp.status_code, resp.headers.get("content-type", ""), resp.text))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 600  # a ceiling for a busy machine, not a speed
        while running.metric("rmserve_queue_depth") < 200:  # over 2 s of work queued, accepted
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.02)
        running.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert running.process.wait(timeout=60) == 0
    assert len(outcomes) == 12
    statuses = sorted({o[0] for o in outcomes})
    # 429: refused at admission (its deadline could not be met), never accepted; 0: it connected only
    # after the listener closed (a loaded machine may start a thread late); the accepted ones end in
    # 200 or, past the grace, a JSON 503: none is dropped or answered in plain text.
    assert set(statuses) <= {0, 200, 429, 503}, outcomes
    assert 503 in statuses, statuses  # the grace really ran out
    for status, content_type, text in outcomes:
        if status == 0:
            continue
        assert content_type == "application/json", text
        if status == 503:
            error = json.loads(text)["error"]
            assert error["type"] == "not_ready" and error["request_id"]
