"""docs/api.md states the code's facts: every route, error type, metric and setting, with each setting's
flag and default, and nothing the code does not have."""

from __future__ import annotations

import re

from fastapi.routing import APIRoute

from rmserve.app import create_app
from rmserve.config import Settings, default_text
from rmserve.errors import RMServeError
from rmserve.metrics import Metrics
from tests.support.server import REPO

API = (REPO / "docs" / "api.md").read_text(encoding="utf-8")


def _rows(first: str) -> list[list[str]]:
    """The cells of each row of docs/api.md's tables whose first cell starts with ``first``."""
    rows = []
    for line in API.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(first):
            rows.append(cells)
    return rows


def _by_first_cell(first: str) -> dict[str, list[str]]:
    rows = _rows(first)
    by_first = {cells[0]: cells for cells in rows}
    assert len(by_first) == len(rows), "a row is listed twice"
    return by_first


def test_every_route_of_the_app_is_in_the_routes_table() -> None:
    documented = " ".join(cells[0] for cells in _rows("`"))
    for route in create_app(Settings()).routes:
        if isinstance(route, APIRoute):
            for method in route.methods:
                assert f"`{method} {route.path}`" in documented, f"{method} {route.path}"


def test_every_error_of_the_hierarchy_is_in_the_errors_table() -> None:
    rows = {(cells[0], cells[1]) for cells in _rows("") if cells[0].isdigit()}
    pending = [RMServeError]
    while pending:
        error = pending.pop()
        pending += error.__subclasses__()
        assert (str(error.status), f"`{error.type}`") in rows, error.__name__


def test_the_metrics_table_lists_exactly_the_metrics_served() -> None:
    served = set()
    for family in Metrics().registry.collect():
        served.add(family.name + "_total" if family.type == "counter" else family.name)
    assert set(_by_first_cell("`rmserve_")) == {f"`{name}`" for name in served}


def test_the_settings_table_lists_every_setting_with_its_flag_and_default() -> None:
    rows = _by_first_cell("`RMSERVE_")
    expected = {f"`RMSERVE_{name.upper()}`" for name in Settings.model_fields}
    assert set(rows) == expected
    for name, field in Settings.model_fields.items():
        _, flag, default, meaning = rows[f"`RMSERVE_{name.upper()}`"]
        assert flag == f"`--{name.replace('_', '-')}`"
        assert default == f"`{default_text(field.default)}`", name
        assert meaning, name


def test_the_docs_point_to_no_file_a_user_of_the_repository_lacks() -> None:
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "deploy").rglob("*.md")]:
        text = re.sub(r"<!--.*?-->", "", path.read_text(encoding="utf-8"), flags=re.S)
        assert "SPEC" not in text and "/work/" not in text, path


def test_the_readme_layout_names_every_module_and_package_of_service_and_models() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout") :]
    folders = [REPO / "service", REPO / "models", REPO / "models" / "train", REPO / "models" / "eval"]
    for folder in folders:
        for entry in folder.iterdir():
            if entry.name.startswith(("_", ".")):
                continue
            if entry.is_dir():
                assert f"`{entry.name}/`" in layout, entry
            elif entry.suffix == ".py":
                assert f"`{entry.stem}`" in layout, entry


def test_every_test_a_doc_cites_as_evidence_exists() -> None:
    tests = "".join(p.read_text(encoding="utf-8") for p in (REPO / "tests").rglob("*.py"))
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "loadtests" / "README.md"]:
        for name in set(re.findall(r"`(test_[a-z0-9_]+)`", path.read_text(encoding="utf-8"))):
            assert f"def {name}(" in tests, f"{path.name} cites {name}, which no test defines"
