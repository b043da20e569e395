"""A small ONNX graph builder: named nodes in scopes, weights as initializers, one float type.

Every node made inside ``scope("layer3")`` is named ``layer3/<Op>_<k>``, so the graph can be read
(and its nodes counted) by the part of the model they belong to. ``float_type`` is the element type
of every float the graph computes with (float32, float16 or bfloat16); weights are cast to it as
they are added, so one builder writes the same graph in any of the three precisions.

With a ``WeightFile`` the builder streams: each weight is converted and appended to the external-data
file as it is added, and the graph keeps only its name, offset and length, so neither the builder nor
``make_graph``/``make_model`` (which copy every initializer) ever holds the weights' bytes.

With ``SharedWeights`` (the external weights of a graph already written beside it) a weight of the same
name, shape and type is not written again: the graph refers to the same bytes of the same data file.
This is how a bundle's prefix-reuse graph shares ``model.onnx.data`` with its scoring graph.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

FLOAT_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
TORCH_TYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TORCH_OF = {FLOAT_TYPES[p]: t for p, t in TORCH_TYPES.items()}
# Weights smaller than this stay inside model.onnx; larger ones start on a page boundary of the data file.
INLINE_BYTES = 1024
ALIGN = 4096


def as_array(value: np.ndarray | torch.Tensor, elem_type: int) -> np.ndarray:
    """``value`` in the graph's float type (an integer array as it is), as a contiguous numpy array.

    numpy's and torch's float32 -> float16 and ml_dtypes' and torch's float32 -> bfloat16 all round to
    nearest even, so a weight here is the weight PyTorch would hold in that precision, whichever
    dtype the checkpoint stored it in (bfloat16 -> float32 is exact).
    """
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return value.detach().contiguous().numpy()
        cast = value.detach().to(_TORCH_OF[elem_type]).contiguous()
        # numpy has no bfloat16: its bits are handed over as int16 and viewed as ml_dtypes' bfloat16.
        return (
            cast.view(torch.int16).numpy().view(dtype) if elem_type == TensorProto.BFLOAT16 else cast.numpy()
        )
    if value.dtype.kind != "f":
        return np.ascontiguousarray(value)
    return np.ascontiguousarray(value.astype(dtype, copy=False))


class WeightFile:
    """The external-data file (``model.onnx.data``) a streaming builder appends weights to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = path.open("wb")
        self.size = 0

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        """Append ``array``'s bytes; the returned tensor names where they are and holds none of them."""
        pad = -self.size % ALIGN
        self._fh.write(b"\0" * pad)
        start = self.size + pad
        raw = array.reshape(-1).view(np.uint8)
        self._fh.write(raw.data)
        self.size = start + raw.nbytes
        proto = onnx.TensorProto(
            name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype)
        )
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(raw.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def close(self) -> None:
        self._fh.close()


class SharedWeights:
    """Another graph's weights in external data, by name: a graph built with them refers to those bytes
    (the same location, offset and length) instead of writing its own copy."""

    def __init__(self, tensors: Iterable[onnx.TensorProto]) -> None:
        self._by_name = {t.name: t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL}

    @classmethod
    def of(cls, path: Path) -> SharedWeights:
        """The external weights of the graph written at ``path`` (its data file is not read)."""
        return cls(onnx.load(str(path), load_external_data=False).graph.initializer)

    def __len__(self) -> int:
        return len(self._by_name)

    def reference(self, array: np.ndarray, name: str) -> onnx.TensorProto | None:
        """A tensor naming where ``name``'s bytes already are, or None when the other graph has no such
        weight. A weight of that name with another shape or type is an error, never a silent reuse."""
        found = self._by_name.get(name)
        if found is None:
            return None
        elem_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        if tuple(found.dims) != array.shape or found.data_type != elem_type:
            there = helper.tensor_dtype_to_np_dtype(found.data_type)
            raise ValueError(
                f"weight {name!r} is {array.dtype}{list(array.shape)} here but "
                f"{there}{list(found.dims)} in the shared data file"
            )
        proto = onnx.TensorProto()
        proto.CopyFrom(found)
        return proto


class GraphBuilder:
    def __init__(
        self, precision: str, data: WeightFile | None = None, shared: SharedWeights | None = None
    ) -> None:
        self.precision = precision
        self.float_type = FLOAT_TYPES[precision]
        self.torch_type = TORCH_TYPES[precision]
        self.data = data
        self.shared = shared
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

    def weight(self, label: str, value: np.ndarray | torch.Tensor, *, name: str | None = None) -> str:
        """A float array in the graph's float type (an integer array as it is); ``name`` fixes its name.
        A weight ``shared`` holds is referred to where it is; else, with a ``WeightFile``, a weight of
        ``INLINE_BYTES`` or more is written there at once."""
        name = name or self._name(label)
        array = as_array(value, self.float_type)
        reference = self.shared.reference(array, name) if self.shared is not None else None
        if reference is not None:
            self.initializers.append(reference)
        elif self.data is not None and array.nbytes >= INLINE_BYTES:
            self.initializers.append(self.data.tensor(array, name))
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
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
