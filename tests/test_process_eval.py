"""``rmserve eval`` with a process reward model: ProcessBench's metric, best-of-N by aggregate, the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rmserve.models.eval.command import main
from rmserve.models.eval.steps import best_of_n, processbench
from tests.support.server import serve


def _pb(subset: str, label: int, scores: list[float]) -> dict[str, Any]:
    return {
        "kind": "process",
        "subset": subset,
        "file": "f.jsonl",
        "label": label,
        "scores": [scores],
        "n_steps": [len(scores)],
    }


HAND_CHECKED = [
    # gsm8k, erroneous: predictions (first step under 0.5) 1, -1, 1, 1 for labels 1, 0, 2, 1 -> 2 of 4 right
    _pb("gsm8k", 1, [0.9, 0.2, 0.1]),
    _pb("gsm8k", 0, [0.7, 0.6]),
    _pb("gsm8k", 2, [0.8, 0.4, 0.3]),
    _pb("gsm8k", 1, [0.6, 0.45]),
    # gsm8k, correct: predictions -1, 1, -1 -> 2 of 3 right
    _pb("gsm8k", -1, [0.9, 0.8]),
    _pb("gsm8k", -1, [0.7, 0.3]),
    _pb("gsm8k", -1, [0.55]),
    # math: one of each, both right
    _pb("math", 0, [0.1]),
    _pb("math", -1, [0.6, 0.7]),
]


def test_processbench_f1_per_subset_is_the_harmonic_mean_of_the_two_accuracies_by_hand() -> None:
    pb = processbench(HAND_CHECKED)
    assert pb is not None
    gsm8k, math_ = pb["subsets"]["gsm8k"], pb["subsets"]["math"]
    assert (gsm8k["erroneous"], gsm8k["correct"]) == (4, 3)
    assert gsm8k["acc_erroneous"] == pytest.approx(0.5) and gsm8k["acc_correct"] == pytest.approx(2 / 3)
    assert gsm8k["f1"] == pytest.approx(4 / 7)  # 2 * 1/2 * 2/3 / (1/2 + 2/3)
    assert (math_["acc_erroneous"], math_["acc_correct"], math_["f1"]) == (1.0, 1.0, 1.0)
    assert pb["f1_mean"] == pytest.approx((4 / 7 + 1) / 2)
    # A threshold of 0.42 moves two predictions: 0.4 is now under it, 0.45 no longer is.
    moved = processbench(HAND_CHECKED, threshold=0.42)
    assert moved is not None
    assert moved["subsets"]["gsm8k"]["acc_erroneous"] == pytest.approx(1 / 4)
    assert moved["subsets"]["gsm8k"]["f1"] == pytest.approx(4 / 11)  # 2 * 1/4 * 2/3 / (1/4 + 2/3)


def test_best_of_n_picks_the_top_aggregate_and_splits_credit_on_ties() -> None:
    def row(scores: list[list[float]], correct: list[bool]) -> dict[str, Any]:
        return {
            "kind": "process_best_of_n",
            "subset": None,
            "file": "b.jsonl",
            "scores": scores,
            "correct": correct,
        }

    rows = [
        row([[0.9, 0.2], [0.6, 0.5]], [False, True]),  # min 0.2 vs 0.5: the correct one
        row([[0.9, 0.8], [0.3, 0.9]], [False, True]),  # min picks the wrong one; last would pick the right
        row([[0.5], [0.5], [0.1]], [True, False, True]),  # a tie at the top: half credit
    ]
    by_min, by_last = best_of_n(rows, "min"), best_of_n(rows, "last")
    assert by_min is not None and by_last is not None
    assert by_min["overall"]["accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert by_last["overall"]["accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)  # last: 0.2 < 0.5, 0.8 < 0.9
    assert by_min["overall"]["oracle"] == 1.0 and by_min["overall"]["random"] == pytest.approx(
        (0.5 + 0.5 + 2 / 3) / 3
    )


def _first_below(scores: list[float], threshold: float) -> int:
    for i, s in enumerate(scores):
        if s < threshold:
            return i
    return -1


def test_eval_scores_a_processbench_file_in_process_and_through_the_server_alike(
    process_bundles: dict[str, Path], tmp_path: Path
) -> None:
    rows = []
    for i in range(10):
        steps = [f"Step {j}: we add {i} and {j} to get {i + j}." for j in range(2 + i % 3)]
        label = -1 if i % 3 == 0 else i % len(steps)
        rows.append(
            {
                "id": f"gsm8k-{i}",
                "problem": f"What is {i} plus a few numbers?",
                "steps": steps,
                "label": label,
                "subset": ("gsm8k", "math")[i % 2],
            }
        )
    rows.append({"problem": "Pick one.", "candidates": [["a.", "b."], "c.\n\nd."], "correct": [True, False]})
    rows.append({"problem": "Pick one.", "steps": ["a."], "label": 3})  # a bad row: no step 3
    data = tmp_path / "processbench.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bundle = process_bundles["qwen2-tc2"]
    local, remote = tmp_path / "local", tmp_path / "remote"
    options = ["--threshold", "0.47", "--no-progress"]
    assert main([str(data), "--bundle", str(bundle), "--out", str(local), *options]) == 0
    summary = json.loads((local / "summary.json").read_text())
    recs = [json.loads(line) for line in (local / "scores.jsonl").read_text().splitlines()]
    assert summary["counts"]["processbench"] == 10 and summary["counts"]["bad_rows"] == 1
    # The F1 again, from the recorded step scores, with the metric written out here.
    for subset in ("gsm8k", "math"):
        part = [r for r in recs if r["kind"] == "process" and r["subset"] == subset]
        right = {True: [], False: []}  # type: dict[bool, list[bool]]
        for r in part:
            right[r["label"] == -1].append(_first_below(r["scores"][0], 0.47) == r["label"])
        a, b = sum(right[False]) / len(right[False]), sum(right[True]) / len(right[True])
        got = summary["processbench"]["subsets"][subset]
        assert (got["acc_erroneous"], got["acc_correct"]) == (pytest.approx(a), pytest.approx(b))
        assert got["f1"] == pytest.approx(0 if a + b == 0 else 2 * a * b / (a + b))
    assert summary["processbench"]["threshold"] == 0.47 and "process_steps.png" in summary["plots"]
    assert summary["process_best_of_n"]["overall"]["rows"] == 1
    assert "ProcessBench" in (local / "report.md").read_text()

    env = {"RMSERVE_MODELS": str(bundle), "RMSERVE_PRECISION": "fp32", "RMSERVE_CACHE": "off"}
    with serve(env, tmp_path) as server:
        assert main([str(data), "--url", server.url, "--out", str(remote), *options]) == 0
    served = {
        r["key"]: r["scores"]
        for r in (json.loads(x) for x in (remote / "scores.jsonl").read_text().splitlines())
    }
    for r in recs:
        for mine, theirs in zip(r["scores"], served[r["key"]], strict=True):
            assert mine == pytest.approx(theirs, abs=1e-5)


def test_the_docs_sample_file_reads_whole_as_processbench_and_best_of_n_rows(
    process_bundles: dict[str, Path], tmp_path: Path
) -> None:
    """docs/process.md's worked example evaluates examples/processbench-sample.jsonl: every row must read."""
    sample = Path(__file__).resolve().parents[1] / "examples" / "processbench-sample.jsonl"
    out = tmp_path / "out"
    bundle = process_bundles["qwen2-tc2"]
    assert main([str(sample), "--bundle", str(bundle), "--out", str(out), "--no-progress"]) == 0
    counts = json.loads((out / "summary.json").read_text())["counts"]
    assert (counts["processbench"], counts["process_best_of_n"], counts["bad_rows"]) == (8, 2, 0)
