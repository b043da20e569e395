"""/get_reward's ``extra_logs`` holds rmserve's own keys (``rm_tokens``, ``rm_skipped``, ...), a composite's
components under their names and ``<name>_normalized``, and a head's objectives under their names: a name
that would overwrite another key is refused where it is declared (the composites file, the bundle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rmserve.bundle import BundleError, default_bundle_path, read_manifest
from rmserve.composites.spec import CompositeError, read_composites


def test_a_component_named_like_a_key_get_reward_reserves_or_like_anothers_normalised_value_is_refused(
    tmp_path: Path,
) -> None:
    """/get_reward's extra_logs holds each component under its name and ``<name>_normalized`` beside
    rmserve's own keys: a name that would overwrite one of them is refused where it is declared."""

    def problem(text: str) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(CompositeError) as caught:
            read_composites(path)
        return str(caught.value)

    for key in ("rm_tokens", "rm_truncated", "rm_skipped", "rm_steps", "rm_step_min"):
        reserved = problem(f"composites:\n  a:\n    components:\n      - {{name: {key}, bundle: default}}\n")
        assert "composites.a.components[0].name" in reserved and f"{key!r}" in reserved
        assert "reserved" in reserved
    twin = problem(
        "composites:\n  a:\n    components:\n      - {name: helpful, bundle: default}\n"
        "      - {name: helpful_normalized, bundle: default}\n"
    )
    assert "'helpful_normalized'" in twin and "'helpful'" in twin


@pytest.mark.parametrize("objective", ["rm_tokens", "rm_skipped", "rm_step_last"])
def test_a_bundle_whose_objective_is_named_like_a_reserved_log_key_is_refused_at_load(
    tmp_path: Path, objective: str
) -> None:
    """/get_reward puts a head's objectives in extra_logs under their names, beside rmserve's own keys."""
    manifest = json.loads((default_bundle_path() / "manifest.json").read_text())
    manifest["head"] = {"form": "gating", "components": ["helpfulness", objective]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"objective {objective!r}.*reserved"):
        read_manifest(tmp_path)
