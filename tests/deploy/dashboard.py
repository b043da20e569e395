"""What the Grafana dashboard queries, so a test can hold it against a live server's /metrics.

``dashboard_metric_names`` gives the base metric families (``rmserve_request_duration_seconds``);
``dashboard_series_names`` the exact series (``rmserve_request_duration_seconds_bucket``). With a live
server's Prometheus text ``text``::

    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
    assert dashboard_series_names(path) <= exposed
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert dashboard_metric_names(path) <= families
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "grafana-dashboard.json"

_METRIC = re.compile(r"\brmserve_[a-zA-Z0-9_]*[a-zA-Z0-9]")
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def dashboard_queries(path: Path | str = DASHBOARD) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets (rows nested too) and template queries."""
    dash = json.loads(Path(path).read_text())
    panels = _panels(dash.get("panels", []))
    queries = [t["expr"] for panel in panels for t in panel.get("targets", []) if t.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and isinstance(query, str):
            queries.append(query)
    return queries


def dashboard_series_names(path: Path | str = DASHBOARD) -> set[str]:
    """The rmserve_* series names exactly as the dashboard queries them (``..._bucket`` kept)."""
    return {name for query in dashboard_queries(path) for name in _METRIC.findall(query)}


def dashboard_metric_names(path: Path | str = DASHBOARD) -> set[str]:
    """The rmserve_* metric families the dashboard queries: series names less _bucket/_count/_sum."""
    return {_base(name) for name in dashboard_series_names(path)}


def _base(name: str) -> str:
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))
