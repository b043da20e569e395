"""What an eval run's scores say: the summary (accuracy, RewardBench weighting, statistics), the
PNG plots and the Markdown report that embeds them.

How a row counts (``outcome``):

* a pair is right when r_chosen > r_rejected; a tie counts as wrong, as RewardBench v1 does;
* a best-of-N row with one chosen response (RewardBench-2) earns 1 when the chosen score is the
  unique maximum, 1/k when it ties k-1 rejected responses at the maximum, else 0: RewardBench-2's
  ``reroll_and_score_dataset`` ("penalty for ties");
* a best-of-N row with several chosen responses (RewardBench-2's Ties shape) is right when every
  chosen response outscores every rejected one. RewardBench-2's weighted Ties score (accuracy plus
  margin terms over paired ref/tied prompts) is not computed.

Process reward rows (ProcessBench, best-of-N in steps) are summarized by ``rmserve.models.eval.steps``.

The plots, ``report.md`` and the console lines that show a summary are in ``rmserve.models.eval.render``.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rmserve.kinds import DEFAULT_AGGREGATE, Aggregate
from rmserve.models.eval.steps import DEFAULT_THRESHOLD, best_of_n, processbench

if TYPE_CHECKING:
    from rmserve.models.eval.rows import BadRow, DataFile

NO_SUBSET = "(no subset)"
PREFERENCE_KINDS = ("pair", "best_of_n")
PLOTS = {"scores": "scores.png", "margins": "margins.png", "accuracy": "accuracy_by_subset.png"}

# RewardBench v1 (allenai/reward-bench, rewardbench/constants.py and the leaderboard's average):
# a section is the mean of its subsets' accuracies weighted by these example counts (math-prm is
# up-weighted from 447 to 984 to equal the code subsets; the counts are the official constants as
# published), "Prior Sets" is the plain mean of four older test sets, and the overall score weighs
# the four sections 2 and Prior Sets 1 (its "0.5 weight"), over the sections present.
RB1_EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 250,
    "xstest-should-respond": 154,
    "donotanswer": 136,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}
RB1_SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": [
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "Safety": [
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
RB1_PRIOR_SETS = ("anthropic_helpful", "anthropic_hhh", "shp", "summarize")
RB1_PRIOR = "Prior Sets (0.5 weight)"
RB1_WEIGHTS = {"Chat": 2.0, "Chat Hard": 2.0, "Safety": 2.0, "Reasoning": 2.0, RB1_PRIOR: 1.0}
# RewardBench-2: the overall score is the plain mean of its six subsets.
RB2_SUBSETS = ("Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties")


# ------------------------------------------------------------------ numbers


def outcome(record: dict[str, Any]) -> tuple[float, float, bool]:
    """(credit in [0, 1], margin, tie) of one scored preference row."""
    s, k = record["scores"], record["n_chosen"]
    if record["kind"] == "pair":
        c, r = s
        return (1.0 if c > r else 0.0), c - r, c == r
    chosen, rejected = s[:k], s[k:]
    best_rejected = max(rejected)
    if k == 1:
        top = max(s)
        if s[0] < top:
            return 0.0, s[0] - best_rejected, False
        n_top = sum(x == top for x in s)
        return 1.0 / n_top, s[0] - best_rejected, n_top > 1
    worst = min(chosen)
    return (1.0 if worst > best_rejected else 0.0), worst - best_rejected, worst == best_rejected


def _r(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


def _stats(values: Sequence[float]) -> dict[str, Any] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    p5, p25, p50, p75, p95 = np.percentile(a, [5, 25, 50, 75, 95])
    return {
        "n": int(a.size),
        "mean": _r(a.mean()),
        "std": _r(a.std()),
        "min": _r(a.min()),
        "p5": _r(p5),
        "p25": _r(p25),
        "median": _r(p50),
        "p75": _r(p75),
        "p95": _r(p95),
        "max": _r(a.max()),
    }


def _group(outcomes: list[tuple[float, float, bool]]) -> dict[str, Any]:
    return {
        "accuracy": _r(sum(o[0] for o in outcomes) / len(outcomes)),
        "rows": len(outcomes),
        "ties": sum(o[2] for o in outcomes),
        "mean_margin": _r(float(np.mean([o[1] for o in outcomes]))),
    }


def rewardbench_v1(accuracy: dict[str, float]) -> dict[str, Any] | None:
    """RewardBench v1 sections and score from per-subset accuracies; None when no subset is RewardBench's."""
    core = [s for s in accuracy if s in RB1_EXAMPLE_COUNTS]
    prior = [s for s in accuracy if s in RB1_PRIOR_SETS]
    if not core and not prior:
        return None
    sections: dict[str, float] = {}
    for section, subsets in RB1_SECTIONS.items():
        have = [s for s in subsets if s in accuracy]
        if have:
            weights = [RB1_EXAMPLE_COUNTS[s] for s in have]
            sections[section] = sum(accuracy[s] * w for s, w in zip(have, weights, strict=True)) / sum(
                weights
            )
    if prior:
        sections[RB1_PRIOR] = float(np.mean([accuracy[s] for s in prior]))
    total_w = sum(RB1_WEIGHTS[s] for s in sections)
    score = sum(v * RB1_WEIGHTS[s] for s, v in sections.items()) / total_w
    missing = [s for s in RB1_EXAMPLE_COUNTS if s not in accuracy]
    return {
        "score": _r(score),
        "sections": {k: _r(v) for k, v in sections.items()},
        "complete": not missing and len(prior) == len(RB1_PRIOR_SETS),
        "missing_subsets": missing,
        "missing_prior_sets": [s for s in RB1_PRIOR_SETS if s not in accuracy],
        "other_subsets": sorted(
            s for s in accuracy if s not in RB1_EXAMPLE_COUNTS and s not in RB1_PRIOR_SETS
        ),
        "method": "section = accuracy of its subsets weighted by RewardBench's example counts "
        "(math-prm 984); Prior Sets = plain mean of anthropic_helpful, anthropic_hhh, shp, summarize; "
        "score = mean of the sections present, weights Chat/Chat Hard/Safety/Reasoning 2, Prior Sets 1",
    }


