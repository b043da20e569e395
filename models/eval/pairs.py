"""Pairwise accuracy: how often a model scores chosen above rejected.

Scoring goes through the server's own parts (``Formatter`` for token ids, the shared scoring loop of
service/engines/batches.py, the ONNX Runtime engine), so a number measured here is the server's.
Rows are scored in length-sorted batches; scores do not depend on what shares a batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rmserve.engines.base import TokenBatch, available_cpus
from rmserve.engines.batches import score_rows
from rmserve.formatting import Encoded, Formatter
from rmserve.models.data import PreferencePair

# Padded tokens per forward pass when scoring a file of pairs.
BATCH_TOKENS = 16384


def encode_pairs(
    formatter: Formatter, pairs: Sequence[PreferencePair]
) -> tuple[list[Encoded], list[Encoded]]:
    """(chosen, rejected) token ids of each pair, exactly as the server would encode the items."""
    items = [item for pair in pairs for item in pair.items()]
    encoded = formatter.encode(items)
    return encoded[0::2], encoded[1::2]


def _score_pairs(
    formatter: Formatter, pairs: Sequence[PreferencePair], infer: Callable[[TokenBatch], np.ndarray]
) -> np.ndarray:
    chosen, rejected = encode_pairs(formatter, pairs)
    rows = [*chosen, *rejected]
    flat = score_rows(rows, infer, formatter.settings.pad_token_id, batch_tokens=BATCH_TOKENS)
    return np.stack([flat[: len(pairs)], flat[len(pairs) :]], axis=1)


def score_bundle(
    bundle_dir: str | Path, pairs: Sequence[PreferencePair], *, threads: int | None = None
) -> np.ndarray:
    """[N, 2] (chosen, rejected) scores from a bundle on the ONNX Runtime CPU engine, mapped by its
    ``score_scale`` and ``score_shift`` as the server serves them."""
    from rmserve.bundle import load_bundle
    from rmserve.engines.onnxruntime import OnnxRuntimeEngine

    bundle = load_bundle(bundle_dir)
    engine = OnnxRuntimeEngine(bundle.model_path, threads=threads or available_cpus())
    try:
        raw = _score_pairs(Formatter(bundle), pairs, engine.infer)
        return raw * bundle.manifest.format.score_scale + bundle.manifest.format.score_shift
    finally:
        engine.close()


def pairwise_accuracy(scores: np.ndarray, pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """Share of pairs with r_chosen > r_rejected (a tie counts as wrong), overall and per subset."""
    wins = scores[:, 0] > scores[:, 1]
    by_subset: dict[str, list[bool]] = defaultdict(list)
    for pair, win in zip(pairs, wins, strict=True):
        by_subset[pair.subset or "(none)"].append(bool(win))
    return {
        "accuracy": round(float(wins.mean()), 6) if len(pairs) else None,
        "pairs": len(pairs),
        "subsets": {
            name: {"accuracy": round(float(np.mean(v)), 6), "pairs": len(v)}
            for name, v in sorted(by_subset.items())
        },
        "mean_margin": round(float((scores[:, 0] - scores[:, 1]).mean()), 6) if len(pairs) else None,
    }
