"""``rmserve eval``: score preference eval sets, in process or through a running rmserve.

A run walks: DATA files -> rows (preference pairs in the three shapes of ``models.data``,
best-of-N rows in RewardBench-2's shape, plain prompt/response rows) -> chunks scored by a
``Scorer`` (the server's own Formatter + ONNX Runtime engine in process, or the HTTP client) ->
``scores.jsonl`` in ``--out``, appended and flushed chunk by chunk -> ``summary.json``, PNG plots
and ``report.md`` (``models.report``).

Every row has a key: the first 16 hex digits of its data file's sha256 and its row number. A run
that finds ``scores.jsonl`` in ``--out`` scores only the rows whose keys are not in it yet, so a
killed run continues where it stopped and no row is sent to the model twice.

Bad rows are never dropped silently: each is reported with its file and line, counted in the
summary, listed in ``bad_rows.jsonl``; ``--strict`` stops at the first one.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from models.data import DataError, data_digest, pair_from_row, parse_hh_prompt, read_rows
from service.formatting import ChatItem, Item, Message, Messages, PairItem, TextItem, render_hh

SCORES_FILE = "scores.jsonl"
RUN_FILE = "run.json"
BAD_ROWS_FILE = "bad_rows.jsonl"
Kind = Literal["pair", "best_of_n", "score"]


class EvalError(Exception):
    """The run cannot go on (bad arguments, a mismatched --out, --strict hit a bad row)."""


# ------------------------------------------------------------------ rows


@dataclass(frozen=True)
class EvalRow:
    """One row to score. ``items`` hold the chosen responses first (``n_chosen`` of them), then the
    rejected ones; a plain row has one item and ``n_chosen == 0``."""

    key: str
    file: str
    line: int
    kind: Kind
    items: tuple[Item, ...]
    n_chosen: int
    subset: str | None = None
    row_id: str | None = None


@dataclass(frozen=True)
class BadRow:
    """A row that was not scored. ``line`` is the 1-based line (JSONL, CSV) or row (JSON, Parquet, HF)."""

    file: str
    line: int
    reason: str
    unit: str = "line"

    def __str__(self) -> str:
        return (
            f"{self.file}:{self.line}: {self.reason}"
            if self.unit == "line"
            else (f"{self.file} row {self.line}: {self.reason}")
        )

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "unit": self.unit, "reason": self.reason}


@dataclass(frozen=True)
class DataFile:
    path: str
    digest: str
    rows: int
    bad_rows: int


def _prompt(value: Any) -> str | Messages:
    if isinstance(value, str):
        return parse_hh_prompt(value)
    if not isinstance(value, list) or not value:
        raise ValueError("'prompt' must be a string or a non-empty list of messages")
    return _messages(value, "prompt")


def _messages(value: Any, what: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{what}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"'{what}'[{i}] must be an object with string 'role' and 'content'")
        out.append(Message(m["role"], m["content"]))
    return tuple(out)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _responses(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value.strip()]
    if not _str_list(value):
        raise ValueError(f"'{what}' of a best-of-N row must be a string or a non-empty list of strings")
    return [v.strip() for v in value]


def _text_field(row: dict[str, Any], name: str) -> str | None:
    value = row.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"'{name}' must be a string")
    return value or None


def parse_row(row: Any, *, key: str, file: str, line: int) -> EvalRow:
    """One raw row as an EvalRow; ValueError says what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, not {type(row).__name__}")
    subset = _text_field(row, "subset")
    row_id = None if row.get("id") is None else str(row["id"])
    if "chosen" in row or "rejected" in row:
        for name in ("chosen", "rejected"):
            value = row.get(name)
            if value is not None and not isinstance(value, str | list):
                raise ValueError(f"'{name}' must be text or a list, not {type(value).__name__} ({value!r})")
        if _str_list(row.get("chosen")) or _str_list(row.get("rejected")):
            # RewardBench-2: one prompt, chosen and rejected as lists of responses.
            if row.get("prompt") is None:
                raise ValueError("a best-of-N row (chosen/rejected as lists) needs a 'prompt'")
            prompt = _prompt(row["prompt"])
            if isinstance(prompt, tuple):
                render_hh(prompt)  # raises on a role a transcript cannot show, as pairs do
            chosen = _responses(row.get("chosen"), "chosen")
            rejected = _responses(row.get("rejected"), "rejected")
            items = tuple(PairItem(prompt, r) for r in [*chosen, *rejected])
            return EvalRow(key, file, line, "best_of_n", items, len(chosen), subset, row_id)
        pair = pair_from_row(row, source=file, line=line)
        return EvalRow(key, file, line, "pair", pair.items(), 1, pair.subset, row_id)
    if "messages" in row:
        messages = _messages(row["messages"], "messages")
        if messages[-1].role != "assistant":
            raise ValueError("'messages' must end with the assistant's response")
        return EvalRow(key, file, line, "score", (ChatItem(messages),), 0, subset, row_id)
    response = row.get("response", row.get("completion"))
    if response is not None:
        if not isinstance(response, str):
            raise ValueError("'response' must be a string")
        if row.get("prompt") is None:
            raise ValueError("a 'response' needs a 'prompt'")
        return EvalRow(
            key, file, line, "score", (PairItem(_prompt(row["prompt"]), response),), 0, subset, row_id
        )
    if isinstance(row.get("text"), str):
        return EvalRow(key, file, line, "score", (TextItem(row["text"]),), 0, subset, row_id)
    raise ValueError(
        "not a row this command reads: expected chosen/rejected (a pair or best-of-N), "
        "prompt/response, messages, or text; got keys " + ", ".join(sorted(map(str, row)))
    )


