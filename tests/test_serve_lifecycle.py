"""``rmserve serve`` as a user at a terminal meets it: Ctrl-C, and start-ups that fail. Real processes."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.support.server import serve

# What uvicorn would print to say it started; none of it belongs in the log of a failed start-up.
STARTED = ("startup complete", "Uvicorn running")


def test_ctrl_c_drains_and_exits_0_with_one_line_and_no_traceback(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    env = {"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_LOG_LEVEL": "info", "RMSERVE_CACHE": "off"}
    with serve(env, tmp_path) as server:
        scored = httpx.post(server.url + "/v1/score", json={"items": [{"prompt": "a", "response": "b"}]})
        assert scored.status_code == 200
        rid = scored.headers["x-request-id"]
        deadline = time.monotonic() + 10
        while rid not in server.log():  # its access line is written after the answer is sent
            assert time.monotonic() < deadline, "the request was never logged"
            time.sleep(0.05)
        before = len(server.log().splitlines())
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=60) == 0
    log = server.log()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    after = log.splitlines()[before:]
    assert len(after) == 1 and "SIGINT: draining" in after[0], after
    # What it said at start: where it listens, in its own words; never uvicorn's lifespan lines.
    assert "listening on http://127.0.0.1:" in log and "startup complete" not in log


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
