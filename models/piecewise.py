"""Run a written ONNX graph a piece at a time, so checking it needs one piece's weights in memory, not
the whole model's.

Why: ONNX Runtime's CPU provider has float32 kernels for most ops, so a session of an fp16 graph casts
the fp16 initializers those ops read and keeps float32 copies of them (a 0.12B fp16 bundle held 438 MB
against its fp32 bundle's 406 MB; a 1.36B fp16 export peaked at 8.21 GiB, its fp32 export's memory:
docs/export.md). The export's reduced-precision check of a streamed bundle runs the graph here instead.

The pieces are cut from the bundle's own ``model.onnx``: its nodes in stored order (ONNX graphs are
stored topologically sorted), a piece taking nodes until the initializers they read reach ``budget``
bytes. A piece's initializers are the graph's own entries, naming the same bytes of the same
external-data file, so no weight is copied or converted to cut it. A value that crosses a cut is a
piece's output and a later piece's input, in the type ``onnx.shape_inference`` gives it in the whole
graph (a float16 tensor stays float16 across the cut). ``infer_many`` takes every batch through a piece
before it loads the next, so each piece is loaded once per call whatever the number of batches, and
only the values a later piece reads are kept between pieces.

What is measured is the written graph's arithmetic, piece by piece: within a piece ONNX Runtime fuses
and casts as it does for the whole graph; at a cut the value is rounded to its declared type, as any
runtime that computes in the graph's types does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, ModelProto, TensorProto, ValueInfoProto, helper, shape_inference

from rmserve.engines.base import EngineError, EngineInfo, TokenBatch

BUDGET = 256 * 1024**2  # stored bytes of initializers per piece
# A loaded piece: feeds by name -> its outputs, in the piece's output order.
Run = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
Load = Callable[[Path, int], Run]


@dataclass(frozen=True)
class Piece:
    nodes: tuple[onnx.NodeProto, ...]
    initializers: tuple[TensorProto, ...]
    inputs: tuple[str, ...]  # read from the graph's inputs or earlier pieces
    outputs: tuple[str, ...]  # read by later pieces, or the graph's outputs
    weight_bytes: int


def stored_bytes(tensor: TensorProto) -> int:
    """The bytes ``tensor`` occupies where it is stored (inline, or in an external-data file)."""
    if tensor.data_location == TensorProto.EXTERNAL:
        entries = {e.key: e.value for e in tensor.external_data}
        return int(entries.get("length", 0))
    return tensor.ByteSize()


def cut(model: ModelProto, budget: int) -> list[Piece]:
    """``model``'s graph in pieces (the module docstring); ``model`` loaded without its external data."""
    graph = model.graph
    for node in graph.node:
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            raise EngineError(f"node {node.name or node.op_type} has a subgraph; it is not cut into pieces")
    weights = {t.name: t for t in graph.initializer}

    def size(names: set[str]) -> int:
        return sum(stored_bytes(weights[n]) for n in names)

    groups: list[list[onnx.NodeProto]] = []
    current: list[onnx.NodeProto] = []
    held: set[str] = set()
    for node in graph.node:
        reads = {n for n in node.input if n in weights}
        grown = held | reads
        if current and size(grown) > budget:
            groups.append(current)
            current, grown = [], reads
        current.append(node)
        held = grown
    groups.append(current)
    wanted = {o.name for o in graph.output}
    # Which piece reads each value last: a value is carried from where it is made until then.
    readers: dict[str, int] = {}
    for index, nodes in enumerate(groups):
        for node in nodes:
            for name in node.input:
                if name and name not in weights:
                    readers[name] = index
    pieces = []
    for index, nodes in enumerate(groups):
        made = [o for node in nodes for o in node.output if o]  # in node order
        inside = set(made)
        read = [n for node in nodes for n in node.input if n and n not in weights and n not in inside]
        uses = {n for node in nodes for n in node.input if n in weights}
        outputs = [o for o in made if o in wanted or readers.get(o, -1) > index]
        pieces.append(
            Piece(
                nodes=tuple(nodes),
                initializers=tuple(weights[n] for n in sorted(uses)),
                inputs=tuple(dict.fromkeys(read)),
                outputs=tuple(outputs),
                weight_bytes=sum(stored_bytes(weights[n]) for n in uses),
            )
        )
    return pieces


