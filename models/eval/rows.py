"""``rmserve eval``, first stage: data files -> rows to score, and the bad rows with file and line.

Rows come in these shapes: preference pairs in the shapes of ``rmserve.models.data``, best-of-N rows in
RewardBench-2's shape (one prompt, ``chosen`` and ``rejected`` as lists of responses), plain
prompt/response, ``messages`` or ``text`` rows that are only scored, and for process reward models
ProcessBench rows (``problem``, ``steps``, ``label``: the index of the first wrong step, or -1) and
best-of-N solutions in steps (``candidates``, each a list of steps, and ``correct``, one bool each).
Files are JSONL (also ``.gz``) and CSV here; JSON, Parquet and saved HF datasets through
``rmserve.models.data.read_rows``.

Every row has a key: the first 16 hex digits of its data file's sha256 and its row number.
"""

from __future__ import annotations

import csv
import gzip
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rmserve.items import (
    ChatItem,
    Item,
    Messages,
    PairItem,
    StepsItem,
    TextItem,
    item_problem,
    render_hh,
    split_steps,
)
from rmserve.models.data import (
    DataError,
    data_digest,
    jsonl_rows,
    pair_from_row,
    parse_hh_prompt,
    parse_messages,
    read_rows,
)

Kind = Literal["pair", "best_of_n", "score", "process", "process_best_of_n"]
PROCESS_KINDS = ("process", "process_best_of_n")


class EvalError(Exception):
    """The run cannot go on (bad arguments, a mismatched --out, --strict hit a bad row)."""


@dataclass(frozen=True)
class EvalRow:
    """One row to score. ``items`` hold the chosen responses first (``n_chosen`` of them), then the
    rejected ones; a plain row has one item and ``n_chosen == 0``. A ProcessBench row has one steps
    item and ``label``; a process best-of-N row one steps item per candidate and ``correct``."""

    key: str
    file: str
    line: int
    kind: Kind
    items: tuple[Item, ...]
    n_chosen: int
    subset: str | None = None
    row_id: str | None = None
    label: int | None = None
    correct: tuple[bool, ...] = ()


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
    return parse_messages(value, "prompt")


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
    """One raw row as an EvalRow; ValueError says what is wrong with it, including a text no
    tokenizer can take (a lone surrogate), which would otherwise stop the whole run."""
    parsed = _parse_row(row, key=key, file=file, line=line)
    for i, item in enumerate(parsed.items):
        problem = item_problem(item)
        if problem is not None:
            raise ValueError(f"item {i} of the row: {problem}")
    return parsed


def _parse_row(row: Any, *, key: str, file: str, line: int) -> EvalRow:
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, not {type(row).__name__}")
    subset = _text_field(row, "subset")
    row_id = None if row.get("id") is None else str(row["id"])
    if "steps" in row or "candidates" in row:
        return _process_row(row, key=key, file=file, line=line, subset=subset, row_id=row_id)
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
        messages = parse_messages(row["messages"], "messages")
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


def _steps(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return split_steps(value)
    if not _str_list(value):
        raise ValueError(f"'{what}' must be a non-empty list of steps (strings), or text with blank lines")
    return tuple(value)


def _process_row(
    row: dict[str, Any], *, key: str, file: str, line: int, subset: str | None, row_id: str | None
) -> EvalRow:
    """A ProcessBench row, or a best-of-N row of solutions in steps."""
    question = row.get("problem", row.get("prompt"))
    if question is None:
        raise ValueError("a row of steps needs its 'problem' (or 'prompt')")
    prompt = _prompt(question) if not isinstance(question, str) else question
    if "candidates" in row:
        candidates = row["candidates"]
        correct = row.get("correct")
        if not isinstance(candidates, list) or not candidates:
            raise ValueError("'candidates' must be a non-empty list of solutions")
        if not isinstance(correct, list) or len(correct) != len(candidates):
            raise ValueError("'correct' must be a list of one bool per candidate")
        if not all(isinstance(c, bool) for c in correct):
            raise ValueError("'correct' must hold true or false for each candidate")
        items = tuple(StepsItem(prompt, _steps(c, f"candidates[{i}]")) for i, c in enumerate(candidates))
        return EvalRow(key, file, line, "process_best_of_n", items, 0, subset, row_id, correct=tuple(correct))
    steps = _steps(row["steps"], "steps")
    label = row.get("label")
    if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(steps):
        raise ValueError(
            f"'label' must be the index of the first wrong step (0 to {len(steps) - 1}) or -1, not {label!r}"
        )
    return EvalRow(key, file, line, "process", (StepsItem(prompt, steps),), 0, subset, row_id, label=label)


# ------------------------------------------------------------------ files -> raw rows

RawRows = Iterator[tuple[int, Any]]


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
        return jsonl_rows(path, errors="replace"), "line"
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
