"""What a process reward model's eval scores say: ProcessBench's metric, best-of-N by aggregate, the plot.

ProcessBench (QwenLM/ProcessBench ``code/run_eval_prm_trl.py``): a solution's predicted first wrong
step is the first step whose two-label ``argmax`` is the negative label, or -1 when none is. ``argmax``
picks the negative label when p(+) <= 0.5 (a tie goes to the first label, the negative one), so here a
step is predicted wrong when its score is at or under the threshold, and the threshold follows the
bundle's rule: 0.5 for probabilities (``positive_prob``, ``sigmoid``), 0 for ``prob_diff`` (p(+) - p(-) <=
0 exactly when p(+) <= 0.5) and for ``raw`` logits; ``--threshold`` overrides it. On the erroneous solutions
(``label`` >= 0) a prediction is right when it names the labelled step; on the correct ones
(``label`` == -1) when it is -1. Each subset reports both accuracies and their harmonic mean, F1;
ProcessBench's score is the mean F1 over the subsets. Here the accuracies are fractions (ProcessBench
prints percentages) and a subset is the row's ``subset``, else the split its ``id`` names (ProcessBench's
ids read ``gsm8k-0``), else its file: a file holding every split still reports each apart.

A row longer than the model's ``max_length`` is never scored cut (a cut solution would be judged on
steps it does not show, or without its problem): the scorers send such rows untruncated and record the
refusal (``too_long``); they are counted apart per subset (``over_max_length``) and left out of F1, as
the official scripts never truncate.

Best-of-N: each candidate's step scores become one score by the aggregate (``min`` by default), the top
candidate is picked, and a row earns the share of correct candidates among those tied at the top
(1 for a correct unique top). Beside it: the oracle (a correct candidate exists) and the mean share
of correct candidates (picking at random).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rmserve.kinds import Aggregate, aggregate_steps

DEFAULT_THRESHOLD = 0.5
# Rules whose values are centred on 0 rather than on 0.5 (ProcessBench's argmax boundary).
CENTRED_RULES = ("prob_diff", "raw")
PLOT = "process_steps.png"
# Steps before and after the first wrong one shown in the plot.
SPAN = 6


def threshold_for(rule: str | None) -> float:
    """The threshold at which a step's score under ``rule`` marks the same boundary as ProcessBench's
    two-label argmax: 0 for rules centred on 0, else 0.5 (a probability)."""
    return 0.0 if rule in CENTRED_RULES else DEFAULT_THRESHOLD


def first_below(steps: Sequence[float], threshold: float) -> int:
    """Index of the first step scored at or under ``threshold``; -1 when none is."""
    return next((i for i, s in enumerate(steps) if s <= threshold), -1)


_SPLIT_ID = re.compile(r"^(?P<split>[A-Za-z][\w.]*)-\d+$")


def _group(record: dict[str, Any]) -> str:
    if record.get("subset"):
        return str(record["subset"])
    named = _SPLIT_ID.match(str(record.get("id") or ""))
    return named["split"] if named else Path(record["file"]).name


def _too_long(record: dict[str, Any]) -> bool:
    return bool(record.get("too_long"))


def _f1(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _processbench_group(records: list[dict[str, Any]], threshold: float, over: int = 0) -> dict[str, Any]:
    erroneous, correct = [], []
    for r in records:
        predicted = first_below(r["scores"][0], threshold)
        (correct if r["label"] == -1 else erroneous).append(float(predicted == r["label"]))
    acc_error, acc_correct = _mean(erroneous), _mean(correct)
    return {
        "rows": len(records),
        "erroneous": len(erroneous),
        "correct": len(correct),
        "acc_erroneous": acc_error,
        "acc_correct": acc_correct,
        "f1": _f1(acc_error, acc_correct),
        "rows_with_steps_dropped": sum(len(r["scores"][0]) < r["n_steps"][0] for r in records),
        "over_max_length": over,
    }


def processbench(
    records: list[dict[str, Any]], threshold: float = DEFAULT_THRESHOLD
) -> dict[str, Any] | None:
    """ProcessBench's metric per subset and overall, for the scored ProcessBench rows (rows over
    max_length counted apart); None without any."""
    rows = [r for r in records if r["kind"] == "process" and "error" not in r]
    long = [r for r in records if r["kind"] == "process" and _too_long(r)]
    if not rows and not long:
        return None
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    over: dict[str, int] = defaultdict(int)
    for r in rows:
        by_group[_group(r)].append(r)
    for r in long:
        by_group.setdefault(_group(r), [])
        over[_group(r)] += 1
    subsets = {
        name: _processbench_group(group, threshold, over[name]) for name, group in sorted(by_group.items())
    }
    f1s = [g["f1"] for g in subsets.values() if g["f1"] is not None]
    return {
        "threshold": threshold,
        "f1_mean": _mean(f1s),
        "subsets": subsets,
        "overall": _processbench_group(rows, threshold, len(long)),
        "method": "prediction = index of the first step scored at or under the threshold, -1 if none; "
        "accuracy on erroneous solutions (prediction == label) and on correct ones (prediction == -1), "
        "F1 = their harmonic mean; f1_mean = mean F1 over subsets (ProcessBench, code/run_eval_prm_trl.py); "
        "rows over max_length are counted apart (over_max_length), never scored cut",
    }


def _best_of_n_row(record: dict[str, Any], how: Aggregate) -> tuple[float, bool, float]:
    """(credit, oracle, random) of one best-of-N row of candidates in steps."""
    totals = [aggregate_steps(steps, how) for steps in record["scores"]]
    top = max(totals)
    tied = [ok for total, ok in zip(totals, record["correct"], strict=True) if total == top]
    correct = record["correct"]
    return sum(tied) / len(tied), any(correct), sum(correct) / len(correct)


def best_of_n(records: list[dict[str, Any]], how: Aggregate) -> dict[str, Any] | None:
    """Best-of-N accuracy by each candidate's aggregate, per subset and overall; None without such rows."""
    rows = [r for r in records if r["kind"] == "process_best_of_n" and "error" not in r]
    if not rows:
        return None

    def group(part: list[dict[str, Any]]) -> dict[str, Any]:
        outcomes = [_best_of_n_row(r, how) for r in part]
        return {
            "rows": len(part),
            "accuracy": _mean([o[0] for o in outcomes]),
            "oracle": _mean([float(o[1]) for o in outcomes]),
            "random": _mean([o[2] for o in outcomes]),
        }

    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_group[_group(r)].append(r)
    return {
        "aggregate": how,
        "subsets": {name: group(part) for name, part in sorted(by_group.items())},
        "overall": group(rows),
        "method": f"the candidate with the top {how} of its step scores is picked; credit = share of correct "
        "candidates among those tied at the top; oracle = a correct candidate exists; random = mean share "
        "of correct candidates",
    }


