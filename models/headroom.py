"""fp16 headroom: how large the residual stream gets, measured in fp32 on the calibration set.

float16 saturates at 65,504. The residual stream (what each layer adds to) is where reward models
overflow it: Gemma-style streams reach hundreds of thousands, and some Llama and Qwen checkpoints have
"massive activations" of thousands on their first tokens. The exporter runs the fp32 PyTorch model
over the bundle's calibration pairs and records the largest |value| entering any norm that reads
the stream (every norm outside the attention block: each layer's input and post-attention norms,
and the final norm; encoders' LayerNorms, which read the residual sum). The stream fits when that
value times ``MARGIN`` is within float16's range: the margin covers inputs longer or stranger than
the calibration set, whose largest activations grow with them. Where it fits, an fp16 bundle runs
each layer entirely in fp16 (no fp32 residual guard, models/reduced.py); where it does not, it
keeps the guard (models/fp16.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rmserve.engines.batches import Read
from rmserve.formatting import Encoded
from rmserve.models.parity import TorchModel, reference_scores

FP16_MAX = 65504.0
# 8x (three bits of exponent) between the largest value seen and float16's largest.
MARGIN = 8.0


@dataclass(frozen=True)
class Headroom:
    residual_max_abs: float
    n_items: int

    @property
    def limit(self) -> float:
        return FP16_MAX / MARGIN

    @property
    def fits_fp16(self) -> bool:
        return self.residual_max_abs <= self.limit

    def as_manifest(self) -> dict[str, Any]:
        return {
            "residual_max_abs": round(self.residual_max_abs, 4),
            "measured_on": f"{self.n_items} calibration items, fp32 PyTorch",
            "fp16_max": FP16_MAX,
            "margin": MARGIN,
            "limit": self.limit,
            "fits_fp16": self.fits_fp16,
        }


def _stream_norms(model: TorchModel) -> list[torch.nn.Module]:
    """The norm modules whose input is the residual stream (Qwen3's per-head q/k norms are not)."""
    return [
        module
        for name, module in model.body.named_modules()
        if type(module).__name__.endswith(("RMSNorm", "LayerNorm")) and ".self_attn." not in f".{name}."
    ]


def measure_headroom(
    model: TorchModel, encoded: Sequence[Encoded], pad_id: int, read: Read | None = None
) -> Headroom:
    """The largest |value| of the residual stream over ``encoded`` (padded batches, fp32); ``read``
    takes an item's values from its row of output (``reference_items``: a process model's steps)."""
    largest = torch.zeros((), dtype=torch.float32)

    def record(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        nonlocal largest
        largest = torch.maximum(largest, args[0].detach().abs().max().float().cpu())

    hooks = [norm.register_forward_pre_hook(record) for norm in _stream_norms(model)]
    if not hooks:
        raise ValueError(f"{type(model.body).__name__} has no norm module reading its residual stream")
    try:
        reference_scores(model, encoded, pad_id, read=read)
    finally:
        for hook in hooks:
            hook.remove()
    return Headroom(float(largest), len(encoded))
