"""ArmoRM's gating head (``LlamaForRewardModelWithGating``), as its remote ``modeling_custom.py`` computes it.

Two rows of the decoder's last hidden states are read:

* the last real token: ``regression_layer`` (no bias) gives one reward per objective (19 for
  RLHFlow/ArmoRM-Llama3-8B-v0.1), the item's ``components``;
* the prompt end: the first token of the last occurrence of the gate pattern, the ids of
  ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`` (``find_token_for_gating``; the
  published file hard-codes Llama-3's ids [128009, 128006, 78191, 128007, 271], which the tokenizer
  must give for that text). The gating network runs on it: Linear and ReLU ``gating_n_hidden`` times,
  a last Linear, ``softmax(x / gating_temperature)`` times ``logit_scale``.

The score is ``sum(gating * (rewards @ reward_transform_matrix))``. An item without the pattern has no
prompt end: the published code raises, and rmserve's formatter refuses it (``FormatSettings.gate_pattern``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

GATE_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
TRANSFORM = "reward_transform_matrix"


class GatingHead(nn.Module):
    """``(last, prompt_end)`` hidden rows -> the score; ``components`` gives the objectives' rewards."""

    def __init__(
        self,
        regression: nn.Linear,
        gate: nn.Sequential,
        temperature: float,
        logit_scale: torch.Tensor,
        transform: torch.Tensor,
        pattern: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.regression = regression
        self.gate = gate
        self.temperature = temperature
        self.register_buffer("logit_scale", logit_scale.reshape(1).float())
        self.register_buffer("transform", transform.float())
        self.pattern = pattern

    def components(self, last: torch.Tensor) -> torch.Tensor:
        return self.regression(last)

    def forward(self, last: torch.Tensor, prompt_end: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.gate(prompt_end) / self.temperature, dim=1) * self.logit_scale[0]
        return torch.sum(weights * (self.components(last) @ self.transform), dim=1)

    def prompt_end(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per row, where the last occurrence of the pattern starts (-1 where it does not occur)."""
        n = len(self.pattern)
        padded = torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], n - 1), -1)], dim=1)
        seq = input_ids.shape[1]
        found = torch.ones_like(input_ids, dtype=torch.bool)
        for k, token in enumerate(self.pattern):
            found = found & (padded[:, k : k + seq] == token)
        positions = torch.arange(seq, device=input_ids.device).expand_as(input_ids)
        return torch.where(found, positions, torch.full_like(positions, -1)).amax(dim=1)


def gating_head(path: Path, config: Any, tokenizer: Any, tensors: dict[str, torch.Tensor]) -> GatingHead:
    """The head from the checkpoint's ``regression_layer``, ``gating.*`` and ``reward_transform_matrix``."""
    from rmserve.models.named_heads import checkpoint_tensors

    regression_weight = tensors.get("weight")
    if regression_weight is None or set(tensors) != {"weight"}:
        raise ValueError(f"{path}: regression_layer is not one bias-free linear layer: {sorted(tensors)}")
    objectives, hidden = (int(d) for d in regression_weight.shape)
    gate_tensors = checkpoint_tensors(path, "gating")
    n_hidden = int(getattr(config, "gating_n_hidden", 3))
    layers: list[nn.Module] = []
    for k in range(n_hidden + 1):
        weight, bias = gate_tensors.get(f"layers.{k}.weight"), gate_tensors.get(f"layers.{k}.bias")
        if weight is None:
            raise ValueError(f"{path} has no gating.layers.{k}.weight (gating_n_hidden is {n_hidden})")
        linear = nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias=bias is not None)
        linear.load_state_dict({"weight": weight} | ({"bias": bias} if bias is not None else {}))
        layers += [linear, nn.ReLU()] if k < n_hidden else [linear]
    expected = {f"layers.{k}.{p}" for k in range(n_hidden + 1) for p in ("weight", "bias")} | {"logit_scale"}
    extra = sorted(set(gate_tensors) - expected)
    if extra or "logit_scale" not in gate_tensors:
        what = f"unexpected {', '.join(extra)}" if extra else "no logit_scale"
        raise ValueError(f"{path}: the gating network is not ArmoRM's: {what}")
    transform = _tensor(path, TRANSFORM)
    if tuple(transform.shape) != (objectives, objectives):
        raise ValueError(f"{path}: {TRANSFORM} is {tuple(transform.shape)}, not {objectives} x {objectives}")
    regression = nn.Linear(hidden, objectives, bias=False)
    regression.load_state_dict({"weight": regression_weight})
    pattern = tuple(int(t) for t in tokenizer.encode(GATE_TEXT, add_special_tokens=False))
    return GatingHead(
        regression,
        nn.Sequential(*layers),
        float(getattr(config, "gating_temperature", 10)),
        gate_tensors["logit_scale"],
        transform,
        pattern,
    )


def _tensor(path: Path, name: str) -> torch.Tensor:
    from rmserve.models.lean.source import SafetensorsSource, float32_tensors

    source = SafetensorsSource(path) if SafetensorsSource.present(path) else None
    if source is None or name not in source.names():
        raise ValueError(f"{path} has no {name}")
    return float32_tensors(source, [name])[name]


def objective_names(config: Any, count: int) -> tuple[str, ...]:
    """The objectives' names where the config gives them (``objective_names``, or an ``id2label`` with one
    label per objective), else ``objective_0`` .. ``objective_{count - 1}``."""
    named = getattr(config, "objective_names", None)
    if isinstance(named, list | tuple) and len(named) == count:
        return tuple(str(n) for n in named)
    labels = getattr(config, "id2label", None) or {}
    if len(labels) == count:
        return tuple(str(labels[k]) for k in sorted(labels, key=int))
    return tuple(f"objective_{k}" for k in range(count))
