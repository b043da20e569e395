"""``rmserve eval``, the command: reads the flags and walks a run through the stages of this package.

``python -m rmserve.models.eval`` runs it too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rmserve.cli import DefaultsHelpFormatter
from rmserve.models.eval.rows import EvalError, EvalRow, read_data
from rmserve.models.eval.scorers import LocalScorer, RemoteScorer, Scorer, score_chunk
from rmserve.models.eval.steps import threshold_for
from rmserve.models.eval.store import BAD_ROWS_FILE, OVER_LENGTH_FILE, ScoreStore, check_run_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rmserve eval",
        formatter_class=DefaultsHelpFormatter,
        description="Score preference eval sets: accuracy per subset, RewardBench weighting, plots, report; "
        "with a process reward model, ProcessBench F1 and best-of-N accuracy. "
        "Resumable: rerun the same command to continue a killed run.",
    )
    p.add_argument(
        "data",
        nargs="+",
        metavar="DATA",
        help="JSONL (.gz), JSON, Parquet, CSV files or saved HF dataset directories",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--bundle",
        help="score in process with this bundle (ONNX Runtime, no server; default: the shipped default "
        "model, the one `rmserve serve` serves)",
    )
    src.add_argument("--url", help="score through a running rmserve at this URL (default: none, in process)")
    p.add_argument(
        "--out",
        required=True,
        help="output directory (scores.jsonl, summary.json, plots, report.md)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("RMSERVE_API_KEY"),
        help="API key for --url (default: $RMSERVE_API_KEY)",
    )
    p.add_argument("--model", help="with --url: the served model's name (default: 'default' or the only one)")
    p.add_argument("--concurrency", type=int, default=4, help="with --url: requests in flight at once")
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="items per request (--url) or at most per forward pass (--bundle)",
    )
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="with --bundle: padded tokens per forward pass (default: the server's for the provider)",
    )
    p.add_argument("--chunk-rows", type=int, default=256, help="rows scored and saved together (resume unit)")
    p.add_argument(
        "--provider",
        default="cpu",
        choices=["cpu", "cuda", "openvino", "auto"],
        help="with --bundle: the engine (default cpu: ONNX Runtime)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16", "int8", "auto"],
        help="with --bundle: fp32 (default) gives the server's fp32 scores exactly",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="with --bundle: inference threads "
        "(default: $RMSERVE_THREADS, else the CPUs this process may use)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="ProcessBench rows: a step scored at or under this is predicted wrong (default: 0.5 for "
        "probability rules, 0 for prob_diff and raw, as the model's step rule says)",
    )
    p.add_argument(
        "--step-aggregate",
        default="min",
        choices=["min", "last", "mean", "prod"],
        help="best-of-N rows in steps: how a candidate's step scores become one",
    )
    p.add_argument(
        "--split", help="the split of a saved HF DatasetDict (default: its only split, if it has one)"
    )
    p.add_argument(
        "--limit", type=int, default=None, help="read at most this many rows of each file (default: all)"
    )
    p.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    p.add_argument(
        "--restart", action="store_true", help="discard the scores already in --out and start over"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Test hook: exit uncleanly (no summary, no cleanup) once this many rows were scored and saved.
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _make_scorer(args: argparse.Namespace) -> Scorer:
    if not args.url:
        from rmserve.bundle import default_bundle_path

        return LocalScorer(
            args.bundle or default_bundle_path(),
            provider=args.provider,
            precision=args.precision,
            threads=args.threads,
            batch_tokens=args.batch_tokens,
            batch_size=args.batch_size,
        )
    return RemoteScorer(
        args.url,
        api_key=args.api_key,
        model=args.model,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from rmserve.models.eval.render import write_report
    from rmserve.models.eval.summary import bad_rows, over_length_rows, summarize

    out = Path(args.out)
    rows, bad, files = read_data(args.data, split=args.split, limit=args.limit, strict=args.strict)
    for b in bad[:10]:
        print(f"rmserve eval: skipped bad row {b}", file=sys.stderr)
    if len(bad) > 10:
        print(
            f"rmserve eval: ... and {len(bad) - 10} more bad rows (all in {out / BAD_ROWS_FILE})",
            file=sys.stderr,
        )
    out.mkdir(parents=True, exist_ok=True)
    scorer = _make_scorer(args)
    store = ScoreStore(out)
    try:
        check_run_file(out, scorer.model, args.restart)
        done = store.load()
        todo = [r for r in rows if r.key not in done]
        resumed = len(rows) - len(todo)
        started = time.perf_counter()
        # This run's rows: sent to the model (what --stop-after counts), and what became of them.
        sent_now, scored_now, over_now, refused_now = 0, 0, 0, 0
        with tqdm(
            total=len(rows),
            initial=resumed,
            unit="row",
            desc="rmserve eval",
            dynamic_ncols=True,
            disable=args.no_progress,
            file=sys.stderr,
        ) as bar:
            for start in range(0, len(todo), args.chunk_rows):
                chunk = todo[start : start + args.chunk_rows]
                records = score_chunk(scorer, chunk)
                store.append(records)
                failed = [r for r in records if "error" in r]
                if failed and args.strict:
                    raise EvalError(
                        f"bad row (--strict): {failed[0]['file']}:{failed[0]['line']}: "
                        f"the model refused it: {failed[0]['error']}"
                    )
                sent_now += len(chunk)
                over = sum(bool(r.get("too_long")) for r in failed)
                scored_now, over_now = scored_now + len(chunk) - len(failed), over_now + over
                refused_now += len(failed) - over
                bar.update(len(chunk))
                if args.stop_after is not None and sent_now >= args.stop_after:
                    os._exit(75)
        seconds = time.perf_counter() - started
    finally:
        store.close()
        scorer.close()
    records = [store.records[r.key] for r in rows]
    run_info = {
        "rows_resumed": resumed,
        "rows_scored": scored_now,
        "rows_over_max_length": over_now,
        "rows_refused": refused_now,
        "items_sent_to_model": scorer.items_sent,
        "torn_lines_discarded": store.torn,
        "seconds": round(seconds, 3),
        "rows_per_s": round(scored_now / seconds, 2) if seconds > 0 and scored_now else None,
        "items_per_s": round(scorer.items_sent / seconds, 2) if seconds > 0 and scorer.items_sent else None,
        "pairs_per_s": _pairs_per_s(todo, seconds),
    }
    summary = summarize(
        records,
        bad,
        files,
        scorer.model,
        run_info,
        limit=args.limit,
        threshold=threshold_for(scorer.model.get("step_rule")) if args.threshold is None else args.threshold,
        aggregate=args.step_aggregate,
    )
    unscored = {BAD_ROWS_FILE: bad_rows(bad, records), OVER_LENGTH_FILE: over_length_rows(records)}
    for name, entries in unscored.items():
        with (out / name).open("w", encoding="utf-8") as fh:
            for entry in entries:
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
    write_report(out, summary, records)
    return summary


def _pairs_per_s(todo: list[EvalRow], seconds: float) -> float | None:
    pairs = sum(r.kind == "pair" for r in todo)
    return round(pairs / seconds, 2) if pairs and seconds > 0 else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("concurrency", "batch_size", "chunk_rows"):
        if getattr(args, name) < 1:
            print(f"rmserve eval: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    # The eval extra's own packages, before any row is scored: one that is missing stops the run at
    # once, and ``rmserve`` names the extra (pyarrow and datasets load with the files that need them).
    import matplotlib  # noqa: F401
    import tqdm  # noqa: F401

    from rmserve.bundle import BundleError
    from rmserve.client import RewardServerError
    from rmserve.engines.base import EngineError

    try:
        summary = run(args)
    except (EvalError, BundleError, EngineError, RewardServerError) as exc:
        print(f"rmserve eval: {exc}", file=sys.stderr)
        return 1
    from rmserve.models.eval.render import console_lines

    print("\n".join(console_lines(summary, Path(args.out))))
    return 0
