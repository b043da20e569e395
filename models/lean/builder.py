"""A small ONNX graph builder: named nodes in scopes, weights as initializers, one float type.

Every node made inside ``scope("layer3")`` is named ``layer3/<Op>_<k>``, so the graph can be read
(and its nodes counted) by the part of the model they belong to. ``float_type`` is the element type
of every float the graph computes with (float32, float16 or bfloat16); weights are cast to it as
they are added, so one builder writes the same graph in any of the three precisions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def _tensor(array: np.ndarray, name: str, elem_type: int) -> onnx.TensorProto:
    # numpy's float32 -> float16 and ml_dtypes' float32 -> bfloat16 both round to nearest even, as
    # torch's .to() does, so a weight here is the weight PyTorch would hold in that precision.
    dtype = helper.tensor_dtype_to_np_dtype(elem_type) if array.dtype.kind == "f" else array.dtype
    return numpy_helper.from_array(np.ascontiguousarray(array.astype(dtype, copy=False)), name)


class GraphBuilder:
    def __init__(self, precision: str) -> None:
        self.precision = precision
        self.float_type = FLOAT_TYPES[precision]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._scope = ""
        self._counts: Counter[str] = Counter()

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        outer, self._scope = self._scope, name
        try:
            yield
        finally:
            self._scope = outer

    def _name(self, kind: str) -> str:
        prefix = f"{self._scope}/{kind}" if self._scope else kind
        self._counts[prefix] += 1
        return f"{prefix}_{self._counts[prefix]}"

    def weight(self, label: str, array: np.ndarray, *, name: str | None = None) -> str:
        """A float array in the graph's float type (an integer array as it is); ``name`` fixes its name."""
        name = name or self._name(label)
        self.initializers.append(_tensor(array, name, self.float_type))
        return name

    def float32(self, label: str, value: float) -> str:
        """A float32 scalar, whatever the graph's float type (for what runs after the cast to float32)."""
        name = self._name(label)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def float32_array(self, label: str, array: np.ndarray) -> str:
        """A float32 array, whatever the graph's float type."""
        name = self._name(label)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def ints(self, label: str, values: Sequence[int] | int) -> str:
        return self.weight(label, np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: Sequence[str], outputs: int = 1, **attrs: Any) -> list[str]:
        name = self._name(op_type)
        names = [name] if outputs == 1 else [f"{name}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name, **attrs))
        return names

    def one(self, op_type: str, inputs: Sequence[str], **attrs: Any) -> str:
        return self.op(op_type, inputs, 1, **attrs)[0]

    def model(
        self, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto], opset: int
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "rmserve_lean", list(inputs), list(outputs), self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="rmserve"
        )
        model.ir_version = 10  # what onnxruntime 1.2x and OpenVINO read for opset 23
        return model

    def rename(self, old: str, new: str) -> None:
        """Give the value ``old`` (a node's output, read by no node yet) the name ``new``."""
        for node in self.nodes:
            node.output[:] = [new if o == old else o for o in node.output]