# ------------------------------------------------------------------ files -> raw rows

RawRows = Iterator[tuple[int, Any]]


def _jsonl(path: Path) -> RawRows:
    """Numbered rows of a JSON Lines file; an unreadable line yields a DataError and reading goes on."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, DataError(path, number, f"invalid JSON: {exc.msg} (column {exc.colno})")


_CSV_JSON_COLUMNS = ("prompt", "chosen", "rejected", "messages")


def _csv(path: Path) -> RawRows:
    """Numbered rows of a CSV file (header on line 1). A cell of a message or response column that
    holds a JSON list (conversational data written by pandas) is read as that list."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    csv.field_size_limit(1 << 30)
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.DictReader(fh)
        start = (reader.line_num or 1) + 1
        for record in reader:
            row: dict[str, Any] = {}
            for k, v in record.items():
                if k is None or v is None:
                    yield (
                        start,
                        DataError(path, start, "the record has a different number of fields than the header"),
                    )
                    break
                row[k] = _csv_cell(k, v)
            else:
                yield start, row
            start = reader.line_num + 1


def _csv_cell(column: str, value: str) -> Any:
    if value == "":
        return None
    if column in _CSV_JSON_COLUMNS and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if column == "margin":
        try:
            return float(value)
        except ValueError:
            return value
    return value


def raw_rows(path: Path, split: str | None) -> tuple[RawRows, str]:
    """(numbered rows, "line" or "row"); rows that cannot be read are DataErrors in the stream."""
    name = path.name.lower()
    if path.is_file() and name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        return _jsonl(path), "line"
    if path.is_file() and name.endswith((".csv", ".csv.gz")):
        return _csv(path), "line"
    return read_rows(path, split=split)  # JSON, Parquet, saved HF datasets


def read_data(
    paths: Sequence[str], *, split: str | None = None, limit: int | None = None, strict: bool = False
) -> tuple[list[EvalRow], list[BadRow], list[DataFile]]:
    """Every row of every file, the bad rows (file and line), and one record per file."""
    rows: list[EvalRow] = []
    bad: list[BadRow] = []
    files: list[DataFile] = []
    seen: dict[str, str] = {}
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise EvalError(f"{name}: no such file or directory")
        digest = data_digest(path)
        if digest in seen:
            print(
                f"rmserve eval: {name} has the same content as {seen[digest]}; reading it once",
                file=sys.stderr,
            )
            continue
        seen[digest] = name
        prefix = digest.removeprefix("sha256:")[:16]
        n_rows, n_bad = 0, 0
        try:
            numbered, unit = raw_rows(path, split)
            for number, raw in numbered:
                if limit is not None and n_rows >= limit:
                    break
                try:
                    if isinstance(raw, DataError):
                        raise raw
                    rows.append(parse_row(raw, key=f"{prefix}:{number}", file=name, line=number))
                    n_rows += 1
                except ValueError as exc:
                    reason = exc.reason if isinstance(exc, DataError) else str(exc)
                    bad_row = BadRow(name, number, reason, unit)
                    if strict:
                        raise EvalError(f"bad row (--strict): {bad_row}") from None
                    bad.append(bad_row)
                    n_bad += 1
        except DataError as exc:  # the whole file: unknown format, not a list, ...
            raise EvalError(str(exc)) from None
        files.append(DataFile(name, digest, n_rows, n_bad))
    return rows, bad, files


