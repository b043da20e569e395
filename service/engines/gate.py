"""The quality gate: a reduced precision is served only if it agrees with fp32 on real pairs.

Run at start-up on the calibration pairs the exporter stored in the bundle. It measures, against
the exact fp32 engine: pairwise-order agreement over every pair of items, Spearman correlation,
the largest deviation, and the batch-composition drift (an item alone vs inside a padded batch of
all the others). Deviations are relative to the mean |fp32 score|, the scale rewards live on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rmserve.bundle import Bundle
from rmserve.engines.base import Engine
from rmserve.engines.batches import score_rows
from rmserve.errors import InvalidItem
from rmserve.formatting import Encoded, Formatter
from rmserve.items import Item, PairItem

MIN_AGREEMENT = 0.99
MIN_SPEARMAN = 0.995


@dataclass(frozen=True)
class GateReport:
    provider: str
    precision: str
    items: int
    pairwise_agreement: float
    spearman: float
    max_abs_deviation: float
    max_rel_deviation: float
    batch_drift_rel: float
    min_agreement: float
    min_spearman: float
    passed: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.provider} {self.precision}: pairwise agreement {self.pairwise_agreement:.4f} "
            f"(needs >= {self.min_agreement}), Spearman {self.spearman:.5f} (needs >= {self.min_spearman}), "
            f"max relative deviation {self.max_rel_deviation:.4f}, batch drift {self.batch_drift_rel:.4f} "
            f"on {self.items} calibration pairs"
        )


def calibration_items(bundle: Bundle, formatter: Formatter) -> list[Encoded]:
    """The bundle's calibration pairs, encoded as requests are; those it would refuse are left out."""
    name = bundle.manifest.calibration_file
    path = bundle.path / name if name else None
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(
            f"{bundle.path} has no calibration pairs; a reduced precision cannot be gated"
        )
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    items: list[Item] = [PairItem(r["prompt"], r["response"]) for r in rows]
    try:
        return formatter.encode(items)
    except InvalidItem:
        pass
    # A pair the bundle refuses as a request (a gating head whose prompt end truncation cut off, say)
    # could never be served, so it measures nothing: the gate runs on the others.
    kept: list[Encoded] = []
    for item in items:
        try:
            kept += formatter.encode([item])
        except InvalidItem:
            continue
    if len(kept) < 2:
        raise ValueError(
            f"{bundle.path}: {len(items) - len(kept)} of its {len(items)} calibration pairs are refused "
            "as requests; a reduced precision cannot be gated"
        )
    return kept


def score_items(engine: Engine, items: list[Encoded], pad_id: int, batch: int) -> np.ndarray:
    """Scores in the items' order through the shared loop, length-sorted batches of ``batch``."""
    return score_rows(items, engine.infer, pad_id, batch_items=batch, streams=engine.info.streams)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    if ra.std() == 0 or rb.std() == 0:
        return 1.0 if np.array_equal(ra, rb) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def pairwise_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of item pairs that both score vectors order the same way (ties in fp32 skipped)."""
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    upper = np.triu(np.ones_like(da, dtype=bool), k=1) & (da != 0)
    total = int(upper.sum())
    return 1.0 if total == 0 else float((da[upper] == db[upper]).sum() / total)


def run_gate(
    reference: Engine,
    candidate: Engine,
    items: list[Encoded],
    *,
    pad_id: int,
    min_agreement: float = MIN_AGREEMENT,
    min_spearman: float = MIN_SPEARMAN,
) -> GateReport:
    exact = score_items(reference, items, pad_id, batch=1)
    alone = score_items(candidate, items, pad_id, batch=1)
    crowd = score_items(candidate, items, pad_id, batch=len(items))
    scale = max(float(np.mean(np.abs(exact))), 1e-6)
    agreement = pairwise_agreement(exact, alone)
    rho = spearman(exact, alone)
    dev = float(np.max(np.abs(alone - exact)))
    return GateReport(
        provider=candidate.info.provider,
        precision=candidate.info.precision,
        items=len(items),
        pairwise_agreement=round(agreement, 6),
        spearman=round(rho, 6),
        max_abs_deviation=dev,
        max_rel_deviation=dev / scale,
        batch_drift_rel=float(np.max(np.abs(crowd - alone))) / scale,
        min_agreement=min_agreement,
        min_spearman=min_spearman,
        passed=agreement >= min_agreement and rho >= min_spearman,
    )
