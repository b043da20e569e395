"""Pairwise accuracy: how often a model scores chosen above rejected.

Scoring goes through the server's own parts (``Formatter`` for token ids, ``pad_batch`` and the
ONNX Runtime engine for a bundle), so a number measured here is the number the server gives.
Rows are scored in length-sorted batches; scores do not depend on what shares a batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rmserve.engines.base import TokenBatch, available_cpus, pad_batch
from rmserve.formatting import Encoded, Formatter
from rmserve.models.data import PreferencePair


def encode_pairs(
    formatter: Formatter, pairs: Sequence[PreferencePair]
) -> tuple[list[Encoded], list[Encoded]]:
    """(chosen, rejected) token ids of each pair, exactly as the server would encode the items."""
    items = [item for pair in pairs for item in pair.items()]
    encoded = formatter.encode(items)
    return encoded[0::2], encoded[1::2]


def score_encoded(
    rows: Sequence[Encoded], infer: Callable[[TokenBatch], np.ndarray], pad_id: int, batch_tokens: int = 16384
) -> np.ndarray:
    """Scores of encoded rows, in their order, batched by length under a padded-token budget."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    scores = np.zeros(len(rows), dtype=np.float32)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(rows[order[end]]) <= batch_tokens:
            end += 1
        chunk = [rows[i] for i in order[start:end]]
        types = [r.type_ids for r in chunk] if chunk[0].type_ids is not None else None
        batch = pad_batch([r.ids for r in chunk], pad_id, types)
        scores[order[start:end]] = infer(batch)
        start = end
    return scores


def _score_pairs(
    formatter: Formatter, pairs: Sequence[PreferencePair], infer: Callable[[TokenBatch], np.ndarray]
) -> np.ndarray:
    chosen, rejected = encode_pairs(formatter, pairs)
    flat = score_encoded([*chosen, *rejected], infer, formatter.settings.pad_token_id)
    return np.stack([flat[: len(pairs)], flat[len(pairs) :]], axis=1)


def score_bundle(
    bundle_dir: str | Path, pairs: Sequence[PreferencePair], *, threads: int | None = None
) -> np.ndarray:
    """[N, 2] (chosen, rejected) scores from a bundle on the ONNX Runtime CPU engine."""
    from rmserve.bundle import load_bundle
    from rmserve.engines.onnxruntime import OnnxRuntimeEngine

    bundle = load_bundle(bundle_dir)
    engine = OnnxRuntimeEngine(bundle.model_path, threads=threads or available_cpus())
    try:
        return _score_pairs(Formatter(bundle), pairs, engine.infer)
    finally:
        engine.close()


def score_torch(model: Any, formatter: Formatter, pairs: Sequence[PreferencePair]) -> np.ndarray:
    """[N, 2] scores from a torch ``ScoreModel`` (fp32, eval mode) on the same token ids."""
    import torch

    device = next(model.parameters()).device

    def infer(batch: TokenBatch) -> np.ndarray:
        feeds = {
            k: torch.from_numpy(v).to(device)
            for k, v in (
                ("input_ids", batch.input_ids),
                ("attention_mask", batch.attention_mask),
                ("token_type_ids", batch.token_type_ids),
            )
            if v is not None
        }
        with torch.no_grad():
            return model(**feeds).float().cpu().numpy()

    was_training = model.training
    model.eval()
    try:
        return _score_pairs(formatter, pairs, infer)
    finally:
        model.train(was_training)


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
