"""``rmserve eval``'s output directory: ``scores.jsonl`` (the resume file) and ``run.json``.

A run that finds ``scores.jsonl`` in ``--out`` scores only the rows whose keys are not in it yet, so
a killed run continues where it stopped and no row is sent to the model twice. ``run.json`` pins the
model version, backend (``provider``) and precision the scores came from: scores of two models, or of
one model in two precisions, never mix in one directory.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rmserve.models.eval.rows import EvalError

SCORES_FILE = "scores.jsonl"
RUN_FILE = "run.json"
BAD_ROWS_FILE = "bad_rows.jsonl"
OVER_LENGTH_FILE = "over_max_length.jsonl"


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


def check_run_file(out: Path, model: dict[str, Any], restart: bool) -> None:
    path = out / RUN_FILE
    if restart:
        for name in (SCORES_FILE, RUN_FILE, BAD_ROWS_FILE):
            (out / name).unlink(missing_ok=True)
    pinned = {
        "model_version": model["version"],
        "provider": model["provider"],
        "precision": model["precision"],
    }
    if path.is_file():
        previous = json.loads(path.read_text())
        for key, value in pinned.items():
            if key in previous and previous[key] != value:  # an older run.json may lack provider/precision
                raise EvalError(
                    f"{out} holds scores of {key.replace('_', ' ')} {previous[key]}, this run scores with "
                    f"{value}: use another --out, or --restart to discard them"
                )
        return
    record = {**pinned, "model": model.get("name"), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.write_text(json.dumps(record, indent=2) + "\n")
