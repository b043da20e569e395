"""Ops: graceful drain under load, the dashboard against a live /metrics, and a locust smoke run."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from rmserve.bundle import load_bundle
from rmserve.engines.base import pad_batch
from rmserve.engines.onnxruntime import OnnxRuntimeEngine
from rmserve.formatting import Formatter
from rmserve.items import PairItem
from tests.deploy.dashboard import dashboard_metric_names, dashboard_series_names
from tests.support.server import serve

REPO = Path(__file__).resolve().parents[1]


def _engine_scores(bundle_dir: Path, requests: list[list[dict[str, str]]]) -> list[list[float]]:
    """Each request's scores from a direct fp32 engine call (an item's score does not depend on its batch)."""
    bundle = load_bundle(bundle_dir)
    engine = OnnxRuntimeEngine(bundle.model_path, threads=1)
    formatter = Formatter(bundle)
    out = []
    for items in requests:
        encoded = formatter.encode([PairItem(i["prompt"], i["response"]) for i in items])
        batch = pad_batch([e.ids for e in encoded], bundle.manifest.format.pad_token_id)
        out.append([float(x) for x in engine.infer(batch)])
    engine.close()
    return out


def test_sigterm_drains_accepted_work_and_exits_within_the_grace(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    env = {
        "RMSERVE_MODELS": str(tiny_bundles["llama"]),
        "RMSERVE_CACHE": "off",
        "RMSERVE_PRECISION": "fp32",
        "RMSERVE_MAX_BATCH_TOKENS": "256",
        "RMSERVE_DRAIN_GRACE_S": "30",
    }
    # Distinct items in every request: identical ones would be scored once for all (single-flight).
    requests = [
        [{"prompt": f"question {r} {i} " * 20, "response": f"answer {r} {i} " * 20} for i in range(8)]
        for r in range(24)
    ]
    expected = _engine_scores(tiny_bundles["llama"], requests)
    with serve(env, tmp_path) as server:

        async def load_then_sigterm() -> tuple[list[httpx.Response], float]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                sent = [asyncio.create_task(client.post("/v1/score", json={"items": r})) for r in requests]
                deadline = time.monotonic() + 600  # a ceiling for a busy machine, not a speed
                # SIGTERM once work is accepted and waiting for the model.
                while await asyncio.to_thread(server.metric, "rmserve_queue_depth") < 8:
                    assert time.monotonic() < deadline, "the requests never queued"
                    await asyncio.sleep(0.01)
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                return list(await asyncio.gather(*sent)), signalled

        responses, signalled = asyncio.run(load_then_sigterm())
        # Every accepted request finished with its right scores: nothing accepted was lost.
        assert [r.status_code for r in responses] == [200] * len(requests)
        for resp, want in zip(responses, expected, strict=True):
            np.testing.assert_allclose(resp.json()["scores"], want, rtol=1e-5, atol=1e-5)
        # New work is refused once draining: the listener is closed (or, on a kept connection, 503).
        try:
            late = httpx.post(server.url + "/v1/score", json={"items": requests[0][:1]}, timeout=5)
            late_status: int | None = late.status_code
        except httpx.TransportError:
            late_status = None
        assert late_status in (None, 503)
        assert server.process.wait(timeout=35) == 0
        assert time.monotonic() - signalled < 30


def test_every_metric_the_dashboard_queries_exists_on_a_live_server(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    with serve({"RMSERVE_MODELS": str(tiny_bundles["bert"])}, tmp_path) as server:
        httpx.post(server.url + "/v1/score", json={"items": [{"prompt": "a", "response": "b"}]})
        httpx.post(server.url + "/v1/score", json={"items": [{"prompt": "a", "response": "b"}]})
        text = httpx.get(server.url + "/metrics").text
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert dashboard_series_names() <= exposed, dashboard_series_names() - exposed
    assert dashboard_metric_names() <= families | {f.removesuffix("_total") for f in families} | {
        f + "_total" for f in families
    }


def test_locust_smoke_run_on_loopback(tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    locust = shutil.which("locust", path=str(Path(sys.executable).parent)) or shutil.which("locust")
    assert locust is not None, "locust is not installed: pip install -e '.[dev]'"
    with serve({"RMSERVE_MODELS": str(tiny_bundles["bert"])}, tmp_path) as server:
        proc = subprocess.run(
            [
                locust,
                "-f",
                str(REPO / "loadtests" / "locustfile.py"),
                "--host",
                server.url,
                "--headless",
                "-u",
                "8",
                "-r",
                "8",
                "-t",
                "8s",
                "--only-summary",
                "--exit-code-on-error",
                "1",
                "--csv",
                str(tmp_path / "locust"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        stats = (tmp_path / "locust_stats.csv").read_text().splitlines()
        total = next(line for line in stats if ",Aggregated," in line).split(",")
        assert int(total[2]) > 0 and int(total[3]) == 0, stats  # requests made, none failed
        names = "\n".join(stats)
        for name in (
            "/get_reward (1 sample)",
            "/v1/score (1 item)",
            "/v1/score (64 items)",
            "/v1/score (hot)",
        ):
            assert name in names
