"""An eval summary shown: the PNG plots, the Markdown report that embeds them, the console lines."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from rmserve.models.eval import steps
from rmserve.models.eval.summary import PLOTS, PREFERENCE_KINDS, outcome, worst_ranked


def write_plots(out: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """The PNGs this run's data supports; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    scored = [r for r in records if "error" not in r]
    prefs = [r for r in scored if r["kind"] in PREFERENCE_KINDS]
    chosen = [s for r in prefs for s in r["scores"][: r["n_chosen"]]]
    rejected = [s for r in prefs for s in r["scores"][r["n_chosen"] :]]
    plain = [r["scores"][0] for r in scored if r["kind"] == "score"]
    written = []
    if chosen or plain:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        every = np.asarray(chosen + rejected + plain, dtype=np.float64)
        bins = np.histogram_bin_edges(every, bins=min(60, max(10, int(math.sqrt(every.size))))).tolist()
        for values, label, color in (
            (chosen, "chosen", "tab:green"),
            (rejected, "rejected", "tab:red"),
            (plain, "plain rows", "tab:blue"),
        ):
            if values:
                ax.hist(values, bins=bins, alpha=0.55, label=f"{label} (n={len(values)})", color=color)
        ax.set(xlabel="reward score", ylabel="responses", title="Score distributions: chosen vs rejected")
        _counts_with_legend(ax, MaxNLocator)
        written.append(_save(fig, out / PLOTS["scores"], plt))
    if prefs:
        margins = np.asarray([outcome(r)[1] for r in prefs], dtype=np.float64)
        fig, ax = plt.subplots(figsize=(7, 4.2))
        wrong, right = margins[margins <= 0], margins[margins > 0]
        ax.hist(
            [wrong, right],
            bins=zero_edged_bins(margins, min(60, max(10, int(math.sqrt(margins.size))))),
            stacked=True,
            color=["tab:red", "tab:green"],
            alpha=0.8,
            label=[f"ranked wrong or tied (n={wrong.size})", f"ranked right (n={right.size})"],
        )
        ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
        ax.set(
            xlabel="margin: r_chosen - r_rejected (best-of-N: minus the best rejected)",
            ylabel="rows",
            title=f"Margins (accuracy {summary['accuracy']:.4f}, mean margin {summary['mean_margin']:.4f})",
        )
        _counts_with_legend(ax, MaxNLocator)
        written.append(_save(fig, out / PLOTS["margins"], plt))
    if len(summary["subsets"]) > 1:  # one subset's bar would only repeat the overall accuracy
        subsets = summary["subsets"]
        names = list(subsets)
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(names)))
        acc = [subsets[n]["accuracy"] for n in names]
        ax.barh(range(len(names)), acc, color="tab:blue")
        ax.set_yticks(range(len(names)), [f"{n} (n={subsets[n]['rows']})" for n in names])
        ax.invert_yaxis()
        for i, a in enumerate(acc):
            ax.text(min(a + 0.01, 0.9), i, f"{a:.3f}", va="center")
        ax.axvline(0.5, color="gray", linestyle=":", linewidth=1, label="coin flip (pairs)")
        ax.set(xlim=(0, 1), xlabel="accuracy", title="Accuracy per subset")
        # Beside the axes, where no bar or its label can be under it.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        written.append(_save(fig, out / PLOTS["accuracy"], plt))
    pb = summary.get("processbench")
    if pb:
        process_plot = steps.write_plot(out, records, pb["threshold"], plt)
        if process_plot:
            written.append(process_plot)
    return written


def _counts_with_legend(ax: Any, locator: Any) -> None:
    """A histogram's count axis in whole numbers (no "1.5 responses"), with headroom above the
    tallest bar for the legend, so that it covers none."""
    ax.yaxis.set_major_locator(locator(integer=True))
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
    ax.legend(loc="upper right")


def zero_edged_bins(values: np.ndarray, count: int) -> list[float]:
    """About ``count`` equal histogram bins over ``values`` and 0, one edge at exactly 0, so that no
    bin holds both wrongly (margin <= 0) and rightly ranked rows."""
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    width = (hi - lo) / count or 1.0
    first, last = math.floor(lo / width), max(math.ceil(hi / width), math.floor(lo / width) + 1)
    return [k * width for k in range(first, last + 1)]


