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