# ------------------------------------------------------------------ scorers


class Scorer(Protocol):
    """Scores items in order. ``items_sent`` counts every item handed to the model (the proof that a
    resumed run scores no row twice); ``model`` describes what scored them."""

    items_sent: int
    model: dict[str, Any]

    def score(self, items: list[Item]) -> list[float]: ...

    def close(self) -> None: ...


class RejectedItem(Exception):
    """The model side refused one item (its formatter or the server said it is malformed)."""


class LocalScorer:
    """In process: the server's Formatter and engine, length-sorted batches under a token budget."""

    def __init__(
        self,
        bundle_dir: str,
        *,
        provider: str = "cpu",
        precision: str = "fp32",
        threads: int | None = None,
        batch_tokens: int | None = None,
        batch_size: int = 64,
    ) -> None:
        from service.bundle import load_bundle
        from service.config import Settings
        from service.engines.select import create_engine, default_batch_tokens
        from service.formatting import Formatter

        self.bundle = load_bundle(bundle_dir)
        chosen: dict[str, Any] = {"provider": provider, "precision": precision}
        if threads is not None:  # else RMSERVE_THREADS or the CPUs this process may use, as the server does
            chosen["threads"] = threads
        settings = Settings(**chosen)
        self.engine, selection = create_engine(self.bundle, settings)
        self.formatter = Formatter(self.bundle)
        self.batch_tokens = batch_tokens or default_batch_tokens(self.engine.info.provider)
        self.batch_size = batch_size
        self.items_sent = 0
        m = self.bundle.manifest
        self.model = {
            "name": m.name,
            "version": m.version,
            "source": str(self.bundle.path),
            "mode": "in-process",
            "provider": self.engine.info.provider,
            "precision": self.engine.info.precision,
            "threads": self.engine.info.threads,
            "selection": selection.get("reason"),
        }

    def score(self, items: list[Item]) -> list[float]:
        from service.engines.base import pad_batch
        from service.errors import InvalidItem

        try:
            encoded = self.formatter.encode(items)
        except InvalidItem as exc:
            raise RejectedItem(exc.reason) from None
        except ValueError as exc:
            raise RejectedItem(str(exc)) from None
        pad_id = self.formatter.settings.pad_token_id
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(encoded)
        start = 0
        while start < len(order):
            end = start + 1  # batch rows are sorted by length, so the last one sets the padded width
            while (
                end < len(order)
                and end - start < self.batch_size
                and (end - start + 1) * len(encoded[order[end]]) <= self.batch_tokens
            ):
                end += 1
            idx = order[start:end]
            types = [encoded[i].type_ids for i in idx] if self.formatter.uses_type_ids else None
            batch = pad_batch([encoded[i].ids for i in idx], pad_id, types)
            out = self.engine.infer(batch)
            self.items_sent += len(idx)
            for i, s in zip(idx, out.tolist(), strict=True):
                scores[i] = float(s)
            start = end
        return scores

    def close(self) -> None:
        self.engine.close()


def api_item(item: Item) -> dict[str, Any]:
    """An item as the HTTP API's JSON item (the inverse of the server's ScoreItemIn.to_item)."""
    if isinstance(item, TextItem):
        return {"text": item.text}
    if isinstance(item, ChatItem):
        return {"messages": [{"role": m.role, "content": m.content} for m in item.messages]}
    prompt = (
        item.prompt
        if isinstance(item.prompt, str)
        else [{"role": m.role, "content": m.content} for m in item.prompt]
    )
    return {"prompt": prompt, "response": item.response}


