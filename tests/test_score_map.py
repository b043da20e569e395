"""A bundle's score map (``score_shift``, ``score_scale`` in its format settings): served as
``score_scale * raw + score_shift`` wherever a score leaves (every route, the cache, a composite, the
client, ``rmserve eval``), under a version of its own.

The shipped default bundle is copied (its files linked) and sealed again with a map, so both serve the
same graph side by side; no torch is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from rmserve.bundle import BundleError, default_bundle_path, load_bundle, read_manifest, write_manifest
from rmserve.client import RewardClient
from rmserve.models.eval.command import main as eval_main
from tests.support.server import serve

SCALE, SHIFT = 2.5, -1.25
PAIRS = [("What is 2+2?", "4"), ("Tell me a joke.", "No."), ("hi", "hello there, how can I help?")]


def _resealed(tmp: Path, **format_changes: object) -> Path:
    """The default bundle's files, linked into ``tmp``, under a manifest with ``format_changes``."""
    source = default_bundle_path()
    manifest = read_manifest(source)
    out = tmp / "mapped"
    out.mkdir()
    for name in manifest.files:
        (out / name).symlink_to(source / name)
    fields = manifest.model_dump(mode="json", exclude={"files", "digest", "version"})
    fields["format"] = {**fields["format"], **format_changes}
    write_manifest(out, **fields)
    return out


def _mapped(raw: float) -> float:
    return SCALE * raw + SHIFT


def test_a_bundle_with_a_score_map_serves_mapped_scores_on_every_route_under_its_own_version(
    tmp_path: Path,
) -> None:
    mapped = _resealed(tmp_path, score_shift=SHIFT, score_scale=SCALE)
    plain_version = load_bundle(default_bundle_path()).manifest.version
    assert load_bundle(mapped).manifest.version != plain_version
    composites = tmp_path / "composites.yaml"
    composites.write_text("composites:\n  both:\n    components:\n      - {name: m, bundle: mapped}\n")
    env = {
        "RMSERVE_MODELS": f"plain={default_bundle_path()},mapped={mapped}",
        "RMSERVE_COMPOSITES": str(composites),
        "RMSERVE_PROVIDER": "cpu",
        "RMSERVE_PRECISION": "fp32",
    }
    items = [{"prompt": p, "response": r} for p, r in PAIRS]
    with serve(env, tmp_path) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        raw = http.post("/v1/score", json={"model": "plain", "items": items}).json()["scores"]
        expected = pytest.approx([_mapped(r) for r in raw], abs=1e-5)
        first = http.post("/v1/score", json={"model": "mapped", "items": items}).json()
        again = http.post("/v1/score", json={"model": "mapped", "items": items}).json()  # from the cache
        assert first["model_version"] == load_bundle(mapped).manifest.version != plain_version
        assert first["scores"] == expected and again["scores"] == first["scores"]
        assert again["usage"]["cache_hits"] == len(items)

        plain_text = http.post("/get_reward?model=plain", json={"query": ["hello", "a longer query"]}).json()
        got = http.post("/get_reward?model=mapped", json={"query": ["hello", "a longer query"]}).json()
        assert got["rewards"] == pytest.approx([_mapped(r) for r in plain_text["rewards"]], abs=1e-5)
        assert got["scores"] == got["rewards"]

        one = {"prompt": PAIRS[0][0], "response": PAIRS[0][1]}
        reward = http.post("/v1/reward?model=mapped", json=one).json()
        assert reward == pytest.approx(_mapped(raw[0]), abs=1e-5)
        classify = {"model": "mapped", "input": ["hello"], "use_activation": False}
        (row,) = http.post("/classify", json=classify).json()["data"]
        assert row["probs"] == pytest.approx([got["rewards"][0]], abs=1e-5)

        composite = http.post("/v1/score", json={"model": "both", "items": items}).json()
        assert composite["components"]["m"] == first["scores"] and composite["scores"] == first["scores"]
        with RewardClient(server.url) as client:
            assert client.score(PAIRS, model="mapped") == first["scores"]

    # rmserve eval in process reads the bundle as the server does.
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": r, "rejected": "?"}) + "\n" for p, r in PAIRS))
    out = tmp_path / "eval"
    assert eval_main([str(data), "--bundle", str(mapped), "--out", str(out), "--no-progress"]) == 0
    chosen = [json.loads(line)["scores"][0] for line in (out / "scores.jsonl").read_text().splitlines()]
    assert chosen == expected


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"score_scale": -1.0}, "score_scale"),
        ({"score_scale": 0.0}, "score_scale"),
        ({"score_shift": float("nan")}, "score_shift"),
    ],
)
def test_a_score_map_that_flips_or_flattens_the_order_is_refused_at_load(
    tmp_path: Path, changes: dict[str, float], words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        _resealed(tmp_path, **changes)


def test_a_process_bundle_with_a_score_map_is_refused_at_load(tmp_path: Path) -> None:
    """A step's value is what its step rule says (a probability for ``positive_prob``), which eval's
    ProcessBench threshold and ``prod`` rely on: a process manifest that maps scores does not read."""
    manifest = json.loads((default_bundle_path() / "manifest.json").read_text())
    process = {"step_token": "<extra_0>", "step_token_id": 7, "head": "token_classification"}
    manifest |= {"kind": "process", "process": {**process, "rule": "positive_prob", "positive_label": 1}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(tmp_path).kind == "process"  # it reads without a map
    manifest["format"]["score_scale"] = 2.0
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="score_shift and score_scale apply to outcome bundles"):
        read_manifest(tmp_path)
