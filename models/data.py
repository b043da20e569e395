"""Preference data in every shape -> one internal pair type.

Three row shapes (``../shared/data/README.md``), read from JSONL (also ``.gz``), JSON, Parquet or
a Hugging Face dataset saved with ``save_to_disk``:

* HH transcripts with an implicit prompt: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": ...}``, split at the last Assistant turn (``rmserve.formatting.split_hh``);
* explicit strings: ``{"prompt": str, "chosen": str, "rejected": str}`` (TRL's standard form);
* conversational: ``{"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]}``.

The same pair in any of the three shapes loads to the same ``PreferencePair``: an HH-formatted
prompt becomes messages (when rendering them back with ``render_hh`` gives the very same text), so
the server's formatter turns every shape into the same tokens. Optional columns: ``subset`` and
``margin`` (a float the Bradley-Terry loss subtracts from ``r_chosen - r_rejected``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmserve.items import ASSISTANT, Message, Messages, PairItem, render_hh, split_hh

# Real text for parity when the shared data is checked out next to the repo (it is never copied in).
HH_DEV_ENV = "RMSERVE_PARITY_DATA"


def hh_dev_path() -> Path:
    """The HH-RLHF dev pairs export calibrates and checks parity on, when present."""
    env = os.environ.get(HH_DEV_ENV)
    if env:
        return Path(env)
    # <workspace>/<checkout>/models/data.py -> <workspace>/shared/data/...
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "dev.jsonl.gz"


_ROLE_OF = {"Human": "user", "Assistant": "assistant", "System": "system"}
_TURN = re.compile(r"\n\n(Human|Assistant|System):")


class DataError(ValueError):
    """A row (or a whole file) that cannot be read as a preference pair."""

    def __init__(self, path: str | Path, line: int | None, reason: str, *, unit: str = "line") -> None:
        where = (
            f"{path}:{line}"
            if line is not None and unit == "line"
            else (f"{path} row {line}" if line is not None else str(path))
        )
        super().__init__(f"{where}: {reason}")
        self.path = str(path)
        self.line = line  # 1-based line (JSONL) or row (JSON array, Parquet, HF dataset)
        self.reason = reason


@dataclass(frozen=True)
class PreferencePair:
    """One human preference: ``chosen`` was preferred over ``rejected`` as a reply to ``prompt``.

    ``prompt`` is a tuple of messages when the data gave (or rendered to) turns, else the plain
    prompt string. Where the pair came from is kept for error reports but not compared.
    """

    prompt: str | Messages
    chosen: str
    rejected: str
    subset: str | None = None
    margin: float | None = None
    source: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)

    @property
    def prompt_text(self) -> str:
        """The prompt as a text_pair model reads it (messages rendered HH-style)."""
        return self.prompt if isinstance(self.prompt, str) else render_hh(self.prompt) + ASSISTANT

    def items(self) -> tuple[PairItem, PairItem]:
        """(chosen, rejected) as the server's items: scoring them is scoring this pair."""
        return PairItem(self.prompt, self.chosen), PairItem(self.prompt, self.rejected)


# --- rows -> pairs -----------------------------------------------------------------------------


def parse_hh_prompt(prompt: str) -> str | Messages:
    """An HH prompt (ending in the Assistant marker) as messages, when they render back exactly."""
    if not prompt.endswith(ASSISTANT):
        return prompt
    body = prompt[: -len(ASSISTANT)]
    parts = _TURN.split(body)
    if parts[0] != "" or len(parts) < 3:
        return prompt
    messages = []
    for marker, text in zip(parts[1::2], parts[2::2], strict=True):
        if not text.startswith(" "):
            return prompt
        messages.append(Message(_ROLE_OF[marker], text[1:]))
    turns = tuple(messages)
    # Only a lossless parse is used: the server must see the very same text either way.
    return turns if render_hh(turns) == body else prompt


def _split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two HH transcripts sharing their prompt."""
    a, b = split_hh(chosen), split_hh(rejected)
    if a is None or b is None:
        raise ValueError("an HH transcript needs an '\\n\\nAssistant:' turn (or give a 'prompt' column)")
    if a[0] == b[0]:
        return a[0], a[1], b[1]
    # A reply that itself contains "\n\nAssistant:" moves the last marker; the shared prompt is
    # then the common prefix up to its last Assistant marker.
    common = split_hh(os.path.commonprefix([chosen, rejected]))
    if common is None:
        raise ValueError("chosen and rejected do not share a prompt ending in an Assistant turn")
    prompt = common[0]
    return prompt, chosen[len(prompt) :].strip(), rejected[len(prompt) :].strip()


def parse_messages(value: Any, what: str) -> Messages:
    """A row's message list as Messages; ValueError names the field (``what``) and the bad entry."""
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"'{what}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not all(isinstance(m.get(k), str) for k in ("role", "content")):
            raise ValueError(f"'{what}'[{i}] must be an object with string 'role' and 'content'")
        out.append(Message(m["role"], m["content"]))
    return tuple(out)


