"""``rmserve serve`` as a user at a terminal meets it: Ctrl-C, and start-ups that fail. Real processes."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.server import ServerProcess, serve

# What uvicorn would print to say it started; none of it belongs in the log of a failed start-up.
STARTED = ("startup complete", "Uvicorn running")


def test_ctrl_c_drains_and_exits_0_saying_it_drains_and_then_that_it_stopped_with_no_traceback(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    env = {"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_LOG_LEVEL": "info", "RMSERVE_CACHE": "off"}
    with serve(env, tmp_path) as server:
        scored = httpx.post(server.url + "/v1/score", json={"items": [{"prompt": "a", "response": "b"}]})
        assert scored.status_code == 200
        rid = scored.headers["x-request-id"]
        deadline = time.monotonic() + 120  # a ceiling for a busy machine, not a speed
        while rid not in server.log():  # its access line is written after the answer is sent
            assert time.monotonic() < deadline, "the request was never logged"
            time.sleep(0.05)
        before = len(server.log().splitlines())
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=60) == 0
    log = server.log()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    after = [json.loads(line)["message"] for line in log.splitlines()[before:]]
    assert len(after) == 2 and after[0].startswith("SIGINT: draining"), after
    assert after[1].startswith("stopped: drained in ") and after[1].endswith(" s; exit status 0"), after
    # What it said at start: where it listens, in its own words; never uvicorn's lifespan lines.
    assert "listening on http://127.0.0.1:" in log and "startup complete" not in log


def _access_lines(server: ServerProcess) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line["logger"] == "rmserve.access"]


@pytest.mark.parametrize("log_probes", [False, True])
def test_probes_stay_out_of_the_access_log_unless_asked_and_a_4xx_line_names_the_error_type(
    log_probes: bool, tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    env = {"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_LOG_LEVEL": "info"}
    if log_probes:
        env["RMSERVE_LOG_PROBES"] = "true"
    with serve(env, tmp_path) as server:
        for _ in range(3):
            assert httpx.get(server.url + "/health/ready").status_code == 200
            assert httpx.get(server.url + "/health/live").status_code == 200
        bad = httpx.post(server.url + "/v1/score", json={"items": [{"prompt": "p"}]})
        assert bad.status_code == 422
        good = httpx.post(server.url + "/v1/score", json={"items": [{"prompt": "p", "response": "r"}]})
        deadline = time.monotonic() + 120  # a ceiling for a busy machine, not a speed
        while good.headers["x-request-id"] not in server.log():
            assert time.monotonic() < deadline, "the request was never logged"
            time.sleep(0.05)
        lines = {line["request_id"]: line for line in _access_lines(server)}
    assert lines[bad.headers["x-request-id"]]["error"] == "invalid_request"
    assert "error" not in lines[good.headers["x-request-id"]]
    probes = [line for line in lines.values() if line["route"].startswith("/health/")]
    assert len(probes) >= 6 if log_probes else probes == []


def _modified_bundle(tiny_bundles: dict[str, Path], tmp_path: Path) -> str:
    """A copy of a real bundle whose model was changed after export: its manifest reads fine, and
    the digest check while loading (after the server listens) refuses it."""
    copy = tmp_path / "modified"
    shutil.copytree(tiny_bundles["bert"], copy)
    model = bytearray((copy / "model.onnx").read_bytes())
    model[-10] ^= 1
    (copy / "model.onnx").write_bytes(bytes(model))
    return str(copy)


@pytest.mark.parametrize(
    "case,reason",
    [
        ("no bundle there", "bundle directory /nonexistent/bundle does not exist"),
        ("an empty keys file", "has no keys"),
        ("a bundle modified after export", "does not match the manifest's"),
    ],
)
def test_a_failed_start_up_says_why_and_nothing_that_says_it_started(
    case: str, reason: str, tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    env = {"RMSERVE_LOG_LEVEL": "info", "RMSERVE_MODELS": str(tiny_bundles["bert"])}
    if case == "no bundle there":
        env["RMSERVE_MODELS"] = "/nonexistent/bundle"
    elif case == "an empty keys file":
        (tmp_path / "keys").write_text("\n")
        env["RMSERVE_API_KEYS_FILE"] = str(tmp_path / "keys")
    else:
        env["RMSERVE_MODELS"] = _modified_bundle(tiny_bundles, tmp_path)
    with serve(env, tmp_path, ready=False) as server:
        status = server.process.wait(timeout=120)
    log = server.log()
    assert status == 1, log
    assert "rmserve: start-up failed: " in log and reason in log, log
    for line in STARTED:
        assert line not in log, log
    assert "Traceback" not in log, log
    if case != "a bundle modified after export":  # found before the server listens
        assert "listening on" not in log, log
