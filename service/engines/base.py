"""The engine protocol: a padded batch of token ids in, float32 out: one score per row (an outcome
graph), or one value per token of each row (a process graph, read at its step tokens). A bundle whose
manifest names outputs beside the score (``Manifest.extra_outputs``) gets ``[rows, 1 + width]``: the
score, then those outputs' values (a gating head's components), read by the bundle's kind."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded inputs for one forward pass."""

    input_ids: np.ndarray  # int64 [B, T]
    attention_mask: np.ndarray  # int64 [B, T]
    token_type_ids: np.ndarray | None = None  # int64 [B, T], encoders that use them

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.input_ids.shape
        return int(rows), int(cols)

    def feeds(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        arrays = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }
        out = {}
        for name in names:
            value = arrays.get(name)
            if value is None:
                value = np.zeros_like(self.input_ids)
            out[name] = value
        return out


def pad_batch(
    rows: Sequence[Sequence[int] | np.ndarray],
    pad_id: int,
    type_ids: Sequence[Sequence[int] | None] | None = None,
) -> TokenBatch:
    """Right-pad token id rows into a TokenBatch (the ONNX graph pools correctly under padding)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    types = np.zeros((len(rows), width), dtype=np.int64) if type_ids is not None else None
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        row_types = type_ids[i] if type_ids is not None else None
        if types is not None and row_types is not None:
            types[i, : len(row)] = row_types
    return TokenBatch(ids, mask, types)


@dataclass(frozen=True)
class EngineInfo:
    """What an engine is, for /info, /v1/models and rmserve_model_info."""

    provider: str  # "cpu" | "cuda" | "openvino"
    precision: str
    threads: int  # in all, shared by the streams
    streams: int = 1  # forward passes that may run at once
    detail: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    """A loaded model. ``infer`` blocks; up to ``info.streams`` threads may call it at once.

    On a small CPU two single-threaded forward passes side by side do more work than one pass on
    two threads (a small batch cannot keep two threads busy), so CPU engines offer streams.
    """

    info: EngineInfo

    def infer(self, batch: TokenBatch) -> np.ndarray:
        """float32 ``[rows]`` scores, ``[rows, width]`` values for a process graph, or ``[rows, 1 + k]``
        with the manifest's extra outputs."""
        ...

    def close(self) -> None: ...


def with_columns(scores: np.ndarray, extras: Sequence[np.ndarray]) -> np.ndarray:
    """float32 ``[rows, 1 + k]``: each row's score, then its values of the extra outputs."""
    rows = scores.shape[0]
    columns = [scores.reshape(rows, -1), *(np.asarray(e).reshape(rows, -1) for e in extras)]
    return np.concatenate(columns, axis=1).astype(np.float32, copy=False)


def infer_all(engine: Engine, batches: Sequence[TokenBatch]) -> list[np.ndarray]:
    """Scores of every batch, in order, with as many batches in flight as the engine has streams."""
    if engine.info.streams <= 1 or len(batches) <= 1:
        return [engine.infer(b) for b in batches]
    with ThreadPoolExecutor(max_workers=engine.info.streams) as pool:
        return list(pool.map(engine.infer, batches))


class BatchRefused(ValueError):
    """A batch the engine's graph would score wrongly: a caller's bug, never a client's input."""


def left_padded_rows(attention_mask: np.ndarray) -> list[int]:
    """Rows whose mask has a padding position before a real one (right padding has none)."""
    return [int(i) for i in np.flatnonzero((attention_mask[:, 1:] > attention_mask[:, :-1]).any(axis=1))]


class RightPaddedOnly:
    """An engine for a bundle whose graph reads no padding mask (manifest ``padding: right``).

    Such a graph attends causally and pools at ``sum(mask) - 1``, which is each row's last real token
    only when the row is padded on the right; a left-padded batch is refused before it runs, so it can
    never come back as wrong scores. The server pads on the right (``pad_batch``).
    """

    def __init__(self, engine: Engine, bundle: str) -> None:
        self.engine = engine
        self.bundle = bundle
        self.info = engine.info

    def infer(self, batch: TokenBatch) -> np.ndarray:
        rows = left_padded_rows(batch.attention_mask)
        if rows:
            raise BatchRefused(
                f"bundle {self.bundle!r} requires right padding (its graph reads no padding mask: "
                f"manifest padding=right), but rows {rows[:8]} of this batch are left-padded"
            )
        return self.engine.infer(batch)

    def close(self) -> None:
        self.engine.close()


def for_padding(engine: Engine, padding: str, bundle: str) -> Engine:
    """``engine`` as a bundle whose manifest says ``padding`` must be fed."""
    return RightPaddedOnly(engine, bundle) if padding == "right" else engine


class EngineError(Exception):
    """An engine cannot be created as configured (missing provider, bad model file)."""


class EngineCrashed(EngineError):
    """The engine can no longer run (a lost device, a dead session): it must be rebuilt."""


def shared_session_threads(threads: int, streams: int) -> int:
    """``intra_op_num_threads`` of one ONNX Runtime session that ``streams`` callers share.

    A session's pool of ``n`` threads creates ``n - 1`` workers and runs the rest of each pass on its
    caller's thread (onnxruntime/core/common/threadpool.cc, ``ThreadPool::ThreadPool``: "uses the
    caller as one of the threads"), so ``streams`` callers and ``threads - streams`` workers are
    ``threads`` threads in all. With ``threads == streams`` (2 on 2 CPUs) it is 1: each pass runs on
    its caller's thread alone, exactly as one one-thread session per stream did.
    """
    return max(1, threads - max(1, streams) + 1)


def available_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

    A pod limited to 2 CPUs on a 64-core node sees 64 in os.cpu_count(); threads sized to that
    would thrash, so the cgroup v2 ``cpu.max`` (or v1 quota) wins when it is lower.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if q <= 0 else q / p
    except (OSError, ValueError):
        return None