def _reply(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value.strip()
    if not isinstance(value, list | tuple):
        kind = type(value).__name__
        raise ValueError(f"'{what}' must be a string or a list of one assistant message, not {kind}")
    turns = parse_messages(value, what)
    if len(turns) != 1 or turns[0].role != "assistant":
        raise ValueError(f"'{what}' must be one assistant message, got {[m.role for m in turns]}")
    return turns[0].text.strip()


def _margin(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"'margin' must be a number, not {type(value).__name__}")
    margin = float(value)
    if math.isnan(margin):
        return None  # Parquet and pandas write missing floats as NaN
    if math.isinf(margin):
        raise ValueError("'margin' must be finite")
    return margin


def pair_from_row(row: Any, *, source: str = "", line: int = 0) -> PreferencePair:
    """One row of any of the three shapes as a pair; ValueError says what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, not {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise ValueError(f"missing '{key}'")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    subset = row.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise ValueError("'subset' must be a string")
    if prompt is None:
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError("without a 'prompt', 'chosen' and 'rejected' must be HH transcripts (strings)")
        text, good, bad = _split_transcripts(chosen, rejected)
        parsed: str | Messages = parse_hh_prompt(text)
    else:
        parsed = parse_hh_prompt(prompt) if isinstance(prompt, str) else parse_messages(prompt, "prompt")
        good, bad = _reply(chosen, "chosen"), _reply(rejected, "rejected")
    if isinstance(parsed, tuple):
        render_hh(parsed)  # raises ValueError on a role an HH transcript cannot show
    return PreferencePair(parsed, good, bad, subset, _margin(row.get("margin")), source, line)


# --- files -> rows -----------------------------------------------------------------------------


def jsonl_rows(path: Path, *, errors: str = "strict") -> Iterator[tuple[int, Any]]:
    """Numbered rows of a JSON Lines file (also ``.gz``). A line that is not JSON is yielded as a
    DataError, not raised: lenient loading goes on past it. ``errors`` is how undecodable bytes
    are decoded (``open``'s argument): training data stops at them, ``rmserve eval`` reads on."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors=errors) as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, DataError(path, number, f"invalid JSON: {exc.msg} (column {exc.colno})")


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines under a .json name
            yield from jsonl_rows(path)
            return
        raise DataError(path, exc.lineno, f"invalid JSON: {exc.msg}") from None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(path, None, "a JSON object must hold exactly one list of rows")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(path, None, "a JSON file must hold a list of rows")
    yield from enumerate(data, start=1)


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _hf_rows(path: Path, split: str | None) -> Iterator[tuple[int, Any]]:
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        names = list(data.keys())
        if split is None and len(names) == 1:
            split = names[0]
        if split not in data:
            raise DataError(path, None, f"choose a split with split=...: this dataset has {names}")
        data = data[split]
    yield from enumerate(data, start=1)


def read_rows(path: str | Path, *, split: str | None = None) -> tuple[Iterator[tuple[int, Any]], str]:
    """(numbered rows, the unit the numbers count: "line" or "row") of a data file or dataset dir."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, None, "no such file or directory")
    if p.is_dir():
        return _hf_rows(p, split), "row"
    name = p.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return jsonl_rows(p), "line"
    if name.endswith((".json", ".json.gz")):
        return _json_rows(p), "row"
    if name.endswith(".parquet"):
        return _parquet_rows(p), "row"
    raise DataError(p, None, "unknown format: expected .jsonl[.gz], .json, .parquet or a saved HF dataset")


def load_pairs(
    path: str | Path,
    *,
    split: str | None = None,
    errors: list[DataError] | None = None,
    limit: int | None = None,
) -> list[PreferencePair]:
    """All pairs of a file. A malformed row raises DataError (with .path and .line), unless
    ``errors`` is a list: then each bad row is appended to it and skipped (lenient mode)."""
    rows, unit = read_rows(path, split=split)
    pairs: list[PreferencePair] = []
    for number, row in rows:
        if limit is not None and len(pairs) >= limit:
            break
        try:
            if isinstance(row, DataError):
                raise row
            pairs.append(pair_from_row(row, source=str(path), line=number))
        except ValueError as exc:
            error = exc if isinstance(exc, DataError) else DataError(path, number, str(exc), unit=unit)
            if errors is None:
                raise error from None
            errors.append(error)
    return pairs


def load_many(paths: Iterable[str | Path], **kwargs: Any) -> list[PreferencePair]:
    return [pair for path in paths for pair in load_pairs(path, **kwargs)]


def recorded_path(path: str | Path) -> str:
    """A path as a record that ships with a bundle names it: as given when relative, relative to the
    working directory when it lies inside it, else by its last two parts (``hh-rlhf/dev.jsonl.gz``), so
    the layout of the machine that built a bundle does not travel with it. A digest beside it says
    which file it was."""
    p = Path(path)
    if not p.is_absolute():
        return str(path)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(Path(*p.parts[-2:]))


def data_digest(path: str | Path) -> str:
    """sha256 of a data file (or every file of a dataset directory), for training records."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return "sha256:" + h.hexdigest()
