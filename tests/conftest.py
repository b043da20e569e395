"""Shared fixtures: tiny real models exported through the real exporter, real servers."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> bundle directory; each bundle's checkpoint is its sibling ``checkpoint``."""
    from tests.support.tiny import tiny_bundle

    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny_bundle(arch, root / arch) for arch in ("bert", "llama", "qwen2")}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "hh-rlhf" / "dev.jsonl.gz").is_file():
        pytest.skip(f"the shared preference data is not at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def process_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Process reward bundles by form (tests/support/tiny.py PROCESS_FORMS), all of them lean graphs;
    each checkpoint is the bundle's sibling ``checkpoint``. ``llama-tc1`` has max_length 64
    (truncation); ``llama-lm`` is exported through the ``rmserve export`` command, Math-Shepherd style."""
    from rmserve.models.export_command import main as export_main
    from tests.support.tiny import STEP_TOKENS, tiny_process_bundle, tiny_process_checkpoint

    root = tmp_path_factory.mktemp("process")
    bundles = {
        "qwen2-tc2": tiny_process_bundle("qwen2-tc2", root / "qwen2-tc2"),
        "llama-tc1": tiny_process_bundle("llama-tc1", root / "llama-tc1", max_length=64),
        "qwen2-prm": tiny_process_bundle("qwen2-prm", root / "qwen2-prm"),
    }
    checkpoint = tiny_process_checkpoint("llama-lm", root / "llama-lm" / "checkpoint")
    bundle = root / "llama-lm" / "bundle"
    argv = [str(checkpoint), str(bundle), "--name", "tiny-llama-lm", "--step-token", STEP_TOKENS["llama-lm"]]
    assert export_main([*argv, "--label-tokens", "+", "-"]) == 0
    bundles["llama-lm"] = bundle
    return bundles
