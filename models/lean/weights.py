"""A checkpoint's weights as the lean graph reads them: drawn by name from a ``TensorSource``, packed
per layer, one layer at a time.

Linear layers are stored ``[in, out]`` (MatMul's right operand). Each layer's q/k/v projections are
packed into one matrix and its gate/up projections into another, so a layer runs two products where
the checkpoint has five; a packed bias is zero where the checkpoint has none. Weights are read from
the source when the graph builder asks for a layer (``DecoderWeights.layer``) and converted to the
graph's float type on the way, so at most one layer's weights are held at once (models/lean/source.py:
a checkpoint's safetensors read tensor by tensor in their own dtype). The rotary tables and a
family's ``Layout`` (what its layer does beyond Llama's: Gemma-2's and Gemma-3's norms, GELU-tanh,
soft-capping, sliding windows, Gemma-3's per-head q/k norms and second rotary tables) come from
models/lean/layout.py.

The head is an outcome model's ``score`` layer (one reward per row), or a process model's
``StepHead`` (models/process_heads.py) as ``StepHeadWeights``: the linear layers that give its label
logits, and the rule that makes a step's reward of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rmserve.bundle import StepRule
from rmserve.models.gating_head import GatingHead
from rmserve.models.heads import ScoreModel
from rmserve.models.lean.layout import Layout, all_rotary_tables, layout_of
from rmserve.models.lean.source import ModuleSource, TensorSource
from rmserve.models.named_heads import Normalized
from rmserve.models.process_heads import StepHead, StepModel


@dataclass(frozen=True)
class Linear:
    weight: torch.Tensor  # [in, out]
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over each head's query and key
    k_norm: torch.Tensor | None
    o_proj: Linear
    attn_out_norm: torch.Tensor | None  # Gemma-2: a norm on attention's output before the residual add
    mlp_norm: torch.Tensor
    gate_up: Linear
    down: Linear
    mlp_out_norm: torch.Tensor | None  # Gemma-2: a norm on the MLP's output before the residual add
    window: int | None  # attend to the last ``window`` positions only (a sliding-window layer)
    local_rope: bool = False  # Gemma-3's sliding layers: rotary by the local tables


@dataclass(frozen=True)
class DecoderWeights:
    """A decoder body's shapes and settings, and the source its weights are read from by name."""

    source: TensorSource  # names under the body: ``layers.0.self_attn.q_proj.weight``, ...
    n_layers: int
    hidden: int
    cos: np.ndarray  # [max_length, head_dim / 2]
    sin: np.ndarray
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    layout: Layout = Layout()
    # Gemma-3: the sliding layers' cos and sin (``rope_local_base_freq``); cos/sin are the global ones.
    local_cos: np.ndarray | None = None
    local_sin: np.ndarray | None = None

    def embed(self) -> torch.Tensor:
        return self.source.tensor("embed_tokens.weight")

    def norm(self, name: str) -> torch.Tensor:
        """A norm's weight as the norm multiplies by it (Gemma's ``1 + w``, summed in float32)."""
        weight = self.source.tensor(name)
        offset = self.layout.norm_offset
        return weight.to(torch.float32) + offset if offset else weight

    def final_norm(self) -> torch.Tensor:
        return self.norm("norm.weight")

    def layer(self, i: int, dtype: torch.dtype) -> LayerWeights:
        """Layer ``i``'s weights, its linears packed in ``dtype`` (the graph's float type)."""
        p, names = f"layers.{i}.", self.source.names()

        def optional(name: str) -> torch.Tensor | None:
            return self.norm(p + name) if p + name in names else None

        def linears(*parts: str) -> Linear:
            return _pack(self.source, [p + part for part in parts], dtype)

        sandwich = self.layout.sandwich_norms
        return LayerWeights(
            input_norm=self.norm(p + "input_layernorm.weight"),
            qkv=linears("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            q_norm=optional("self_attn.q_norm.weight"),
            k_norm=optional("self_attn.k_norm.weight"),
            o_proj=linears("self_attn.o_proj"),
            attn_out_norm=self.norm(p + "post_attention_layernorm.weight") if sandwich else None,
            mlp_norm=self.norm(
                p + ("pre_feedforward_layernorm" if sandwich else "post_attention_layernorm") + ".weight"
            ),
            gate_up=linears("mlp.gate_proj", "mlp.up_proj"),
            down=linears("mlp.down_proj"),
            mlp_out_norm=self.norm(p + "post_feedforward_layernorm.weight") if sandwich else None,
            window=self.layout.windows[i] if self.layout.windows else None,
            local_rope=bool(self.layout.local_rope) and self.layout.local_rope[i],
        )


def _pack(source: TensorSource, prefixes: list[str], dtype: torch.dtype) -> Linear:
    """Linears of one input, packed side by side: ``x @ weight`` is their outputs concatenated."""
    names = source.names()
    weights = [source.tensor(name + ".weight").to(dtype) for name in prefixes]
    weight = torch.cat([w.T for w in weights], dim=1) if len(weights) > 1 else weights[0].T.contiguous()
    del weights
    if not any(name + ".bias" in names for name in prefixes):
        return Linear(weight)
    biases = [
        source.tensor(name + ".bias").to(dtype)
        if name + ".bias" in names
        else torch.zeros(int(source.tensor(name + ".weight").shape[0]), dtype=dtype)
        for name in prefixes
    ]
    return Linear(weight, torch.cat(biases))


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _linears(*layers: nn.Linear) -> Linear:
    """Linear modules of one input, packed side by side (a step head's, in float32)."""
    weight = torch.cat([layer.weight.detach().float().T for layer in layers], dim=1)
    if all(layer.bias is None for layer in layers):
        return Linear(weight)
    biases = [
        b.detach().float() if (b := layer.bias) is not None else torch.zeros(layer.out_features)
        for layer in layers
    ]
    return Linear(weight, torch.cat(biases))


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def decoder_weights(base: Any, max_length: int, source: TensorSource | None = None) -> DecoderWeights:
    """A Llama-layout decoder body (transformers' ``LlamaModel``, ``Qwen2Model``, ``Gemma2Model``...: the
    ``body`` of a ``ScoreModel`` or of a process ``StepModel``), its weights read from ``source`` (names
    under the body), or from ``base``'s own parameters."""
    config = base.config
    first = base.layers[0].self_attn
    head_dim = int(first.head_dim)
    (cos, sin), local = all_rotary_tables(base, max_length, head_dim)
    return DecoderWeights(
        source=source if source is not None else ModuleSource(base),
        n_layers=len(base.layers),
        hidden=int(config.hidden_size),
        cos=cos,
        sin=sin,
        eps=_eps(base.norm),
        heads=int(config.num_attention_heads),
        kv_heads=int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        head_dim=head_dim,
        scale=float(first.scaling),
        layout=layout_of(config),
        local_cos=None if local is None else local[0],
        local_sin=None if local is None else local[1],
    )


@dataclass(frozen=True)
class ScoreHeadWeights:
    """An outcome head: one linear layer to one reward (a ReLU between two: an MLP ``score``), then,
    where the reward is normalised (OpenRLHF's mean/std), ``(r - mean) / std`` in float32."""

    layers: tuple[Linear, ...]
    normalize: tuple[float, float] | None = None


@dataclass(frozen=True)
class GatingHeadWeights:
    """ArmoRM's gating head (models/gating_head.py): the regression layer read at the last token, the
    gating network's layers (ReLU between) read at the prompt end, and what combines them."""

    regression: Linear
    gate: tuple[Linear, ...]
    temperature: float
    logit_scale: float
    transform: np.ndarray  # [objectives, objectives]
    pattern: tuple[int, ...]


def gating_weights(head: GatingHead) -> GatingHeadWeights:
    layers = [m for m in head.gate if isinstance(m, nn.Linear)]
    return GatingHeadWeights(
        regression=_linears(head.regression),
        gate=tuple(_linears(layer) for layer in layers),
        temperature=head.temperature,
        logit_scale=float(head.logit_scale[0]),
        transform=_array(head.transform),
        pattern=head.pattern,
    )


def _mlp_layers(module: nn.Module, what: str) -> tuple[nn.Linear, ...]:
    """One Linear, or Linear, ReLU, Linear: the head forms the lean graph writes."""
    if isinstance(module, nn.Linear):
        return (module,)
    if isinstance(module, nn.Sequential) and [type(m) for m in module] == [nn.Linear, nn.ReLU, nn.Linear]:
        return (module[0], module[2])
    raise ValueError(f"a {type(module).__name__} {what} has no lean graph")


def score_head(hf_model: Any, source: TensorSource | None = None) -> ScoreHeadWeights | GatingHeadWeights:
    """The outcome head (``score``, or a named head: models/named_heads.py): hidden -> one reward. A
    plain ``score`` layer is read by name from ``source`` (the checkpoint's tensors) when given; the
    other head forms from the loaded module."""
    head, normalize = hf_model.score, None
    if isinstance(head, GatingHead):
        return gating_weights(head)
    if isinstance(head, Normalized):
        normalize = (float(head.mean[0]), float(head.std[0]))
        head = head.head
    if source is not None and isinstance(head, nn.Linear) and "score.weight" in source.names():
        return ScoreHeadWeights((_pack(source, ["score"], torch.float32),), normalize)
    return ScoreHeadWeights(tuple(_linears(layer) for layer in _mlp_layers(head, "score head")), normalize)


@dataclass(frozen=True)
class StepHeadWeights:
    """A process head: label logits through ``layers`` (a ReLU between two: the Qwen2.5-Math-PRM head),
    then ``rule`` on the ``positive`` label's logit (and the ``negative`` one's, for two labels)."""

    layers: tuple[Linear, ...]
    rule: StepRule
    positive: int
    negative: int | None


def step_head(head: StepHead) -> StepHeadWeights:
    """A ``StepHead`` as the lean graph writes it: one linear layer (a token classifier's ``score``, an
    LM head's two label rows) or the Qwen2.5-Math-PRM's Linear, ReLU, Linear."""
    if head.softcap:
        raise ValueError("a soft-capped LM head has no lean graph")
    layers = _mlp_layers(head.projection, "step head")
    return StepHeadWeights(
        tuple(_linears(layer) for layer in layers), head.rule, head.positive, head.negative
    )


def head_weights(
    model: ScoreModel | StepModel, source: TensorSource | None = None
) -> ScoreHeadWeights | GatingHeadWeights | StepHeadWeights:
    """The head the lean graph writes on the body: a process model's step head, else the outcome head
    (a plain ``score`` layer read by name from ``source``, the checkpoint's tensors, when given)."""
    if isinstance(model, StepModel):
        return step_head(model.head)
    # A named head (models/named_heads.py) is built from the loaded module, not read by name.
    named = getattr(model, "named_head", None) is not None
    return score_head(model.hf_model, None if named else source)
