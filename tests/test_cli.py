"""The ``rmserve`` command line as a user meets it: the version, and each command's help without the heavy
extras it needs only to run."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support.server import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _rmserve(*argv: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``rmserve ARGV`` in a fresh interpreter in which importing any module named in ``block`` fails,
    as it does where that package is not installed."""
    code = (
        "import sys\n"
        f"for name in {block!r}: sys.modules[name] = None\n"
        "from rmserve.cli import main\n"
        f"sys.exit(main({list(argv)!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_rmserve_version_prints_the_installed_version() -> None:
    proc = _rmserve("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"rmserve {PYPROJECT['project']['version']}"


@pytest.mark.parametrize("command", ["train", "export"])
def test_train_and_export_help_work_without_torch(command: str) -> None:
    proc = _rmserve(command, "--help", block=("torch", "transformers"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: rmserve {command}")
    assert "--base-model" in proc.stdout


def test_running_train_without_torch_names_the_extra_it_needs(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    proc = _rmserve("train", "--train", str(pairs), block=("torch",))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "rmserve train: needs the train extra (missing module 'torch'): pip install 'rmserve[train]'"
    )


def test_every_package_folder_is_listed_for_installation() -> None:
    """``pyproject.toml`` lists its packages by name: a new package folder that is not listed would be
    missing from every install that is not editable."""
    roots = PYPROJECT["tool"]["setuptools"]["package-dir"]
    found = set()
    for namespace, folder in roots.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            found.add(".".join([namespace, *relative.parts]))
    assert found == set(PYPROJECT["tool"]["setuptools"]["packages"])