class RemoteScorer:
    """Through a running rmserve: the client chunks each call and runs ``concurrency`` requests at once."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        batch_size: int = 64,
        concurrency: int = 4,
    ) -> None:
        from service.client import RewardClient

        self.client = RewardClient(
            url, api_key=api_key, model=model, chunk_size=batch_size, max_concurrency=concurrency
        )
        if self.client.health().status == "unreachable":  # fail fast; a starting server gets a minute
            self.client.close()
            raise EvalError(f"no rmserve answers at {url}")
        self.client.wait_until_ready(timeout_s=60.0)
        served = self.client.models()
        chosen = _served_model(served, model)
        manifest = chosen.get("manifest", {})
        self.items_sent = 0
        self.model = {
            "name": chosen.get("name"),
            "version": chosen.get("version"),
            "source": url,
            "mode": "server",
            "provider": chosen.get("provider"),
            "precision": chosen.get("precision"),
            "bundle_name": manifest.get("name"),
            "concurrency": concurrency,
        }

    def score(self, items: list[Item]) -> list[float]:
        from service.client import BadRequestError, RequestTooLargeError

        try:
            result = self.client.score_result([api_item(i) for i in items])
        except RequestTooLargeError:
            raise
        except BadRequestError as exc:
            if exc.status in (400, 422):
                raise RejectedItem(exc.message) from None
            raise
        finally:
            self.items_sent += len(items)
        versions = set(result.model_versions)
        if versions - {self.model["version"]}:
            raise EvalError(
                f"the server now serves model version {sorted(versions)}, not "
                f"{self.model['version']}: scores of two models would mix; rerun with a new --out"
            )
        return result.scores

    def close(self) -> None:
        self.client.close()


def _served_model(served: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    if not served:
        raise EvalError("the server lists no models at /v1/models")
    by_name = {m.get("name"): m for m in served}
    if name is not None:
        if name not in by_name:
            raise EvalError(f"the server does not serve {name!r}; it serves {', '.join(map(str, by_name))}")
        return by_name[name]
    if "default" in by_name:
        return by_name["default"]
    if len(served) == 1:
        return served[0]
    raise EvalError(
        f"the server serves several models ({', '.join(map(str, by_name))}); choose one with --model"
    )


# ------------------------------------------------------------------ the score store (resume)


class ScoreStore:
    """``scores.jsonl``: one JSON record per row, appended and flushed chunk by chunk."""

    def __init__(self, out: Path) -> None:
        self.path = out / SCORES_FILE
        self.records: dict[str, dict[str, Any]] = {}
        self.torn = 0
        self._fh: Any = None

    def load(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return self.records
        data = self.path.read_bytes()
        good = data.rfind(b"\n") + 1
        if good < len(data):  # a run killed mid-write left half a line: cut it; its row is scored again
            with self.path.open("r+b") as fh:
                fh.truncate(good)
            self.torn += 1
        for text in data[:good].decode("utf-8").splitlines():
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                self.torn += 1
                continue
            self.records[record["key"]] = record
        return self.records

    def append(self, records: list[dict[str, Any]]) -> None:
        if self._fh is None:
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        for r in records:
            self.records[r["key"]] = r

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _record(row: EvalRow, scores: list[float]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "key": row.key,
        "file": row.file,
        "line": row.line,
        "kind": row.kind,
        "subset": row.subset,
        "n_chosen": row.n_chosen,
        "scores": scores,
    }
    if row.row_id is not None:
        record["id"] = row.row_id
    return record


def score_chunk(scorer: Scorer, chunk: list[EvalRow]) -> list[dict[str, Any]]:
    """Records for a chunk of rows; a row the model side refuses gets an ``error`` record."""
    items = [item for row in chunk for item in row.items]
    try:
        flat = scorer.score(items)
    except RejectedItem:
        records = []
        for row in chunk:  # find the row(s) at fault; the others are scored as usual
            try:
                records.append(_record(row, scorer.score(list(row.items))))
            except RejectedItem as exc:
                records.append(
                    {
                        "key": row.key,
                        "file": row.file,
                        "line": row.line,
                        "kind": row.kind,
                        "subset": row.subset,
                        "error": str(exc),
                    }
                )
        return records
    records, at = [], 0
    for row in chunk:
        records.append(_record(row, flat[at : at + len(row.items)]))
        at += len(row.items)
    return records


# ------------------------------------------------------------------ the command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rmserve eval",
        description="Score preference eval sets: accuracy per subset, RewardBench weighting, plots, report. "
        "Resumable: rerun the same command to continue a killed run.",
    )
    p.add_argument(
        "data",
        nargs="+",
        metavar="DATA",
        help="JSONL (.gz), JSON, Parquet, CSV files or saved HF dataset directories",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="score in process with this bundle (ONNX Runtime, no server)")
    src.add_argument("--url", help="score through a running rmserve at this URL")
    p.add_argument(
        "--out", required=True, help="output directory (scores.jsonl, summary.json, plots, report.md)"
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
    p.add_argument("--threads", type=int, default=None, help="with --bundle: inference threads")
    p.add_argument("--split", help="the split of a saved HF DatasetDict")
    p.add_argument("--limit", type=int, default=None, help="read at most this many rows of each file")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    p.add_argument(
        "--restart", action="store_true", help="discard the scores already in --out and start over"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Test hook: exit uncleanly (no summary, no cleanup) once this many rows were scored and saved.
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _check_run_file(out: Path, model: dict[str, Any], restart: bool) -> None:
    path = out / RUN_FILE
    if restart:
        for name in (SCORES_FILE, RUN_FILE, BAD_ROWS_FILE):
            (out / name).unlink(missing_ok=True)
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("model_version") != model["version"]:
            raise EvalError(
                f"{out} holds scores of model version {previous.get('model_version')}, this model is "
                f"{model['version']}: use another --out, or --restart to discard them"
            )
        return
    path.write_text(
        json.dumps(
            {
                "model_version": model["version"],
                "model": model.get("name"),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            indent=2,
        )
        + "\n"
    )


def _make_scorer(args: argparse.Namespace) -> Scorer:
    if args.bundle:
        return LocalScorer(
            args.bundle,
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

    from models.report import bad_rows, summarize, write_report

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
        _check_run_file(out, scorer.model, args.restart)
        done = store.load()
        todo = [r for r in rows if r.key not in done]
        resumed = len(rows) - len(todo)
        started = time.perf_counter()
        scored_now = 0
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
                scored_now += len(chunk)
                bar.update(len(chunk))
                if args.stop_after is not None and scored_now >= args.stop_after:
                    os._exit(75)
        seconds = time.perf_counter() - started
    finally:
        store.close()
        scorer.close()
    records = [store.records[r.key] for r in rows]
    run_info = {
        "rows_resumed": resumed,
        "rows_scored": scored_now,
        "items_sent_to_model": scorer.items_sent,
        "torn_lines_discarded": store.torn,
        "seconds": round(seconds, 3),
        "rows_per_s": round(scored_now / seconds, 2) if seconds > 0 and scored_now else None,
        "items_per_s": round(scorer.items_sent / seconds, 2) if seconds > 0 and scorer.items_sent else None,
        "pairs_per_s": _pairs_per_s(todo, seconds),
    }
    summary = summarize(records, bad, files, scorer.model, run_info, limit=args.limit)
    with (out / BAD_ROWS_FILE).open("w", encoding="utf-8") as fh:
        for entry in bad_rows(bad, records):
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
    from service.bundle import BundleError
    from service.client import RewardServerError
    from service.engines.base import EngineError

    try:
        summary = run(args)
    except (EvalError, BundleError, EngineError, RewardServerError) as exc:
        print(f"rmserve eval: {exc}", file=sys.stderr)
        return 1
    from models.report import console_lines

    print("\n".join(console_lines(summary, Path(args.out))))
    return 0


__all__ = ["EvalRow", "LocalScorer", "RemoteScorer", "api_item", "main", "parse_row", "read_data"]
