"""A checkpoint's weights as the lean graph reads them: fp32 numpy arrays, packed per layer.

Linear layers are stored ``[in, out]`` (MatMul's right operand). Each layer's q/k/v projections are
packed into one matrix and its gate/up projections into another, so a layer runs two products where
the checkpoint has five; a packed bias is zero where the checkpoint has none. Rotary cos/sin come
from the model's own rotary module at positions ``0 .. max_length - 1``, so every rope type it
supports with static frequencies (models/lean/eligibility.py) gives PyTorch's values exactly.

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
from rmserve.models.named_heads import Normalized
from rmserve.models.process_heads import StepHead, StepModel


@dataclass(frozen=True)
class Linear:
    weight: np.ndarray  # [in, out]
    bias: np.ndarray | None = None


@dataclass(frozen=True)
class LayerWeights:
    input_norm: np.ndarray
    qkv: Linear
    q_norm: np.ndarray | None  # Qwen3: RMSNorm over each head's query and key
    k_norm: np.ndarray | None
    o_proj: Linear
    post_norm: np.ndarray
    gate_up: Linear
    down: Linear


@dataclass(frozen=True)
class DecoderWeights:
    embed: np.ndarray  # [vocab, hidden]
    layers: tuple[LayerWeights, ...]
    final_norm: np.ndarray
    cos: np.ndarray  # [max_length, head_dim / 2]
    sin: np.ndarray
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    scale: float

    @property
    def hidden(self) -> int:
        return int(self.embed.shape[1])


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _linears(*layers: nn.Linear) -> Linear:
    """Linears of one input, packed side by side: ``x @ weight`` is their outputs concatenated."""
    weight = np.concatenate([_array(layer.weight).T for layer in layers], axis=1)
    if all(layer.bias is None for layer in layers):
        return Linear(weight)
    biases = [
        _array(b) if (b := layer.bias) is not None else np.zeros(layer.out_features, np.float32)
        for layer in layers
    ]
    return Linear(weight, np.concatenate(biases))


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _layer(layer: Any) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return LayerWeights(
        input_norm=_array(layer.input_layernorm.weight),
        qkv=_linears(attn.q_proj, attn.k_proj, attn.v_proj),
        q_norm=_array(q_norm.weight) if q_norm is not None else None,
        k_norm=_array(k_norm.weight) if k_norm is not None else None,
        o_proj=_linears(attn.o_proj),
        post_norm=_array(layer.post_attention_layernorm.weight),
        gate_up=_linears(mlp.gate_proj, mlp.up_proj),
        down=_linears(mlp.down_proj),
    )


def rotary_tables(base: Any, max_length: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``[max_length, head_dim / 2]`` from the model's rotary module (rotate-half layout)."""
    device = base.embed_tokens.weight.device
    positions = torch.arange(max_length, device=device).unsqueeze(0)
    probe = torch.zeros(1, device=device, dtype=torch.float32)
    with torch.inference_mode():
        cos, sin = base.rotary_emb(probe, positions)
    half = head_dim // 2
    return _array(cos[0, :, :half]), _array(sin[0, :, :half])


def decoder_weights(base: Any, max_length: int) -> DecoderWeights:
    """A Llama-layout decoder body (transformers' ``LlamaModel``, ``Qwen2Model``, ...: the ``body`` of a
    ``ScoreModel`` or of a process ``StepModel``)."""
    config = base.config
    first = base.layers[0].self_attn
    head_dim = int(first.head_dim)
    cos, sin = rotary_tables(base, max_length, head_dim)
    return DecoderWeights(
        embed=_array(base.embed_tokens.weight),
        layers=tuple(_layer(layer) for layer in base.layers),
        final_norm=_array(base.norm.weight),
        cos=cos,
        sin=sin,
        eps=_eps(base.norm),
        heads=int(config.num_attention_heads),
        kv_heads=int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        head_dim=head_dim,
        scale=float(first.scaling),
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


def score_head(hf_model: Any) -> ScoreHeadWeights | GatingHeadWeights:
    """The outcome head (``score``, or a named head: models/named_heads.py): hidden -> one reward."""
    head, normalize = hf_model.score, None
    if isinstance(head, GatingHead):
        return gating_weights(head)
    if isinstance(head, Normalized):
        normalize = (float(head.mean[0]), float(head.std[0]))
        head = head.head
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


def head_weights(model: ScoreModel | StepModel) -> ScoreHeadWeights | GatingHeadWeights | StepHeadWeights:
    """The head the lean graph writes on the body: a process model's step head, else the score layer."""
    if isinstance(model, StepModel):
        return step_head(model.head)
    return score_head(model.hf_model)
