"""rmserve.models.data: three row shapes, four file formats, one internal pair; bad rows named by line."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from rmserve.items import Message
from rmserve.models.data import (
    DataError,
    PreferencePair,
    data_digest,
    load_pairs,
    pair_from_row,
    recorded_path,
)

PROMPT = "\n\nHuman: How do I boil an egg?\n\nAssistant: In water.\n\nHuman: For how long?"
GOOD, BAD = "About nine minutes for a hard yolk.", "Eggs are laid by hens."

HH = {"chosen": f"{PROMPT}\n\nAssistant: {GOOD}", "rejected": f"{PROMPT}\n\nAssistant: {BAD}", "subset": "s"}
EXPLICIT = {"prompt": PROMPT + "\n\nAssistant:", "chosen": " " + GOOD, "rejected": " " + BAD, "subset": "s"}
CONVERSATIONAL = {
    "prompt": [
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "In water."},
        {"role": "user", "content": "For how long?"},
    ],
    "chosen": [{"role": "assistant", "content": GOOD}],
    "rejected": [{"role": "assistant", "content": BAD}],
    "subset": "s",
}
EXPECTED = PreferencePair(
    prompt=(
        Message("user", "How do I boil an egg?"),
        Message("assistant", "In water."),
        Message("user", "For how long?"),
    ),
    chosen=GOOD,
    rejected=BAD,
    subset="s",
)


def write_jsonl(path: Path, rows: list[object], *, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("row", [HH, EXPLICIT, CONVERSATIONAL], ids=["hh", "explicit", "conversational"])
def test_three_shapes_load_to_the_same_pair(tmp_path: Path, row: dict[str, object]) -> None:
    (pair,) = load_pairs(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert pair == EXPECTED
    assert pair.prompt_text == PROMPT + "\n\nAssistant:"
    assert (pair.source, pair.line) == (str(tmp_path / "d.jsonl"), 1)


def test_items_are_what_the_server_scores() -> None:
    chosen, rejected = EXPECTED.items()
    assert (chosen.prompt, chosen.response, rejected.response) == (EXPECTED.prompt, GOOD, BAD)


def test_hh_reply_containing_an_assistant_marker_keeps_the_shared_prompt() -> None:
    odd = BAD + "\n\nAssistant: and more"
    pair = pair_from_row({"chosen": HH["chosen"], "rejected": PROMPT + "\n\nAssistant: " + odd})
    assert pair.prompt == EXPECTED.prompt
    assert (pair.chosen, pair.rejected) == (GOOD, odd)


def test_plain_string_prompt_and_margin() -> None:
    pair = pair_from_row({"prompt": "Rewrite: hi", "chosen": "Hello.", "rejected": "hi", "margin": 1.5})
    assert pair.prompt == "Rewrite: hi" and pair.prompt_text == "Rewrite: hi"
    assert pair.margin == 1.5 and pair.subset is None


def test_malformed_row_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl.gz"
    rows: list[object] = [HH, EXPLICIT, {"prompt": "p", "chosen": True, "rejected": "r"}, CONVERSATIONAL]
    write_jsonl(path, rows, gz=True)
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert info.value.path == str(path) and info.value.line == 3
    assert f"{path}:3:" in str(info.value) and "chosen" in str(info.value)


def test_lenient_mode_collects_bad_rows_and_keeps_good_ones(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    no_marker = {"chosen": "no marker", "rejected": "x"}
    bad_margin = {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}
    lines = [
        json.dumps(HH),
        "{not json",
        "",
        json.dumps(no_marker),
        json.dumps(CONVERSATIONAL),
        json.dumps(bad_margin),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    errors: list[DataError] = []
    pairs = load_pairs(path, errors=errors)
    assert pairs == [EXPECTED, EXPECTED]
    assert [e.line for e in errors] == [2, 4, 6]
    reasons = [e.reason for e in errors]
    assert "invalid JSON" in reasons[0] and "Assistant" in reasons[1] and "margin" in reasons[2]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"chosen": "a"}, "missing 'rejected'"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "'prompt'[0]"),
        ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "assistant"),
        ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "role"),
        (["not", "an", "object"], "object"),
    ],
)
def test_what_is_wrong_is_said(row: object, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        pair_from_row(row)


def test_json_parquet_and_hf_dataset_readers(tmp_path: Path) -> None:
    rows = [EXPLICIT, {**EXPLICIT, "margin": 0.5}]
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps(rows), encoding="utf-8")
    assert load_pairs(json_path) == [EXPECTED, PreferencePair(**{**EXPECTED.__dict__, "margin": 0.5})]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([HH, HH]), tmp_path / "d.parquet")
    assert load_pairs(tmp_path / "d.parquet") == [EXPECTED, EXPECTED]

    from datasets import Dataset, DatasetDict

    Dataset.from_list([CONVERSATIONAL]).save_to_disk(str(tmp_path / "ds"))
    assert load_pairs(tmp_path / "ds") == [EXPECTED]
    DatasetDict({"train": Dataset.from_list([HH]), "test": Dataset.from_list([EXPLICIT])}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert load_pairs(tmp_path / "dd", split="test") == [EXPECTED]
    with pytest.raises(DataError, match="split"):
        load_pairs(tmp_path / "dd")


def test_json_rows_report_their_row_and_unknown_formats_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [EXPLICIT, {"chosen": "x"}]}), encoding="utf-8")
    with pytest.raises(DataError, match="row 2") as info:
        load_pairs(path)
    assert info.value.line == 2
    with pytest.raises(DataError, match="unknown format"):
        load_pairs(write_jsonl(tmp_path / "d.txt", [HH]))
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "missing.jsonl")


def test_digest_names_the_content(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [HH])
    b = write_jsonl(tmp_path / "b.jsonl", [HH, HH])
    assert data_digest(a).startswith("sha256:") and data_digest(a) != data_digest(b)


def test_a_recorded_path_names_no_folder_outside_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert recorded_path("../shared/data/dev.jsonl") == "../shared/data/dev.jsonl"  # relative: as given
    assert recorded_path(tmp_path / "runs" / "dev.jsonl") == "runs/dev.jsonl"
    assert recorded_path("/somewhere/else/hh-rlhf/dev.jsonl.gz") == "hh-rlhf/dev.jsonl.gz"