def _save(fig: Any, path: Path, plt: Any) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(summary: dict[str, Any], plots: list[str]) -> str:
    m, c = summary["model"], summary["counts"]
    where = "in process" if m.get("mode") == "in-process" else f"through rmserve at {m.get('source')}"
    lines = [
        "# rmserve eval report",
        "",
        f"Model **{m.get('name')}** version `{m.get('version')}`, scored {where} by "
        f"{m.get('provider')} in {m.get('precision')}.",
        "",
        "| data file | rows | bad rows | sha256 |",
        "| --- | ---: | ---: | --- |",
    ]
    for f in summary["data"]["files"]:
        short = f["digest"].removeprefix("sha256:")[:16]
        lines.append(f"| `{f['path']}` | {f['rows']} | {f['bad_rows']} | `{short}` |")
    lines += [
        "",
        f"{c['rows_scored']} rows scored: {c['pairs']} pairs, {c['best_of_n']} best-of-N rows, "
        f"{c['plain']} plain rows"
        + (
            f", {c.get('processbench', 0)} ProcessBench rows, {c.get('process_best_of_n', 0)} best-of-N rows "
            "in steps"
            if c.get("processbench") or c.get("process_best_of_n")
            else ""
        )
        + f"; {_not_scored(c)}.",
        "",
    ]
    if summary["accuracy"] is not None:
        lines += [
            "## Accuracy",
            "",
            "| | rows | accuracy | ties | mean margin |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| **overall** | {sum(g['rows'] for g in summary['subsets'].values())} | "
            f"**{_fmt(summary['accuracy'])}** | {summary['ties']} | {_fmt(summary['mean_margin'])} |",
        ]
        for name, g in summary["subsets"].items():
            lines.append(
                f"| {name} | {g['rows']} | {_fmt(g['accuracy'])} | {g['ties']} | {_fmt(g['mean_margin'])} |"
            )
        lines += [
            "",
            "Ties (equal scores) count as wrong for pairs; best-of-N rows split credit on ties "
            "as RewardBench-2 does.",
            "",
        ]
    lines += _process_markdown(summary)
    for key, title in (("rewardbench", "RewardBench"), ("rewardbench2", "RewardBench 2")):
        rb = summary.get(key)
        if rb:
            parts = rb.get("sections") or rb.get("subsets")
            lines += [
                f"## {title}",
                "",
                f"Score **{_fmt(rb['score'])}**"
                + ("" if rb["complete"] else " (not every subset is present: a partial score)")
                + ".",
                "",
                "| section | accuracy |",
                "| --- | ---: |",
            ]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in parts.items()]
            lines += ["", rb["method"] + ".", ""]
    worst = summary.get("worst_rows") or []
    if worst:
        lines += [
            "## Worst-ranked rows",
            "",
            f"The {len(worst)} rows with the lowest margins (the worst chosen score minus the best "
            "rejected one): where to look first for label noise or a model's blind spots.",
            "",
            "| file | line | subset | margin | chosen | rejected |",
            "| --- | ---: | --- | ---: | ---: | ---: |",
        ]
        lines += [
            f"| `{w['file']}` | {w['line']} | {w['subset']} | {_fmt(w['margin'])} | {_fmt(w['chosen'])} "
            f"| {_fmt(w['rejected'])} |"
            for w in worst
        ]
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        captions = {
            PLOTS["scores"]: "Score distributions",
            PLOTS["margins"]: "Margins",
            PLOTS["accuracy"]: "Accuracy per subset",
            steps.PLOT: "Step scores before and after the first error",
        }
        lines += [f"![{captions[p]}]({p})\n" for p in plots]
    bad = summary["bad_rows"]
    if bad["count"]:
        lines += ["## Bad rows", "", f"{bad['count']} rows were skipped (all in `bad_rows.jsonl`):", ""]
        lines += [
            f"- `{b['file']}` {'line' if b['unit'] == 'line' else 'row'} {b['line']}: {b['reason']}"
            for b in bad["first"][:20]
        ]
        lines.append("")
    long = summary.get("over_max_length", {"count": 0})
    if long["count"]:
        lines += [
            "## Rows over max_length",
            "",
            f"{long['count']} rows were sent whole and not scored cut (all in `over_max_length.jsonl`):",
            "",
        ]
        lines += [f"- `{b['file']}` line {b['line']}: {b['reason']}" for b in long["first"][:20]]
        lines.append("")
    r = summary["run"]
    lines += [
        "## Run",
        "",
        f"{_run_rows(r)} in {r['seconds']} s "
        f"({r['items_sent_to_model']} items sent to the model"
        + (f", {r['pairs_per_s']} pairs/s" if r.get("pairs_per_s") else "")
        + "); "
        f"{r['rows_resumed']} rows were already handled by an earlier run.",
        "",
    ]
    return "\n".join(lines)


