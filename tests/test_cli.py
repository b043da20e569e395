"""The ``rmserve`` command line as a user meets it: the version, and each command's help without the heavy
extras it needs only to run."""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from rmserve.cli import COMMANDS
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
    version = PYPROJECT["project"]["version"]
    assert proc.stderr.splitlines() == [
        "rmserve train: needs the train extra (missing module 'torch'); install it as rmserve came:",
        "  from a clone of its repository:  pip install '.[train]'",
        f"  from a wheel (python -m build):  pip install 'dist/rmserve-{version}-py3-none-any.whl[train]'",
        "  from a package index:            pip install 'rmserve[train]'",
    ]


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


def _option_help(text: str) -> dict[str, str]:
    """A --help text's options -> the help each shows, joined onto one line."""
    shown: dict[str, str] = {}
    option = None
    for line in text.splitlines():
        if line.startswith("  -"):
            option = line.split()[0].rstrip(",")
            shown[option] = line
        elif option is not None and line.startswith("   "):
            shown[option] += " " + line.strip()
        else:
            option = None
    return {name: " ".join(help_text.split()) for name, help_text in shown.items()}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_of_every_command_shows_its_default_in_help(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a default
    parser = importlib.import_module(COMMANDS[command].module).build_parser()
    shown = _option_help(parser.format_help())
    for action in parser._actions:  # argparse has no public list of a parser's options
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if action.nargs == 0 and isinstance(action.default, bool) or action.default == argparse.SUPPRESS:
            continue  # a flag is off unless given; --help and --version have no default
        name = action.option_strings[0]
        if action.required:
            assert "(required)" in shown[name], f"rmserve {command} {name}: {shown[name]}"
            continue
        # "(unset: ...)": what a setting left unset does, which is its default.
        assert "default" in shown[name] or "(unset:" in shown[name], (
            f"rmserve {command} {name}: {shown[name]}"
        )
        if isinstance(action.default, list | tuple):  # as it is typed, not as Python prints it
            assert " ".join(map(str, action.default)) in shown[name], (
                f"rmserve {command} {name}: {shown[name]}"
            )
        elif action.default is not None:
            assert str(action.default) in shown[name], f"rmserve {command} {name}: {shown[name]}"
        # A default that is a rule shows its numbers; a value from a few shows them.
        assert not re.search(r"\(default: (by|chosen per) [^:)]*\)", shown[name]), shown[name]
        if action.choices is not None:
            assert "{" + ",".join(map(str, action.choices)) + "}" in shown[name], shown[name]
        assert "rmserve." not in shown[name], f"an internal module in rmserve {command} {name}: {shown[name]}"


def test_rmserve_help_points_to_the_docs() -> None:
    proc = _rmserve("--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "rmserve COMMAND --help" in text
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in text, page.name


def test_the_calibration_default_names_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from rmserve.models.export_command import build_parser

    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.setenv("RMSERVE_PARITY_DATA", "/data/hh/dev.jsonl.gz")
    assert (
        "pairs at /data/hh/dev.jsonl.gz when present"
        in _option_help(build_parser().format_help())["--calibration"]
    )
