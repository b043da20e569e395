"""The calibration pairs a bundle carries (``calibration.jsonl``): what a reduced-precision bundle is
measured and gated on, kept so the measurement can be repeated."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from rmserve.bundle import CALIBRATION_FILE
from rmserve.models import parity
from rmserve.models.parity import Pair

MAX_CALIBRATION_PAIRS = 64


def calibration_set(value: Sequence[Pair | Mapping[str, str]] | str | Path | None) -> list[Pair]:
    """Up to 64 prompt/response pairs: given, read from a JSONL file, or the parity text source."""
    if value is None:
        pairs, _ = parity.reference_pairs(MAX_CALIBRATION_PAIRS)
        return pairs
    if isinstance(value, str | Path):
        if str(value) == "builtin":
            return parity.builtin_pairs()[:MAX_CALIBRATION_PAIRS]
        lines = Path(value).read_text(encoding="utf-8").splitlines()
        value = [json.loads(line) for line in lines if line.strip()]
    pairs = [p if isinstance(p, Pair) else Pair(str(p["prompt"]), str(p["response"])) for p in value]
    return pairs[:MAX_CALIBRATION_PAIRS]


def write_calibration(directory: Path, pairs: Sequence[Pair]) -> None:
    """``calibration.jsonl`` in ``directory``: one ``{"prompt", "response"}`` object a line."""
    with (directory / CALIBRATION_FILE).open("w", encoding="utf-8") as fh:
        for p in pairs:
            fh.write(json.dumps({"prompt": p.prompt, "response": p.response}, ensure_ascii=False) + "\n")
