"""The one offline scoring loop: sort, cut into batches, pad, infer, put scores back in order.

Every caller that scores a list of encoded items outside the request path goes through
``score_rows``: the quality gate and the engine choice (service/engines), parity and the fp16
measurement (against ONNX Runtime and against PyTorch alike: ``infer`` is any function from a
padded batch to scores), and evaluation. ``read`` takes an item's value out of its row of output
(``rmserve.kinds``: a process model's step values, wherever padding put the item's tokens). The
server's own batcher plans its batches by cost instead (service/batching.py) and pads with the same
``pad_batch``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from rmserve.engines.base import TokenBatch, pad_batch
from rmserve.formatting import Encoded

Infer = Callable[[TokenBatch], np.ndarray]
# Every batch in one call: an engine that loads a graph a piece at a time (models/piecewise.py) runs
# all batches through a piece before it loads the next.
InferMany = Callable[[Sequence[TokenBatch]], list[np.ndarray]]
Side = Literal["right", "left"]
# (a row of output, its item, where the item's tokens start in the row) -> the item's value(s)
Read = Callable[[np.ndarray, Encoded, int], Any]


def pad_rows(rows: Sequence[Encoded], pad_id: int, side: Side = "right") -> TokenBatch:
    """Pad encoded items on ``side``; right padding is exactly the server's ``pad_batch``."""
    types = [r.type_ids for r in rows] if any(r.type_ids is not None for r in rows) else None
    right = pad_batch([r.ids for r in rows], pad_id, types)
    if side == "right":
        return right
    # Left padding: each row's real tokens move to the end of the row.
    shifts = [right.shape[1] - len(row) for row in rows]

    def roll(array: np.ndarray) -> np.ndarray:
        return np.stack([np.roll(line, shift) for line, shift in zip(array, shifts, strict=True)])

    types_left = roll(right.token_type_ids) if right.token_type_ids is not None else None
    return TokenBatch(roll(right.input_ids), roll(right.attention_mask), types_left)


def plan_batches(
    lengths: Sequence[int],
    *,
    items: int | None = None,
    tokens: int | None = None,
    sort: bool = True,
) -> list[list[int]]:
    """Row indices per batch: at most ``items`` rows and ``tokens`` padded tokens (at least one row).

    ``sort`` orders rows by length first, so a batch holds rows of similar length; without it the
    rows keep their order (parity pads exactly the batches it names).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if sort else list(range(len(lengths)))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index in order:
        wider = max(width, lengths[index])
        over_items = items is not None and len(current) + 1 > items
        over_tokens = tokens is not None and (len(current) + 1) * wider > tokens
        if current and (over_items or over_tokens):
            batches.append(current)
            current, wider = [], lengths[index]
        current.append(index)
        width = wider
    if current:
        batches.append(current)
    return batches


def infer_rows(
    rows: Sequence[Encoded],
    infer: Infer,
    pad_id: int,
    read: Read,
    *,
    batch_items: int | None = None,
    batch_tokens: int | None = None,
    side: Side = "right",
    sort: bool = True,
    streams: int = 1,
    infer_many: InferMany | None = None,
) -> list[Any]:
    """Each row's value as ``read`` takes it from its row of output, in the rows' order (see
    ``plan_batches``), ``streams`` batches in flight, or all of them in one ``infer_many`` call."""
    plan = plan_batches([len(r) for r in rows], items=batch_items, tokens=batch_tokens, sort=sort)
    batches = [pad_rows([rows[i] for i in idx], pad_id, side) for idx in plan]
    if infer_many is not None:
        results = infer_many(batches)
    elif streams > 1 and len(batches) > 1:
        with ThreadPoolExecutor(max_workers=streams) as pool:
            results = list(pool.map(infer, batches))
    else:
        results = [infer(b) for b in batches]
    out: list[Any] = [None] * len(rows)
    for idx, batch, output in zip(plan, batches, results, strict=True):
        width = batch.shape[1]
        for i, line in zip(idx, output, strict=True):
            out[i] = read(line, rows[i], width - len(rows[i]) if side == "left" else 0)
    return out


def engine_rows(rows: Sequence[Encoded], engine: Any, pad_id: int, **how: Any) -> np.ndarray:
    """``score_rows`` through an engine, handing it every batch at once where it takes them so
    (``infer_many``: models/piecewise.py); ``how``: score_rows' keywords."""
    return score_rows(rows, engine.infer, pad_id, infer_many=getattr(engine, "infer_many", None), **how)


def _score(line: np.ndarray, row: Encoded, start: int) -> float:
    """A row's score: its one value, or the first column before a bundle's extra outputs."""
    return float(np.asarray(line).reshape(-1)[0])


def score_rows(
    rows: Sequence[Encoded],
    infer: Infer,
    pad_id: int,
    *,
    batch_items: int | None = None,
    batch_tokens: int | None = None,
    side: Side = "right",
    sort: bool = True,
    streams: int = 1,
    read: Read | None = None,
    infer_many: InferMany | None = None,
) -> np.ndarray:
    """float64 values in the rows' order: one score per row, or with ``read`` whatever it takes from
    each row (a process model's step values), one row's after another in one flat array."""
    values = infer_rows(
        rows,
        infer,
        pad_id,
        read or _score,
        batch_items=batch_items,
        batch_tokens=batch_tokens,
        side=side,
        sort=sort,
        streams=streams,
        infer_many=infer_many,
    )
    flat = [np.asarray(v, dtype=np.float64).reshape(-1) for v in values]
    return np.concatenate(flat) if flat else np.empty(0, dtype=np.float64)
