"""What each install gives: the client alone into a bare environment, the server with its extra, and one
``rmserve`` namespace with no top-level ``service`` or ``models`` on a user's path."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import httpx
import pytest

from tests.support.server import REPO, serve

# What a trainer's environment must not receive from `pip install rmserve`.
HEAVY = {
    "onnxruntime",
    "onnxruntime-gpu",
    "openvino",
    "fastapi",
    "starlette",
    "uvicorn",
    "redis",
    "tokenizers",
    "jinja2",
    "torch",
    "transformers",
    "numpy",
    "pydantic",
}


def _run(python: Path | str, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def client_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding only ``pip install <clone>``: the client install."""
    root = tmp_path_factory.mktemp("client-env")
    venv.EnvBuilder(with_pip=False).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    # This environment's pip installs into the new one (`--python`), so the new one starts bare.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return python


def _distributions(python: Path | str, cwd: Path) -> set[str]:
    proc = _run(
        python,
        "import importlib.metadata as m, json; "
        "print(json.dumps(sorted({d.metadata['Name'].lower() for d in m.distributions()})))",
        cwd,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout))


@pytest.mark.slow
def test_the_client_install_brings_httpx_and_nothing_heavy(client_env: Path, tmp_path: Path) -> None:
    installed = _distributions(client_env, tmp_path)
    assert {"rmserve", "httpx"} <= installed
    assert not installed & HEAVY, f"the client install pulled {sorted(installed & HEAVY)}"


@pytest.mark.slow
def test_the_client_install_scores_against_a_live_server(
    client_env: Path, tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    items = [
        {"prompt": "How do I boil an egg?", "response": "Eight minutes in boiling water."},
        {"text": "plain text"},
    ]
    with serve({"RMSERVE_MODELS": str(tiny_bundles["bert"]), "RMSERVE_PRECISION": "fp32"}, tmp_path) as srv:
        code = (
            "import json, sys; import rmserve.adapters.trl, rmserve.adapters.verl; "
            "from rmserve.client import RewardClient; "
            f"items = json.loads({json.dumps(json.dumps(items))}); "
            "items = [(i['prompt'], i['response']) if 'prompt' in i else i for i in items]; "
            f"print(json.dumps(RewardClient({srv.url!r}).score(items)))"
        )
        proc = _run(client_env, code, tmp_path)
        assert proc.returncode == 0, proc.stderr
        body = {"items": items}
        expected = httpx.post(srv.url + "/v1/score", json=body).json()["scores"]
    assert json.loads(proc.stdout) == expected


@pytest.mark.slow
def test_rmserve_serve_without_the_server_extra_names_the_extra_and_how_to_install_it(
    client_env: Path, tmp_path: Path
) -> None:
    rmserve = str(client_env.with_name("rmserve"))
    proc = subprocess.run([rmserve, "serve"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    first, *ways = proc.stderr.strip().splitlines()
    assert first.startswith("rmserve serve: needs the server extra (missing module "), proc.stderr
    # rmserve is not on a public index yet: a clone and a built wheel come first.
    assert ["pip install" in w for w in ways] == [True] * 3, proc.stderr
    assert "'.[server]'" in ways[0] and "python -m build" in ways[1] and "'rmserve[server]'" in ways[2]
    version = subprocess.run([rmserve, "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("rmserve ")


@pytest.mark.slow
def test_no_top_level_service_models_tests_or_loadtests_outside_the_clone(
    client_env: Path, tmp_path: Path
) -> None:
    for python in (client_env, sys.executable):  # the client install, and this editable dev install
        for name in ("service", "models", "tests", "loadtests"):
            proc = _run(python, f"import {name}", tmp_path)
            assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, (python, name)
        assert _run(python, "import rmserve.client", tmp_path).returncode == 0


@pytest.fixture(scope="module")
def server_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding a regular (not editable) install of the clone, the wheel's layout,
    with the server extra's packages borrowed from this environment (a .pth line) to spare a download."""
    root = tmp_path_factory.mktemp("server-env")
    venv.EnvBuilder(with_pip=False).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # A path line only: this environment's own .pth files (its editable rmserve) are not processed there.
    (Path(site) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return python


@pytest.mark.slow
def test_the_installed_package_serves_the_bundled_default_model_with_nothing_set(
    server_env: Path, tmp_path: Path
) -> None:
    where = _run(server_env, "import rmserve.bundle as b; print(b.default_bundle_path())", tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).parts[-3:] == ("rmserve", "models", "default")
    assert not Path(where.stdout.strip()).is_relative_to(REPO), "the clone's bundle, not the installed one"
    request, documented = _readme_score_example()
    with serve({}, tmp_path, timeout=300, python=server_env) as srv:
        models = httpx.get(srv.url + "/v1/models").json()
        reply = httpx.post(srv.url + "/v1/score", json=request)
    assert reply.status_code == 200, reply.text
    assert [m["id"] for m in models["data"]] == ["default"]
    # The README's "Score a pair" answer, field by field. Its scores are OpenVINO bf16's, which `auto`
    # picks on a CPU with AVX512-BF16 (this machine's, CI's); elsewhere they are within bf16's rounding.
    answer = reply.json()
    assert {k: v for k, v in answer.items() if k != "scores"} == {
        k: v for k, v in documented.items() if k != "scores"
    }
    engine = (reply.headers["x-backend"], reply.headers["x-precision"])
    tolerance = 0.0 if engine == ("openvino", "bf16") else 0.05
    assert answer["scores"] == pytest.approx(documented["scores"], abs=tolerance), engine


def _readme_score_example() -> tuple[dict[str, object], dict[str, object]]:
    """The request body and the answer the README shows under "Score a pair"."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("Score a pair:") :]
    body = section[section.index("-d '") + 4 : section.index("'", section.index("-d '") + 4)]
    fence = section.index("```json") + len("```json")
    return json.loads(body), json.loads(section[fence : section.index("```", fence)])