def steps_by_offset(records: list[dict[str, Any]]) -> dict[int, list[float]]:
    """Step scores of the erroneous ProcessBench solutions by their offset from the first wrong step."""
    out: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r["kind"] == "process" and "error" not in r and r["label"] >= 0:
            for i, score in enumerate(r["scores"][0]):
                if -SPAN <= i - r["label"] <= SPAN:
                    out[i - r["label"]].append(score)
    return dict(out)


def write_plot(out: Path, records: list[dict[str, Any]], threshold: float, plt: Any) -> str | None:
    """Mean step score (and its interquartile range) before, at and after the first wrong step of the
    erroneous solutions, beside the correct solutions' steps; None when there is nothing to show."""
    by_offset = steps_by_offset(records)
    if not by_offset:
        return None
    good = [
        s
        for r in records
        if r["kind"] == "process" and "error" not in r and r["label"] == -1
        for s in r["scores"][0]
    ]
    offsets = sorted(by_offset)
    values = [np.asarray(by_offset[o]) for o in offsets]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot(offsets, [v.mean() for v in values], marker="o", color="tab:red", label="erroneous solutions")
    ax.fill_between(
        offsets,
        [np.percentile(v, 25) for v in values],
        [np.percentile(v, 75) for v in values],
        color="tab:red",
        alpha=0.15,
        label="interquartile range",
    )
    if good:
        ax.axhline(
            float(np.mean(good)),
            color="tab:green",
            linestyle="-",
            label=f"correct solutions' steps (n={len(good)})",
        )
    ax.axhline(threshold, color="gray", linestyle=":", label=f"threshold {threshold}")
    ax.axvline(0, color="black", linestyle="--", linewidth=1)
    ax.set(
        xlabel="step offset from the first wrong step (0 = the first wrong step)",
        ylabel="step score",
        title="Step scores before and after the first error",
    )
    for o, v in zip(offsets, values, strict=True):
        ax.annotate(
            f"n={v.size}", (o, v.mean()), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7
        )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOT, dpi=110)
    plt.close(fig)
    return PLOT