def rewardbench_v2(accuracy: dict[str, float]) -> dict[str, Any] | None:
    have = [s for s in RB2_SUBSETS if s in accuracy]
    if not have:
        return None
    return {
        "score": _r(float(np.mean([accuracy[s] for s in have]))),
        "subsets": {s: _r(accuracy[s]) for s in have},
        "complete": len(have) == len(RB2_SUBSETS),
        "method": "plain mean of the subsets present; best-of-N credit split on ties as RewardBench-2 does; "
        "the Ties subset is scored as plain accuracy (every chosen above every rejected), "
        "not RewardBench-2's weighted Ties score",
    }


def bad_rows(bad: Sequence[BadRow], records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every bad row: unreadable ones, then the ones the model side refused (rows over max_length
    are not bad rows: ``over_length_rows``)."""
    out = [b.as_dict() for b in bad]
    out += [_unscored(r, "refused by the model: ") for r in records if "error" in r and not r.get("too_long")]
    return out


def over_length_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row over the model's max_length: sent whole, refused, never scored cut."""
    return [_unscored(r, "over max_length, not scored cut: ") for r in records if r.get("too_long")]


def _unscored(record: dict[str, Any], why: str) -> dict[str, Any]:
    return {"file": record["file"], "line": record["line"], "unit": "line", "reason": why + record["error"]}


def _by_file(entries: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for e in entries:
        counts[e["file"]] += 1
    return dict(counts)


def summarize(
    records: list[dict[str, Any]],
    bad: Sequence[BadRow],
    files: Sequence[DataFile],
    model: dict[str, Any],
    run: dict[str, Any],
    *,
    limit: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    aggregate: Aggregate = DEFAULT_AGGREGATE,
) -> dict[str, Any]:
    scored = [r for r in records if "error" not in r]
    prefs = [r for r in scored if r["kind"] in PREFERENCE_KINDS]
    outcomes = [outcome(r) for r in prefs]
    by_subset: dict[str, list[tuple[float, float, bool]]] = defaultdict(list)
    by_file: dict[str, list[tuple[float, float, bool]]] = defaultdict(list)
    for r, o in zip(prefs, outcomes, strict=True):
        by_subset[r["subset"] or NO_SUBSET].append(o)
        by_file[r["file"]].append(o)
    subsets = {name: _group(v) for name, v in sorted(by_subset.items())}
    accuracy = {name: g["accuracy"] for name, g in subsets.items()}
    all_bad, too_long = bad_rows(bad, records), over_length_rows(records)
    bad_by_file, long_by_file = _by_file(all_bad), _by_file(too_long)
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.digest):
        h.update(f.digest.encode() + b"\0")
    overall = _group(outcomes) if outcomes else None
    summary: dict[str, Any] = {
        "accuracy": overall["accuracy"] if overall else None,
        "ties": overall["ties"] if overall else 0,
        "mean_margin": overall["mean_margin"] if overall else None,
        "subsets": subsets,
        "files": {name: _group(v) for name, v in by_file.items()},
        "counts": {
            "rows_read": len(records) + len(bad),
            "rows_scored": len(scored),
            "pairs": sum(r["kind"] == "pair" for r in scored),
            "best_of_n": sum(r["kind"] == "best_of_n" for r in scored),
            "plain": sum(r["kind"] == "score" for r in scored),
            "over_max_length": len(too_long),
            "bad_rows": len(all_bad),
        },
        "scores": {
            "chosen": _stats([s for r in prefs for s in r["scores"][: r["n_chosen"]]]),
            "rejected": _stats([s for r in prefs for s in r["scores"][r["n_chosen"] :]]),
            "plain": _stats([r["scores"][0] for r in scored if r["kind"] == "score"]),
            "margin": _stats([o[1] for o in outcomes]),
        },
        "model": model,
        "data": {
            "digest": "sha256:" + h.hexdigest(),
            "limit_per_file": limit,
            "files": [
                {
                    "path": f.path,
                    "digest": f.digest,
                    "rows": f.rows,
                    "bad_rows": bad_by_file.get(f.path, 0),
                    "over_max_length": long_by_file.get(f.path, 0),
                }
                for f in files
            ],
        },
        "bad_rows": {"count": len(all_bad), "by_file": bad_by_file, "first": all_bad[:100]},
        "over_max_length": {"count": len(too_long), "by_file": long_by_file, "first": too_long[:100]},
        "method": {
            "pair": "right when r_chosen > r_rejected; ties count as wrong (RewardBench v1)",
            "best_of_n": "RewardBench-2: 1 when chosen is the unique top score, 1/k when k responses "
            "share the top score with chosen among them, else 0",
            "margin": "r_chosen - r_rejected (best-of-N: chosen minus the best rejected)",
        },
        "run": run,
    }
    rb1, rb2 = rewardbench_v1(accuracy), rewardbench_v2(accuracy)
    if rb1:
        summary["rewardbench"] = rb1
    if rb2:
        summary["rewardbench2"] = rb2
    pb, bon = processbench(records, threshold), best_of_n(records, aggregate)
    if pb:
        summary["processbench"] = pb
        summary["counts"]["processbench"] = pb["overall"]["rows"]
    if bon:
        summary["process_best_of_n"] = bon
        summary["counts"]["process_best_of_n"] = bon["overall"]["rows"]
    return summary


def worst_ranked(records: Iterable[dict[str, Any]], n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` scored preference rows with the lowest margins (the model's worst rankings first):
    where each is, its margin, and the two scores it compares (the worst chosen, the best rejected)."""
    prefs = [r for r in records if "error" not in r and r["kind"] in PREFERENCE_KINDS]
    rows = []
    for r in sorted(prefs, key=lambda r: outcome(r)[1])[:n]:
        k = r["n_chosen"]
        rows.append(
            {
                "file": r["file"],
                "line": r["line"],
                "subset": r["subset"],
                "margin": _r(outcome(r)[1]),
                "chosen": _r(min(r["scores"][:k])),
                "rejected": _r(max(r["scores"][k:])),
            }
        )
    return rows