def _process_markdown(summary: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    pb = summary.get("processbench")
    if pb:
        lines += [
            "## ProcessBench",
            "",
            f"Mean F1 over subsets **{_fmt(pb['f1_mean'])}** (threshold {pb['threshold']}).",
            "",
            "| subset | rows | erroneous | acc. erroneous | correct | acc. correct | F1 | over max_length |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, g in [*pb["subsets"].items(), ("**overall**", pb["overall"])]:
            lines.append(
                f"| {name} | {g['rows']} | {g['erroneous']} | {_fmt(g['acc_erroneous'])} | {g['correct']} | "
                f"{_fmt(g['acc_correct'])} | {_fmt(g['f1'])} | {g['over_max_length']} |"
            )
        lines += ["", pb["method"] + ".", ""]
    bon = summary.get("process_best_of_n")
    if bon:
        lines += [
            f"## Best-of-N by the {bon['aggregate']} step score",
            "",
            "| subset | rows | accuracy | oracle | random |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, g in [*bon["subsets"].items(), ("**overall**", bon["overall"])]:
            shares = " | ".join(_fmt(g[k]) for k in ("accuracy", "oracle", "random"))
            lines.append(f"| {name} | {g['rows']} | {shares} |")
        lines += ["", bon["method"] + ".", ""]
    return lines


def write_report(out: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    import json

    plots = write_plots(out, summary, records)
    summary["plots"] = plots
    summary["worst_rows"] = worst_ranked(records)
    (out / "summary.json").write_text(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "report.md").write_text(markdown(summary, plots), encoding="utf-8")


def console_lines(summary: dict[str, Any], out: Path) -> list[str]:
    m, c, r = summary["model"], summary["counts"], summary["run"]
    lines = [
        f"model {m.get('name')} {m.get('version')} ({m.get('mode')}, {m.get('provider')} "
        f"{m.get('precision')}); {c['rows_scored']} rows scored, {_not_scored(c)}"
    ]
    if summary["accuracy"] is not None:
        width = max([len("overall"), *map(len, summary["files"]), *map(len, summary["subsets"])])
        lines.append(f"  {'':{width}}  {'rows':>6}  {'accuracy':>8}  {'margin':>8}")
        groups = list(summary["files"].items())
        if len(summary["subsets"]) > 1:
            groups += list(summary["subsets"].items())
        for name, g in groups:
            lines.append(f"  {name:{width}}  {g['rows']:>6}  {g['accuracy']:>8.4f}  {g['mean_margin']:>8.4f}")
        total = sum(g["rows"] for g in summary["files"].values())
        lines.append(
            f"  {'overall':{width}}  {total:>6}  {summary['accuracy']:>8.4f}  {summary['mean_margin']:>8.4f}"
        )
    if summary.get("rewardbench"):
        lines.append(f"  RewardBench score {summary['rewardbench']['score']:.4f}")
    if summary.get("rewardbench2"):
        lines.append(f"  RewardBench 2 score {summary['rewardbench2']['score']:.4f}")
    pb = summary.get("processbench")
    if pb:
        for name, g in [*pb["subsets"].items(), ("overall", pb["overall"])]:
            lines.append(
                f"  ProcessBench {name}: acc. erroneous {_fmt(g['acc_erroneous'])}, "
                f"acc. correct {_fmt(g['acc_correct'])}, F1 {_fmt(g['f1'])}"
                + (f", {g['over_max_length']} over max_length (not scored)" if g["over_max_length"] else "")
            )
        lines.append(f"  ProcessBench mean F1 {_fmt(pb['f1_mean'])} (threshold {pb['threshold']})")
    bon = summary.get("process_best_of_n")
    if bon:
        g = bon["overall"]
        lines.append(
            f"  best-of-N by {bon['aggregate']}: accuracy {_fmt(g['accuracy'])} "
            f"(oracle {_fmt(g['oracle'])}, random {_fmt(g['random'])}) over {g['rows']} rows"
        )
    rate = f", {r['pairs_per_s']} pairs/s" if r.get("pairs_per_s") else ""
    lines.append(f"{_run_rows(r, ' now')}, {r['rows_resumed']} resumed, in {r['seconds']} s{rate}")
    n = len(summary.get("plots", []))
    lines.append(f"wrote {out}/summary.json, scores.jsonl, report.md and {n} plot{'' if n == 1 else 's'}")
    return lines


def _not_scored(counts: dict[str, Any]) -> str:
    """The rows read but not scored, each kind apart: over max_length (only when there are any), bad."""
    over = counts.get("over_max_length", 0)
    long = f"{over} over max_length (not scored cut), " if over else ""
    return long + f"{counts['bad_rows']} bad rows skipped"


def _run_rows(run: dict[str, Any], when: str = "") -> str:
    """What became of the rows this run sent: scored, and (when there are any) over max_length or refused."""
    text = f"{run['rows_scored']} rows scored{when}"
    if run.get("rows_over_max_length"):
        text += f", {run['rows_over_max_length']} over max_length (not scored cut)"
    if run.get("rows_refused"):
        text += f", {run['rows_refused']} refused by the model"
    return text
