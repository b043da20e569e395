"""The prefix-reuse graph on ONNX Runtime: rows that continue a past, one forward pass.

The graph (``model_past.onnx``, models/lean/body.py) takes the new tokens right-padded, each row's past
left-aligned in ``past_mask``, and each layer's past keys and values; it returns the new tokens' output
(``[rows]`` scores, or ``[rows, tokens]`` step values) and, when asked for, each layer's present keys
and values (past then new). Presents are fetched only when a caller will keep them: ONNX Runtime
computes them for attention either way, and copying them out costs memory bandwidth.

One session, run by up to ``streams`` threads at once, as the main engine's lanes run its one session
(ONNX Runtime's ``Run`` is thread-safe; see rmserve.engines.onnxruntime). Only the CPU provider is
wired: the cache keeps its tensors in host memory.

The graph's weights are the bundle's one ``model.onnx.data``, which ONNX Runtime maps into memory for
both graphs' sessions; each session still holds its own copy of the matrices, prepacked for MLAS by
``MatMul``. Sharing those between sessions needs a ``PrepackedWeightsContainer``
(``CreateSessionWithPrepackedWeightsContainer``, C API only); onnxruntime 1.32's Python API has none,
and ``SessionOptions.add_initializer`` / ``add_external_initializers`` share the raw buffers only.
Prepacking stays on: without it (``session.disable_prepacking``) the sessions share one copy, but short
passes, this graph's usual work, ran 2-4x slower (docs/prefix-reuse.md, "The weights in memory"). So
the server holds two prepacked copies of the layer weights, one per graph, whatever its streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rmserve.engines.base import EngineError, shared_session_threads

PAST_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class PastPass:
    """One forward pass's inputs: new tokens and each row's past."""

    input_ids: np.ndarray  # int64 [rows, new]
    attention_mask: np.ndarray  # int64 [rows, new]
    past_mask: np.ndarray  # int64 [rows, past]
    keys: np.ndarray  # [layers, rows, past, kv_width]
    values: np.ndarray


@dataclass(frozen=True)
class PastOutput:
    output: np.ndarray  # float32 [rows] or [rows, new]
    keys: np.ndarray | None  # [layers, rows, past + new, kv_width] when asked for
    values: np.ndarray | None


class PastRunner:
    def __init__(self, model_path: Path, *, threads: int, streams: int) -> None:
        o = ort.SessionOptions()
        o.intra_op_num_threads = shared_session_threads(threads, max(1, min(streams, threads)))
        o.inter_op_num_threads = 1
        o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            first = ort.InferenceSession(str(model_path), o, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise EngineError(f"onnxruntime could not load {model_path}: {exc}") from exc
        names = [i.name for i in first.get_inputs()]
        self.layers = sum(n.startswith("past_key.") for n in names)
        key = next(i for i in first.get_inputs() if i.name == "past_key.0")
        self.kv_width = int(key.shape[-1])
        self.dtype = PAST_FLOATS[key.type]
        self.per_token = len(first.get_outputs()[0].shape) == 2
        self._session: ort.InferenceSession | None = first

    def close(self) -> None:
        self._session = None  # the session goes with the last reference to it

    def empty(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of no past for ``rows`` rows."""
        shape = (self.layers, rows, 0, self.kv_width)
        return np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)

    def run(self, step: PastPass, *, presents: bool) -> PastOutput:
        feeds = {
            "input_ids": step.input_ids,
            "attention_mask": step.attention_mask,
            "past_mask": step.past_mask,
        }
        for i in range(self.layers):
            feeds[f"past_key.{i}"] = step.keys[i]
            feeds[f"past_value.{i}"] = step.values[i]
        wanted = ["scores"]
        if presents:
            wanted += [f"present_key.{i}" for i in range(self.layers)]
            wanted += [f"present_value.{i}" for i in range(self.layers)]
        session = self._session
        if session is None:
            raise EngineError("the prefix-reuse runner is closed")
        out = session.run(wanted, feeds)  # callers' threads run it side by side
        scores = np.asarray(out[0], dtype=np.float32)
        if not presents:
            return PastOutput(scores, None, None)
        n = self.layers
        return PastOutput(scores, np.stack(out[1 : 1 + n]), np.stack(out[1 + n :]))
