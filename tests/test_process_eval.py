"""``rmserve eval`` with a process reward model: ProcessBench's metric, best-of-N by aggregate, the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rmserve.models.eval.command import main
from rmserve.models.eval.steps import best_of_n, processbench, threshold_for
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
        if s <= threshold:
            return i
    return -1


def _official(rows: list[tuple[str, int, np.ndarray]]) -> dict[str, float]:
    """ProcessBench's numbers as its official script defines them (QwenLM/ProcessBench
    ``code/run_eval_prm_trl.py``, written out here from that definition): per split, each step's
    prediction is ``argmax`` over its two label logits (a tie picks label 0); the predicted first error
    is the first step predicted 0, else -1; ``acc1`` = mean match over rows with ``label != -1``,
    ``acc2`` over ``label == -1``, both in percent; ``f1 = 2*acc1*acc2/(acc1+acc2)``; Average F1 = the
    mean over the splits."""
    out: dict[str, float] = {}
    for split in sorted({r[0] for r in rows}):
        matches: dict[bool, list[bool]] = {True: [], False: []}
        for _, label, logits in (r for r in rows if r[0] == split):
            zeros = [i for i, lab in enumerate(np.argmax(logits, axis=-1)) if lab == 0]
            predicted = zeros[0] if zeros else -1
            matches[label == -1].append(predicted == label)
        acc1, acc2 = np.mean(matches[False]) * 100, np.mean(matches[True]) * 100
        out[split] = 2 * acc1 * acc2 / (acc1 + acc2)
    out["average"] = float(np.mean([out[s] for s in sorted(out)]))
    return out


def _fixture_logits() -> list[tuple[str, int, np.ndarray]]:
    """Four splits' rows in one list, with 2-label logits per step, exact ties included."""
    rng = np.random.default_rng(7)
    rows = []
    for split in ("gsm8k", "math", "olympiadbench", "omnimath"):
        for k in range(24):
            n = 1 + k % 6
            logits = rng.normal(size=(n, 2)).astype(np.float32)
            if k % 5 == 0:  # a tie: the official argmax calls it an error
                logits[k % n, 1] = logits[k % n, 0]
            label = -1 if k % 3 == 0 else k % n
            rows.append((split, label, logits))
    return rows


@pytest.mark.parametrize("rule", ["positive_prob", "prob_diff", "raw"])
def test_processbench_f1_equals_the_official_scripts_with_every_split_in_one_file_at_the_rules_threshold(
    rule: str,
) -> None:
    official = _official(_fixture_logits())
    records = []
    for i, (split, label, logits) in enumerate(_fixture_logits()):
        margin = (logits[:, 1] - logits[:, 0]).astype(np.float64)
        # The step values as the graph's StepHead computes them (models/process_heads.py).
        values = {
            "positive_prob": 1 / (1 + np.exp(-margin)),
            "prob_diff": np.tanh(margin / 2),
            "raw": margin,  # a 1-label head's logit: here the margin, whose sign is the argmax
        }[rule]
        records.append(
            {
                "kind": "process",
                "subset": None,
                "id": f"{split}-{i}",  # ProcessBench's ids name their split; one file holds all four
                "file": "processbench.jsonl",
                "label": label,
                "scores": [[float(v) for v in values]],
                "n_steps": [len(values)],
            }
        )
    pb = processbench(records, threshold_for(rule))
    assert pb is not None and pb["threshold"] == (0.5 if rule == "positive_prob" else 0.0)
    assert set(pb["subsets"]) == {"gsm8k", "math", "olympiadbench", "omnimath"}
    for split, g in pb["subsets"].items():
        assert g["f1"] * 100 == pytest.approx(official[split], abs=1e-9)
    assert pb["f1_mean"] * 100 == pytest.approx(official["average"], abs=1e-9)
    # The rule's threshold matters: 0.5 on p(+) - p(-) is not the official boundary.
    if rule == "prob_diff":
        wrong = processbench(records, 0.5)
        assert wrong is not None and wrong["f1_mean"] * 100 != pytest.approx(official["average"])


