"""Whether a served decoder reuses prefixes is said where an operator looks: the start-up log line of
the model and ``/v1/models``, with the reason when it does not and the setting that turns it on.

``auto`` is left to choose as it does (OpenVINO first on a CPU; docs/prefix-reuse.md): the prefix-reuse
graph runs on ONNX Runtime's CPU provider only, so a default server on such a machine reuses nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from rmserve.bundle import load_bundle
from tests.support.server import serve


@pytest.mark.parametrize("provider", ["auto", "cpu"])
def test_a_server_says_at_start_up_and_in_v1_models_whether_a_decoder_reuses_prefixes_and_why_not(
    tiny_bundles: dict[str, Path], tmp_path: Path, provider: str
) -> None:
    bundle = tiny_bundles["qwen2"]
    assert load_bundle(bundle).manifest.past_graph is not None  # the bundle could reuse prefixes
    env = {"RMSERVE_MODELS": f"q={bundle}", "RMSERVE_LOG_LEVEL": "info", "RMSERVE_CACHE": "off"}
    if provider != "auto":
        env["RMSERVE_PROVIDER"] = provider
    with serve(env, tmp_path) as server:
        (model,) = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
        messages = [json.loads(line)["message"] for line in server.log().splitlines() if line.startswith("{")]
    (loaded,) = [m for m in messages if m.startswith("loaded model q ")]
    reuse = model["prefix_reuse"]
    if model["provider"] == "cpu":  # as asked, or auto's choice on a machine without OpenVINO
        assert reuse["enabled"] is True and "; prefix reuse on (" in loaded, loaded
    else:  # auto chose another backend (OpenVINO, here): off, saying why and what turns it on
        assert reuse["enabled"] is False
        for words in (model["provider"], "--provider cpu", "RMSERVE_PROVIDER=cpu"):
            assert words in reuse["reason"], reuse
        assert loaded.endswith(f"; prefix reuse off: {reuse['reason']}"), loaded