def how_run(pieces: int) -> str:
    """How a report says its graph was run."""
    return f"a piece of the graph at a time ({pieces} pieces)"


class PiecewiseEngine:
    """An engine (``infer``, ``info``) that runs ``model_path`` a piece at a time through ``load``
    (``ort_loader``, ``openvino_loader``), with ``threads`` threads. Scores are the graph's first output
    as float32, as the whole-graph engines return them."""

    def __init__(
        self,
        model_path: Path,
        load: Load,
        *,
        provider: str,
        precision: str,
        threads: int = 1,
        budget: int | None = None,
    ) -> None:
        budget = BUDGET if budget is None else budget
        model = onnx.load(str(model_path), load_external_data=False)
        typed = shape_inference.infer_shapes(model)
        self._types: dict[str, ValueInfoProto] = {
            v.name: v for v in [*typed.graph.value_info, *typed.graph.input, *typed.graph.output]
        }
        self._model = model
        self._pieces = cut(model, budget)
        self._directory = model_path.parent
        self._load, self._threads = load, threads
        self._inputs = [
            i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}
        ]
        self._output = model.graph.output[0].name
        largest = max(p.weight_bytes for p in self._pieces)
        self.info = EngineInfo(
            provider=provider,
            precision=precision,
            threads=threads,
            detail={"pieces": len(self._pieces), "largest_piece_bytes": largest, "budget_bytes": budget},
        )

    def infer(self, batch: TokenBatch) -> np.ndarray:
        return self.infer_many([batch])[0]

    def infer_many(self, batches: Sequence[TokenBatch]) -> list[np.ndarray]:
        """Every batch's scores; each piece is loaded once and runs every batch before the next."""
        values: list[dict[str, np.ndarray]] = [
            {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in b.feeds(self._inputs).items()}
            for b in batches
        ]
        for index, piece in enumerate(self._pieces):
            with self._piece_file(piece, index) as path:
                run = self._load(path, self._threads)
            later = {name for after in self._pieces[index + 1 :] for name in after.inputs}
            later.add(self._output)
            for held in values:
                outputs = run({name: held[name] for name in piece.inputs})
                held.update(zip(piece.outputs, outputs, strict=True))
                for name in [n for n in held if n not in later]:
                    del held[name]
            del run  # the piece's session and its weights go before the next piece loads
        return [np.asarray(held[self._output], dtype=np.float32) for held in values]

    @contextmanager
    def _piece_file(self, piece: Piece, index: int) -> Iterator[Path]:
        """The piece as a model file beside the bundle's graph, so its initializers' external-data
        locations resolve to the same file; removed once the runtime has loaded it."""
        graph = helper.make_graph(
            list(piece.nodes),
            f"piece{index}",
            [self._value(name) for name in piece.inputs],
            [self._value(name) for name in piece.outputs],
            initializer=list(piece.initializers),
        )
        model = helper.make_model(graph, opset_imports=list(self._model.opset_import))
        model.ir_version = self._model.ir_version
        path = self._directory / f".piece-{os.getpid()}-{index}.onnx"
        path.write_bytes(model.SerializeToString())
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _value(self, name: str) -> ValueInfoProto:
        known = self._types.get(name)
        if known is None or not known.type.tensor_type.elem_type:
            raise EngineError(f"the type of {name!r} is not known, so the graph cannot be cut there")
        return known

    def close(self) -> None:
        self._pieces = []


def ort_loader(path: Path, threads: int) -> Run:
    """A piece on ONNX Runtime's CPU provider, with the server's session settings."""
    from rmserve.engines.onnxruntime import new_session

    session = new_session(path, threads, ["CPUExecutionProvider"], arena=False)
    names = [o.name for o in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(v) for v in session.run(names, feeds)]

    return run


def openvino_loader(hint: str) -> Load:
    """Pieces on OpenVINO's CPU plugin with inference precision ``hint`` (bf16 or fp32)."""

    def load(path: Path, threads: int) -> Run:
        from rmserve.engines.openvino import compile_cpu

        compiled = compile_cpu(path, threads, hint)
        request = compiled.create_infer_request()
        ports = list(compiled.outputs)

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            done: Any = request.infer(feeds)
            return [np.array(done[port]) for port in ports]

        return run

    return load