def test_eval_scores_a_processbench_file_in_process_and_through_the_server_alike(
    process_bundles: dict[str, Path], tmp_path: Path
) -> None:
    rows = []
    for i in range(10):
        steps = [f"Add {j}: {i + j}." for j in range(2 + i % 3)]
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
    # Over the bundle's max_length: reported apart, never scored cut.
    rows.append({"problem": "Why? " * 400, "steps": ["Because.", "So."], "label": 1, "subset": "math"})
    data = tmp_path / "processbench.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bundle = process_bundles["qwen2-tc2"]
    local, remote = tmp_path / "local", tmp_path / "remote"
    options = ["--threshold", "0.47", "--no-progress"]
    assert main([str(data), "--bundle", str(bundle), "--out", str(local), *options]) == 0
    summary = json.loads((local / "summary.json").read_text())
    recs = [json.loads(line) for line in (local / "scores.jsonl").read_text().splitlines()]
    counts = summary["counts"]
    assert (counts["processbench"], counts["bad_rows"], counts["over_max_length"]) == (10, 1, 1)
    over = summary["processbench"]["subsets"]["math"]
    assert (over["over_max_length"], over["rows"], summary["processbench"]["overall"]["over_max_length"]) == (
        1,
        5,
        1,
    )
    (long,) = summary["over_max_length"]["first"]
    assert "over max_length, not scored cut" in long["reason"]
    assert not any("max_length" in b["reason"] for b in summary["bad_rows"]["first"])
    # The F1 again, from the recorded step scores, with the metric written out here.
    for subset in ("gsm8k", "math"):
        part = [r for r in recs if r["kind"] == "process" and r["subset"] == subset and "error" not in r]
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
    remote_recs = [json.loads(x) for x in (remote / "scores.jsonl").read_text().splitlines()]
    served = {r["key"]: r["scores"] for r in remote_recs if "error" not in r}
    assert sum(bool(r.get("too_long")) for r in remote_recs) == 1
    assert (
        json.loads((remote / "summary.json").read_text())["processbench"]["overall"]["over_max_length"] == 1
    )
    for r in (r for r in recs if "error" not in r):
        for mine, theirs in zip(r["scores"], served[r["key"]], strict=True):
            assert mine == pytest.approx(theirs, abs=1e-5)


def test_the_docs_sample_file_reads_whole_and_its_rows_over_max_length_are_reported_apart(
    process_bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/process.md's worked example evaluates examples/processbench-sample.jsonl: every row must read;
    the tiny bundle's max_length (128) is under two of its math rows, which are counted apart, unscored,
    and neither as bad rows nor as rows scored, in the summary and in what the command prints."""
    sample = Path(__file__).resolve().parents[1] / "examples" / "processbench-sample.jsonl"
    out = tmp_path / "out"
    bundle = process_bundles["qwen2-tc2"]
    assert main([str(sample), "--bundle", str(bundle), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    summary = json.loads((out / "summary.json").read_text())
    counts, pb, run = summary["counts"], summary["processbench"], summary["run"]
    assert (counts["processbench"], counts["process_best_of_n"], counts["bad_rows"]) == (6, 2, 0)
    assert (counts["rows_read"], counts["rows_scored"], counts["over_max_length"]) == (10, 8, 2)
    assert (run["rows_scored"], run["rows_over_max_length"], run["rows_refused"]) == (8, 2, 0)
    assert printed[0].endswith("; 8 rows scored, 2 over max_length (not scored cut), 0 bad rows skipped")
    assert printed[-2].startswith("8 rows scored now, 2 over max_length (not scored cut), 0 resumed, in ")
    assert (out / "bad_rows.jsonl").read_text() == ""
    assert len((out / "over_max_length.jsonl").read_text().splitlines()) == 2
    assert pb["overall"]["over_max_length"] == 2 and pb["subsets"]["math"]["over_max_length"] == 2
