"""Named weight tensors, read one at a time: what the lean graph writer and the layer-by-layer reference
forward draw from.

``SafetensorsSource`` reads a checkpoint's ``*.safetensors`` files (one file, or the shards an
``model.safetensors.index.json`` lists) tensor by tensor with plain reads at the offsets each file's
header gives, in the tensor's own dtype (a bf16 checkpoint's tensors arrive as bf16). Nothing is
memory-mapped, so a tensor's bytes count against the process only while something holds the tensor.
``ModuleSource`` gives the same names from a module already in memory (a checkpoint saved as
``pytorch_model.bin``, or one built in a test).

``within(prefix)`` narrows a source to the names under one module (``model.`` for a decoder body),
so the body reads ``layers.0.self_attn.q_proj.weight`` and a head ``score.weight``, whatever the
checkpoint's outer class calls its body. ``float32_tensors`` reads a few named tensors whole, in
float32: what the heads built beside a body (models/named_heads.py, models/gating_head.py,
models/process_load.py) take from a checkpoint.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors' dtype names -> torch's.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorSource(Protocol):
    """Tensors by name, each in its stored dtype, read when asked for."""

    def names(self) -> frozenset[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def tensor(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    length: int


def _header(path: Path) -> dict[str, _Entry]:
    try:
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError) as exc:
        raise ValueError(f"cannot read the weights of {path}: {exc}") from None
    out: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path.name}: tensor {name} has dtype {info['dtype']}, which is not read")
        begin, end = info["data_offsets"]
        out[name] = _Entry(path, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin, end - begin)
    return out


class SafetensorsSource:
    """A checkpoint directory's safetensors weights (see the module docstring)."""

    def __init__(self, checkpoint: Path) -> None:
        index = checkpoint / INDEX_FILE
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [checkpoint / shard for shard in shards]
        elif (checkpoint / SINGLE_FILE).is_file():
            files = [checkpoint / SINGLE_FILE]
        else:
            raise FileNotFoundError(f"{checkpoint} has no {SINGLE_FILE} or {INDEX_FILE}")
        self._entries: dict[str, _Entry] = {}
        for file in files:
            self._entries |= _header(file)

    @staticmethod
    def present(checkpoint: Path) -> bool:
        return (checkpoint / INDEX_FILE).is_file() or (checkpoint / SINGLE_FILE).is_file()

    def names(self) -> frozenset[str]:
        return frozenset(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def stored_bytes(self) -> int:
        return sum(e.length for e in self._entries.values())

    def dtypes(self) -> frozenset[torch.dtype]:
        return frozenset(e.dtype for e in self._entries.values())

    def tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        buffer = bytearray(entry.length)
        with entry.file.open("rb", buffering=0) as fh:
            fh.seek(entry.start)
            view, done = memoryview(buffer), 0
            while done < entry.length:
                read = fh.readinto(view[done:])
                if not read:
                    raise ValueError(f"{entry.file.name} ends inside tensor {name}")
                done += read
        if not buffer:
            return torch.empty(entry.shape, dtype=entry.dtype)
        return torch.frombuffer(buffer, dtype=entry.dtype).reshape(entry.shape)


class ModuleSource:
    """The parameters and persistent buffers of a module in memory, by their state-dict names."""

    def __init__(self, module: nn.Module) -> None:
        self._tensors: Mapping[str, torch.Tensor] = module.state_dict()

    def names(self) -> frozenset[str]:
        return frozenset(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()


class Within:
    """The names of ``source`` that start with ``prefix``, without it."""

    def __init__(self, source: TensorSource, prefix: str) -> None:
        self.source, self.prefix = source, prefix

    def names(self) -> frozenset[str]:
        n = len(self.prefix)
        return frozenset(name[n:] for name in self.source.names() if name.startswith(self.prefix))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(self.prefix + name)

    def tensor(self, name: str) -> torch.Tensor:
        return self.source.tensor(self.prefix + name)


def within(source: TensorSource, prefix: str) -> TensorSource:
    return source if not prefix else Within(source, prefix)


def body_prefix(source: TensorSource) -> str:
    """The prefix of a decoder body's names in the checkpoint (``model.`` in a sequence classifier)."""
    for name in sorted(source.names(), key=len):
        if name.endswith("embed_tokens.weight"):
            return name[: -len("embed_tokens.weight")]
    raise ValueError("the checkpoint has no embed_tokens.weight, so its decoder body cannot be found")


def float32_tensors(source: TensorSource, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors of ``source``, each converted to float32 (KeyError for a name it lacks)."""
    return {name: source.tensor(name).to(torch.float32) for name in names}


def tensors_under(source: TensorSource, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor named ``prefix.<rest>``, in float32, keyed by ``<rest>``."""
    inner = within(source, prefix + ".")
    return float32_tensors(inner, sorted(inner.names()))
